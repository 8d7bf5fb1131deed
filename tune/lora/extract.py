"""A PEFT-injected model's adapter as a `Lora` (`lora_from_peft`), and as the run directory's adapter
file (`save_adapter`).

Adapter files of the other types (DoRA, LoHa, LoKr; `inject_lora(type=...)`) hold PEFT's own state dict,
unchanged: `<component>.<module path>.<peft tensor>` (the module path as diffusers files spell it, text
encoders under `text_model.`), e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.hada_w1_a`,
`....lokr_w1`, `....lora_A.weight` + `....lora_magnitude_vector`; no alpha tensors. The metadata says
what they are: `tune_adapter_type` (dora | loha | lokr) and `tune_adapter_config` (JSON: type, r, alpha,
the type's options as peft names them, target_modules = the adapted `<component>.<module path>`s).
A DoRA file also carries diffusers' `lora_adapter_metadata` (use_dora, the real alpha), so
`pipe.load_lora_weights` applies it exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tune.errors import ModelError
from tune.lora.core import COMPONENTS, Lora, LoraModule
from tune.lora.files import write_lora_file
from tune.lora.inject import TYPE_OPTIONS, AdapterType
from tune.lora.keys import _PEFT_PREFIX, _listing
from tune.lora.write import ADAPTER_METADATA_KEY, diffusers_stem, save_lora

ADAPTER_TYPE_KEY = "tune_adapter_type"
ADAPTER_CONFIG_KEY = "tune_adapter_config"


def lora_from_peft(
    unet: nn.Module | None,
    text_encoder: nn.Module | None = None,
    adapter_name: str = "default",
    *,
    text_encoder_2: nn.Module | None = None,
) -> Lora:
    """The adapter `adapter_name` of PEFT-injected models (`unet.add_adapter`, `text_encoder.add_adapter`,
    `inject_adapter_in_model` or `get_peft_model`) as a Lora, each module at its effective scale
    (the layer's own `scaling`, so rank_pattern, alpha_pattern and rsLoRA are all honoured).
    SDXL's `text_encoder_2` adapters become component "text_encoder_2"."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    modules: dict[str, LoraModule] = {}
    for component, model in (
        ("unet", unet),
        ("text_encoder", text_encoder),
        ("text_encoder_2", text_encoder_2),
    ):
        if model is None:
            continue
        configs = getattr(model, "peft_config", None) or {}
        if adapter_name not in configs:
            have = ", ".join(configs) or "none"
            raise ModelError(f"the {component} has no LoRA adapter named {adapter_name!r} (adapters: {have})")
        state = {
            key.removeprefix(_PEFT_PREFIX): tensor
            # save_embedding_layers=False: no LoRA file holds an embedding matrix, and "auto" would read the
            # base folder's config (maybe from the hub) and add the matrix after a vocabulary resize.
            for key, tensor in get_peft_model_state_dict(
                model, adapter_name=adapter_name, save_embedding_layers=False
            ).items()
        }
        used: set[str] = set()
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            if layer.use_dora.get(adapter_name):
                raise ModelError(f"{component}.{name} is a DoRA adapter; plain LoRA files cannot carry it")
            path = name.removeprefix(_PEFT_PREFIX)
            keys = (f"{path}.lora_A.weight", f"{path}.lora_B.weight")
            down, up = (state[key].detach().to("cpu", torch.float32).clone() for key in keys)
            used.update(keys)
            scale = float(layer.scaling[adapter_name])
            modules[f"{component}.{path}"] = LoraModule(down=down, up=up, alpha=scale * down.shape[0])
        extra = sorted(set(state) - used)
        if extra:
            raise ModelError(
                f"the {component}'s adapter holds tensors a LoRA file cannot carry ({_listing(extra)}): "
                "LoRA biases, DoRA magnitudes or modules_to_save"
            )
    if not modules:
        raise ModelError(f"no LoRA layers of adapter {adapter_name!r} found; was the adapter injected?")
    return Lora(modules=modules, formats=frozenset({"peft"}), source=f"adapter {adapter_name!r}")


def save_adapter(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    *,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write a PEFT-injected adapter as the run directory's diffusers-format adapter file.

    The recipe calls it for `checkpoints/step_NNNNNN/lora.safetensors` and
    `export/pytorch_lora_weights.safetensors` (see `tune.lora.run_files`); either model may be None
    when only the other one was trained; SDXL's `text_encoder_2` is written with the text encoder. fp32 by default: `tune export` picks the shipping dtype.
    A LoRA's scale is baked into lora_B (alpha = r); DoRA, LoHa and LoKr adapters are written as PEFT
    state dicts (see the module docstring). The file is for sampling, export and sharing; resume
    training from the accelerate state, not by loading this file into the adapter.
    """
    models = dict(zip(COMPONENTS, (unet, text_encoder, text_encoder_2), strict=True))
    type = adapter_type(models, adapter_name)
    if type == "lora":
        lora = lora_from_peft(unet, text_encoder, adapter_name, text_encoder_2=text_encoder_2)
        return save_lora(lora, path, "diffusers", dtype=dtype, metadata=metadata)
    tensors, own = peft_adapter_state(models, type, adapter_name, dtype)
    write_lora_file(tensors, {**(metadata or {}), **own}, path)
    return Path(path)


def _peft_config(model: nn.Module, component: str, adapter_name: str) -> Any:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        have = ", ".join(configs) or "none"
        raise ModelError(f"the {component} has no adapter named {adapter_name!r} (adapters: {have})")
    return configs[adapter_name]


def adapter_type(models: Mapping[str, nn.Module | None], adapter_name: str = "default") -> AdapterType:
    """lora, dora, loha or lokr: the type of the adapter `adapter_name` injected into the models
    (component -> model or None), which must all hold the same type."""
    types = set()
    for component, model in models.items():
        if model is not None:
            config = _peft_config(model, component, adapter_name)
            kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
            types.add("dora" if kind == "lora" and config.use_dora else kind)
    if len(types) != 1 or not types <= set(TYPE_OPTIONS):
        raise ModelError(f"adapter {adapter_name!r} is not one LoRA/DoRA/LoHa/LoKr adapter (found {types})")
    return types.pop()  # type: ignore[return-value]


def peft_adapter_state(
    models: Mapping[str, nn.Module | None], type: AdapterType, adapter_name: str, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a DoRA/LoHa/LoKr adapter file: PEFT's state dict of each model, keys
    prefixed by the component, and the tune_adapter_* metadata (plus diffusers' for DoRA)."""
    from peft import get_peft_model_state_dict

    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    config: Any = None
    for component, model in models.items():
        if model is None:
            continue
        config = _peft_config(model, component, adapter_name)
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        for key, tensor in state.items():
            # PEFT names end in `.<tensor>` (hada_w1_a, lokr_w1, lora_magnitude_vector) or `.lora_A.weight`.
            parts = key.removeprefix(_PEFT_PREFIX).split(".")
            cut = -2 if parts[-1] == "weight" else -1
            module, leaf = ".".join(parts[:cut]), ".".join(parts[cut:])
            stem = diffusers_stem(f"{component}.{module}")
            targets.add(stem)
            tensors[f"{stem}.{leaf}"] = tensor.detach().to("cpu", dtype).contiguous()
    if not tensors:
        raise ModelError(f"no adapter tensors of {adapter_name!r} found; was the adapter injected?")
    alpha = config.lora_alpha if type == "dora" else config.alpha
    options = {name: getattr(config, name) for name in TYPE_OPTIONS[type]}
    described = {"type": type, "r": config.r, "alpha": alpha, **options, "target_modules": sorted(targets)}
    metadata = {
        "format": "pt",
        ADAPTER_TYPE_KEY: type,
        ADAPTER_CONFIG_KEY: json.dumps(described, sort_keys=True),
    }
    if type == "dora":
        metadata[ADAPTER_METADATA_KEY] = json.dumps(_diffusers_dora_config(targets, config.r, alpha))
    return tensors, metadata


def _diffusers_dora_config(targets: set[str], rank: int, alpha: float) -> dict[str, Any]:
    """diffusers' `lora_adapter_metadata` of a DoRA file (per component: the LoraConfig fields
    `load_lora_weights` reads); target paths go without `text_model.` (PEFT matches suffixes)."""
    config: dict[str, Any] = {}
    for component in COMPONENTS:
        paths = sorted(
            t.split(".", 1)[1].removeprefix("text_model.") for t in targets if t.split(".", 1)[0] == component
        )
        if paths:
            fields = {"r": rank, "lora_alpha": alpha, "target_modules": paths, "use_dora": True}
            fields |= {"rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none"}
            config.update({f"{component}.{key}": value for key, value in fields.items()})
    return config
