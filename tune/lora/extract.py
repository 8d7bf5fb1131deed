"""A PEFT-injected model's adapter as a `Lora` (`lora_from_peft`), and as the run directory's adapter
file (`save_adapter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tune.errors import ModelError
from tune.lora.core import Lora, LoraModule
from tune.lora.keys import _PEFT_PREFIX, _listing
from tune.lora.write import save_lora


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
    Each module's scale is baked into lora_B (alpha = r), so the file is for sampling, export and
    sharing; resume training from the accelerate state, not by loading this file into the adapter.
    """
    lora = lora_from_peft(unet, text_encoder, adapter_name, text_encoder_2=text_encoder_2)
    return save_lora(lora, path, "diffusers", dtype=dtype, metadata=metadata)
