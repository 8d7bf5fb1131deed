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
from tune.lora.core import COMPONENTS, Lora
from tune.lora.keys import _PEFT_PREFIX, AlphaRule, parse_lora

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


def _peft_alpha_rule(path: Path, metadata: Mapping[str, str]) -> AlphaRule | None:
    """alpha_for(stem, rank) from a PEFT adapter_config.json beside the file or diffusers'
    `lora_adapter_metadata`, or None when the file has neither (then alpha = rank)."""
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
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the PEFT config of {path}: {err}") from err
    if not configs:
        return None
    for config in configs.values():
        if config.get("use_dora"):
            raise ModelError(f"{path}: DoRA adapters are not supported; merge it with PEFT first")

    def alpha_for(stem: str, rank: int) -> float | None:
        prefix = next((p for p in configs if p and stem.startswith(p)), "")
        config = configs.get(prefix)
        if config is None:
            return None
        name = stem[len(prefix) :].removeprefix(_PEFT_PREFIX)
        alpha = config.get("lora_alpha")
        # PEFT matches pattern keys against the end of the module name.
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
                alpha = value
        if alpha is None:
            return None
        # rsLoRA scales by alpha / sqrt(r); express that as an alpha for our alpha / r.
        return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)

    return alpha_for


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
    lora = parse_lora(
        tensors,
        lora_targets(pipe),
        alpha_for=_peft_alpha_rule(path, metadata),
        metadata=metadata,
        source=str(path),
        family=family,
    )
    logger.info("read LoRA %s: %d modules (%s keys)", path, len(lora.modules), "/".join(sorted(lora.formats)))
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
