"""Reading LoRA files: raw safetensors I/O, the PEFT config beside a file, mapping a file onto a pipeline.

    read_lora_file(path)          -> (tensors, metadata)           raw safetensors I/O, nothing else
    load_lora(path, pipe)         -> Lora                          that, `parse_lora`, plus the PEFT config
    parse_lora_spec("FILE:0.8")   -> (path, scale)                 the CLI's --lora

PEFT files keep alpha out of the tensors: `load_lora` takes it from the adapter_config.json beside the
file or from diffusers' `lora_adapter_metadata` (alpha = rank when there is neither).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tune.errors import ConfigError, ModelError
from tune.lora.core import ADAPTER_CONFIG_KEY, COMPONENTS, Lora
from tune.lora.keys import _PEFT_PREFIX, AlphaRule, RankRule, parse_lora

if TYPE_CHECKING:
    from tune.models.families import Family

logger = logging.getLogger(__name__)


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a LoRA `.safetensors` file, as stored."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        # .ckpt/.pt/.bin LoRAs are pickles that can run code when loaded; convert them first.
        raise ModelError(f"LoRA files must be .safetensors; got {path.name}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ModelError(f"cannot read LoRA file {path}: {err}") from err
    if not tensors:
        raise ModelError(f"LoRA file {path} holds no tensors")
    return tensors, metadata


def _peft_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Stem prefix ("" for all, or "unet." ...) -> a PEFT config, from an adapter_config.json beside the
    file, diffusers' `lora_adapter_metadata` or our `tune_adapter_config`."""
    configs: dict[str, dict[str, Any]] = {}
    config_file = path.with_name("adapter_config.json")
    try:
        if config_file.is_file():
            configs[""] = json.loads(config_file.read_text())
        if "lora_adapter_metadata" in metadata:
            # diffusers: {"unet.r": 4, "unet.lora_alpha": 4, "text_encoder.alpha_pattern": {...}, ...}
            flat = json.loads(metadata["lora_adapter_metadata"])
            for key, value in flat.items():
                prefix, _, name = key.rpartition(".")
                configs.setdefault(prefix + "." if prefix else "", {})[name] = value
        if ADAPTER_CONFIG_KEY in metadata:
            ours = json.loads(metadata[ADAPTER_CONFIG_KEY])
            nested = {k: v for k, v in ours.items() if k in COMPONENTS and isinstance(v, dict)}
            configs.update({f"{k}.": v for k, v in nested.items()} if nested else {"": ours})
    except (OSError, ValueError, AttributeError) as err:
        raise ModelError(f"cannot read the PEFT config of {path}: {err}") from err
    return configs


def _pattern_value(config: Mapping[str, Any], table: str, name: str, default: Any) -> Any:
    # PEFT matches pattern keys against the end of the module name.
    for pattern, value in (config.get(table) or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            default = value
    return default


def peft_rules(path: Path, metadata: Mapping[str, str]) -> tuple[AlphaRule | None, RankRule | None]:
    """(alpha_for(stem, rank), rank_for(stem)) from the PEFT config of a file (see `_peft_configs`), or
    (None, None) when it has none (then alpha = rank)."""
    configs = _peft_configs(path, metadata)
    if not configs:
        return None, None

    def lookup(stem: str) -> tuple[dict[str, Any], str] | None:
        prefix = next((p for p in configs if p and stem.startswith(p)), "")
        config = configs.get(prefix)
        return None if config is None else (config, stem[len(prefix) :].removeprefix(_PEFT_PREFIX))

    def alpha_for(stem: str, rank: int) -> float | None:
        found = lookup(stem)
        if found is None:
            return None
        config, name = found
        alpha = _pattern_value(config, "alpha_pattern", name, config.get("lora_alpha", config.get("alpha")))
        if alpha is None:
            return None
        # rsLoRA scales by alpha / sqrt(r); express that as an alpha for our alpha / r.
        return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)

    def rank_for(stem: str) -> int | None:
        found = lookup(stem)
        if found is None:
            return None
        config, name = found
        rank = _pattern_value(config, "rank_pattern", name, config.get("r", config.get("rank")))
        return None if rank is None else int(rank)

    return alpha_for, rank_for


def lora_targets(pipe: Any) -> dict[str, nn.Module]:
    """The components a LoRA may patch: {"unet": pipe.unet, "text_encoder": pipe.text_encoder} (and
    SDXL's "text_encoder_2")."""
    return {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}


def pipeline_family(pipe: Any) -> Family | None:
    """The family (sd1, sd2, sdxl) of a pipeline, or None for objects that are no diffusers pipeline."""
    if getattr(getattr(pipe, "unet", None), "config", None) is None:
        return None
    from tune.models.families import family_of_pipeline

    return family_of_pipeline(pipe)


def load_lora(path: str | Path, pipe: Any) -> Lora:
    """Read a LoRA `.safetensors` file (kohya, diffusers or PEFT keys) and map it onto `pipe`.

    A file made for another family than the pipeline's is a one-line ModelError naming both."""
    from tune.models.families import check_same_family, family_of_lora

    path = Path(path)
    tensors, metadata = read_lora_file(path)
    family = pipeline_family(pipe)
    found = family_of_lora(tensors, metadata)
    if family and found:
        check_same_family(f"LoRA {path}", found, family)
    alpha_for, rank_for = peft_rules(path, metadata)
    lora = parse_lora(
        tensors,
        lora_targets(pipe),
        alpha_for=alpha_for,
        rank_for=rank_for,
        metadata=metadata,
        source=str(path),
        family=family,
    )
    kinds = "/".join(sorted(lora.kinds))
    logger.info(
        "read %s %s: %d modules (%s keys)", kinds, path, len(lora.modules), "/".join(sorted(lora.formats))
    )
    return lora


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` (the CLI's --lora) -> (path, scale); scale defaults to 1.0."""
    path, sep, tail = spec.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:
        # No scale given (a colon that belongs to the path, as in C:\dir\x.safetensors, is kept).
        path, tail = spec, ""
    if not path:
        raise ConfigError(f"bad --lora {spec!r}: expected FILE[:SCALE], e.g. style.safetensors:0.8")
    if not tail:
        return Path(path), 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise ConfigError(
            f"bad --lora {spec!r}: SCALE must be a number, e.g. {path}:0.8; got {tail!r}"
        ) from None
    if not math.isfinite(scale):
        raise ConfigError(f"bad --lora {spec!r}: SCALE must be finite; got {tail!r}")
    return Path(path), scale
