"""PEFT LoHa / LoKr / DoRA adapters on a tiny pipeline, with random non-zero weights, and the run
directory's adapter file made from them (PEFT key names + tune_adapter_type / tune_adapter_config), as
the lora recipe writes it. The deltas PEFT computes are what the tests compare against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from tune.lora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS

UNET_PATTERN = "|".join(f"(?:{p})" for p in UNET_TARGETS.values())
# name -> (adapter type, PEFT config fields). LoKr: r 8 on these widths makes both factors full (PEFT
# still scales by alpha / r); r 2 decomposes w2 on the wider layers; decompose_both with r 1 splits w1 too.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "loha": ("loha", {"r": 4, "alpha": 3.0}),
    "lokr": ("lokr", {"r": 2, "alpha": 3.0}),
    "lokr_full": ("lokr", {"r": 8, "alpha": 3.0}),
    "lokr_both": ("lokr", {"r": 1, "alpha": 4.0, "decompose_both": True, "decompose_factor": 4}),
    "dora": ("dora", {"r": 4, "lora_alpha": 3.0, "use_dora": True}),
}


def _config(kind: str, fields: dict[str, Any], target_modules: str) -> Any:
    if kind == "loha":
        return LoHaConfig(target_modules=target_modules, **fields)
    if kind == "lokr":
        return LoKrConfig(target_modules=target_modules, **fields)
    return LoraConfig(target_modules=target_modules, **fields)


@torch.no_grad()
def inject_random(pipe: Any, case: str, seed: int = 0) -> None:
    """Inject the case's adapter into pipe.unet and pipe.text_encoder with random non-zero weights."""
    kind, fields = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    for model, pattern in ((pipe.unet, UNET_PATTERN), (pipe.text_encoder, TEXT_ENCODER_TARGETS)):
        inject_adapter_in_model(_config(kind, fields, pattern), model)
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:  # initialized to ||W0||: move it off
                scale = 0.8 + 0.4 * torch.rand(param.shape, generator=generator)
                param.copy_(param * scale)
            elif any(part in name for part in ("hada_", "lokr_", "lora_A", "lora_B")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


COMPONENTS = ("unet", "text_encoder")


def peft_layers(pipe: Any, components: tuple[str, ...] = COMPONENTS) -> dict[str, Any]:
    """`<component>.<module path>` -> the PEFT layer of every adapted module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        f"{component}.{name}": layer
        for component in components
        for name, layer in getattr(pipe, component).named_modules()
        if isinstance(layer, BaseTunerLayer)
    }


@torch.no_grad()
def peft_deltas(pipe: Any, components: tuple[str, ...] = COMPONENTS) -> dict[str, torch.Tensor]:
    """What PEFT trained: each module's W' - W0 in float32 (DoRA: merge, read, unmerge)."""
    deltas = {}
    for target, layer in peft_layers(pipe, components).items():
        base = layer.get_base_layer().weight
        before = base.detach().clone().float()
        layer.merge()
        deltas[target] = base.detach().float() - before
        layer.unmerge()
    return deltas


def write_adapter_file(pipe: Any, case: str, path: Path) -> Path:
    """The adapter as the lora recipe writes it for these types: PEFT names under unet./text_encoder.,
    fp32, metadata tune_adapter_type and tune_adapter_config."""
    kind, fields = CASES[case]
    tensors = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        state = get_peft_model_state_dict(model, save_embedding_layers=False)
        tensors.update({f"{component}.{k}": v.detach().float().contiguous() for k, v in state.items()})
    metadata = {"tune_adapter_type": kind, "tune_adapter_config": json.dumps(fields)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
