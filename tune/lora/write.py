"""Writing kohya and diffusers LoRA files: key names, state dicts, `sshs_model_hash`, `save_lora`.

Files we write (SD1.x shown; SD2.x and SDXL differ in prefixes, U-Net names and metadata as
`tune.lora.family_files` says: SDXL has lora_unet_<SGM path>, lora_te1_ and lora_te2_):

    kohya      lora_unet_<diffusers path, . -> _> and lora_te_text_model_encoder_layers_<i>_<...>
               (canonical `text_model.` names whatever transformers calls the modules); per module
               .lora_down.weight [r, in] or [r, in, kh, kw], .lora_up.weight [out, r] or [out, r, 1, 1]
               (1x1 proj_in/proj_out are convs in SD1.x, so 4-D), .alpha (0-dim), in the file dtype.
               delta W = (alpha / r) * up @ down. ONE alpha per file, the most common one: a module
               with another alpha gets alpha_i / alpha folded into its up, because diffusers applies
               only the most common alpha to attention projections and (transformers 5) to the
               whole text encoder. Metadata: ss_network_module/dim/alpha(/args), ss_base_model_version
               sd_v1, ss_v2 False, modelspec.* (sai_model_spec, architecture stable-diffusion-v1/lora,
               title, trigger_phrase), ss_output_name, ss_training_comment, tune_* and
               sshs_model_hash = sha256 of the bytes after the header (A1111 trusts it).
    diffusers  unet.<path>.lora_A.weight / .lora_B.weight and
               text_encoder.text_model.encoder.layers.<i>....lora_A.weight, one style per file, the
               scale alpha / r baked into lora_B (alpha = r), and `lora_adapter_metadata` (JSON of
               unet.r, unet.lora_alpha, unet.target_modules, unet.rank_pattern, ... as diffusers'
               save_lora_weights writes it; text-encoder names there go without `text_model.` so PEFT
               matches them under transformers 4 and 5). `pipe.load_lora_weights(dir, weight_name=)`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tune.errors import ConfigError, ModelError
from tune.lora.core import ADAPTER_CONFIG_KEY, ADAPTER_TYPE_KEY, COMPONENTS, ExportFormat, Lora, LoraModule
from tune.lora.family_files import (
    KOHYA_PREFIXES,
    is_v_prediction,
    kohya_metadata,
    kohya_unet_path,
    with_all_text_projections,
)
from tune.lora.files import SSHS_HASH_KEY, write_lora_file
from tune.lora.keys import _TEXT_MODEL_LEVEL
from tune.lora.write_lycoris import lycoris_metadata, lycoris_tensors

if TYPE_CHECKING:
    from tune.models.families import Family

logger = logging.getLogger(__name__)

# Key naming is written by hand: diffusers' `convert_state_dict_to_kohya` writes `lora_te1_` for SD1.x
# (kohya's SD1 loader ignores those keys) and, under transformers 5, text-encoder names without the
# `text_model.` level that ComfyUI and A1111 require; kohya's own LoRANetwork has the same problem.

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""File dtypes by the names the CLI takes."""
FORMATS: tuple[ExportFormat, ...] = ("kohya", "diffusers")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"

# Metadata the writers compute; stale copies carried over from a source file are dropped. The legacy
# hash is computed by kohya on an ss_*-only serialization, so it cannot be reproduced: never written.
_WRITER_KEYS = frozenset(
    {
        SSHS_HASH_KEY,
        "sshs_legacy_hash",
        ADAPTER_METADATA_KEY,
        ADAPTER_TYPE_KEY,  # the training config of a run's adapter file: its alphas are folded in here
        ADAPTER_CONFIG_KEY,
        "format",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_base_model_version",
        "ss_v2",
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "modelspec.implementation",
    }
)


def canonical_path(target: str) -> tuple[str, str]:
    """(component, module path as files spell it): text-encoder paths always carry `text_model.`,
    whatever transformers version named the loaded modules."""
    component, path = target.split(".", 1)
    if component.startswith("text_encoder") and not path.startswith(_TEXT_MODEL_LEVEL):
        path = _TEXT_MODEL_LEVEL + path
    return component, path


def kohya_stem(target: str, family: Family = "sd1") -> str:
    """`unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`
    (SDXL: `down_blocks.1.attentions.0.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`, SGM names); `text_encoder.encoder.layers.0.mlp.fc1` ->
    `lora_te_text_model_encoder_layers_0_mlp_fc1` (SDXL: `lora_te1_...`; its text_encoder_2: `lora_te2_...`)."""
    component, path = canonical_path(target)
    prefixes = KOHYA_PREFIXES[family]
    if component not in prefixes:
        raise ValueError(f"no kohya name for component {component!r} of a {family} LoRA")
    if component == "unet":
        path = kohya_unet_path(path, family)
    return prefixes[component] + path.replace(".", "_")


def diffusers_stem(target: str) -> str:
    """`<component>.<canonical module path>`, the stem of diffusers' `.lora_A.weight` keys."""
    return ".".join(canonical_path(target))


def _config_path(target: str) -> str:
    """A module path for PEFT's target_modules / rank_pattern / alpha_pattern that matches under both
    transformers generations: PEFT matches these as suffixes, so the text encoder's paths go without
    `text_model.` (a `text_model.` name raises NoMatchingPeftModuleError under transformers 5)."""
    component, path = target.split(".", 1)
    return path.removeprefix(_TEXT_MODEL_LEVEL) if component.startswith("text_encoder") else path


def _most_common(values: Iterable[Any]) -> Any:
    """The most frequent value; ties go to the one met first (callers iterate in sorted key order)."""
    return Counter(values).most_common(1)[0][0]


def _fmt(value: float) -> str:
    return str(float(value))


def _checked(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = tensor.to(dtype).contiguous()
    if not torch.isfinite(out).all():
        raise ModelError(f"{what} does not fit in {dtype} (overflow); write it with --dtype fp32 or bf16")
    return out


def _is_3x3(pair: LoraModule) -> bool:
    return pair.down.ndim == 4 and tuple(pair.down.shape[2:]) != (1, 1)


def to_kohya_state_dict(
    lora: Lora, dtype: torch.dtype = torch.float16, family: Family = "sd1"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors for `lora` and the `ss_network_*` metadata describing them.

    The file gets ONE alpha (the most common one, as the file dtype stores it): diffusers keeps only the
    most common alpha for attention projections, and under transformers 5 for every text-encoder
    module (reference §4.4), so a module whose own alpha differs gets alpha_i / alpha folded into its
    up weight. Every tool then computes the same delta W = (alpha / r) * up @ down. `family` picks the
    key names; SD2 and SDXL files get every q/k/v/out_proj of an OpenCLIP layer (`family_files`).
    """
    if "dora" in lora.kinds:
        raise ModelError(
            f"{lora.source or 'the LoRA'} is DoRA: kohya files carry it as a plain LoRA made with the base "
            "weights (tune.lora.write_lycoris.dora_as_lora; `tune export` does it)"
        )
    everything = dict(sorted(with_all_text_projections(dict(lora.modules), family).items()))
    modules = {t: m for t, m in everything.items() if isinstance(m, LoraModule)}
    tensors: dict[str, torch.Tensor] = {}
    for target, module in everything.items():
        if not isinstance(module, LoraModule):
            tensors.update(lycoris_tensors(kohya_stem(target, family), module, dtype, _checked))
    nonzero = [pair.alpha for pair in modules.values() if pair.alpha != 0]
    # kohya reads alpha 0 as alpha = rank, so 0 is never written; zero-scale modules get a zero up.
    alpha = float(torch.tensor(_most_common(nonzero) if nonzero else 1.0, dtype=dtype))
    folded = 0
    for target, pair in modules.items():
        stem = kohya_stem(target, family)
        factor = pair.alpha / alpha
        folded += factor != 1.0
        up = pair.up.to(torch.float32) * factor if factor != 1.0 else pair.up
        tensors[f"{stem}.lora_down.weight"] = _checked(pair.down, dtype, f"{target} down")
        tensors[f"{stem}.lora_up.weight"] = _checked(up, dtype, f"{target} up")
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)  # 0-dim, as kohya saves it
    if folded:
        logger.info(
            "one alpha (%s) for the kohya file: folded their own alpha into %d modules", alpha, folded
        )
    if len(modules) < len(everything):
        return tensors, lycoris_metadata(lora)
    linear = [pair.rank for pair in modules.values() if not _is_3x3(pair)]
    convs = [pair.rank for pair in modules.values() if _is_3x3(pair)]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common(linear or convs)),
        "ss_network_alpha": _fmt(alpha),
    }
    if convs:  # kohya's LoCon settings (3x3 convs of resnets and samplers)
        metadata["ss_network_args"] = json.dumps(
            {"conv_dim": str(_most_common(convs)), "conv_alpha": _fmt(alpha)}
        )
    return tensors, metadata


def to_diffusers_state_dict(
    lora: Lora, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/PEFT tensors (`unet.<path>.lora_A.weight`, `text_encoder.text_model.<path>...`) and
    the `lora_adapter_metadata` that `load_lora_weights` turns into a LoraConfig.

    Each module's scale alpha / r is baked into lora_B, so alpha = r everywhere: ComfyUI (which reads
    the non-attention modules of such files and ignores the metadata) and readers without the
    metadata get the same delta W as diffusers. The metadata lists only long-standing LoraConfig
    fields (r, lora_alpha, target_modules, rank_pattern, alpha_pattern, ...): a full
    `LoraConfig.to_dict()` carries this PEFT version's newest fields, which older PEFT rejects.
    """
    lycoris = sorted(lora.kinds & {"loha", "lokr"})
    if lycoris:
        raise ConfigError(
            f"diffusers cannot load {'/'.join(lycoris)} files (its loader reads LoRA and DoRA only); "
            "export them as kohya files (ComfyUI, A1111) or sample them with `tune sample --lora`"
        )
    tensors: dict[str, torch.Tensor] = {}
    adapter_metadata: dict[str, Any] = {}
    for component in COMPONENTS:
        modules = {t: p for t, p in sorted(lora.modules.items()) if t.split(".", 1)[0] == component}
        if not modules:
            continue
        for target, pair in modules.items():
            stem = diffusers_stem(target)
            scale = pair.alpha / pair.rank
            up = pair.up.to(torch.float32) * scale if scale != 1.0 else pair.up
            tensors[f"{stem}.lora_A.weight"] = _checked(pair.down, dtype, f"{target} down")
            tensors[f"{stem}.lora_B.weight"] = _checked(up, dtype, f"{target} up")
            if pair.magnitude is not None:
                # With `.weight`: diffusers loads the text encoder's magnitudes only so (its U-Net takes both).
                tensors[f"{stem}.lora_magnitude_vector.weight"] = _peft_magnitude(pair, target, dtype)
        ranks = {_config_path(target): pair.rank for target, pair in modules.items()}
        rank = _most_common(ranks.values())
        others = {path: r for path, r in ranks.items() if r != rank}
        config = {
            "r": rank,
            "lora_alpha": rank,
            "target_modules": sorted(ranks),
            "rank_pattern": others,
            "alpha_pattern": others,  # alpha = r for every module: the scale lives in lora_B
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": any(pair.magnitude is not None for pair in modules.values()),
            "init_lora_weights": True,
        }
        adapter_metadata.update({f"{component}.{key}": value for key, value in config.items()})
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True)}
    return tensors, metadata


def _peft_magnitude(pair: LoraModule, target: str, dtype: torch.dtype) -> torch.Tensor:
    """PEFT's lora_magnitude_vector: [out] for Linear, [1, out, 1, 1] for Conv2d (per output row only)."""
    magnitude = pair.magnitude
    assert magnitude is not None
    if magnitude.shape[0] != pair.up.shape[0] or magnitude.shape[1] != 1:
        raise ModelError(f"{target}: a per-input-column DoRA magnitude has no PEFT/diffusers form")
    flat = magnitude.flatten()
    return _checked(flat if pair.up.ndim == 2 else flat.reshape(1, -1, 1, 1), dtype, f"{target} magnitude")


def save_lora(
    lora: Lora,
    path: str | Path,
    format: ExportFormat,
    *,
    dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
    family: Family | None = None,
    v_prediction: bool | None = None,
) -> Path:
    """Write `lora` as a kohya or diffusers `.safetensors` file (see the module docstring).

    `metadata` (strings) is stored as given, except the keys the writer owns (network dim/alpha,
    hashes, architecture, adapter config), which are computed. `family` (default: `lora.family`, else
    SDXL when there are text_encoder_2 modules, else SD1.x) picks names and architecture metadata;
    `v_prediction` (default: what `lora.metadata` says) makes an SD2 file `sd_v2_v`. Overwrites `path`.
    """
    second_encoder = any(target.startswith("text_encoder_2.") for target in lora.modules)
    family = family or lora.family or ("sdxl" if second_encoder else "sd1")
    if v_prediction is None:
        v_prediction = is_v_prediction(lora.metadata)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"LoRA files are written as .safetensors; got {path.name}")
    if not lora.modules:
        raise ModelError(f"{lora.source or 'the LoRA'} has no modules to write")
    meta = {key: value for key, value in (metadata or {}).items() if key not in _WRITER_KEYS}
    if format == "kohya":
        tensors, own = to_kohya_state_dict(lora, dtype, family)
        meta.setdefault("ss_output_name", path.stem)
        meta.setdefault("modelspec.title", path.stem)
        own.update(kohya_metadata(family, v_prediction))
    elif format == "diffusers":
        tensors, own = to_diffusers_state_dict(lora, dtype)
        if family != "sd1":  # tells readers the family when the keys cannot (SD2; SDXL without te2)
            architecture = kohya_metadata(family, v_prediction)
            own.update({k: architecture[k] for k in ("ss_base_model_version", "modelspec.architecture")})
    else:
        raise ConfigError(f"LoRA format must be one of {', '.join(FORMATS)}; got {format!r}")
    digest = write_lora_file(tensors, {**meta, **own}, path)
    logger.info(
        "wrote %s LoRA %s: %d modules, %s, sshs %s", format, path, len(lora.modules), dtype, digest[:12]
    )
    return path
