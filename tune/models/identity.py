"""A base model's identity, independent of how it was stored or loaded.

`tune_base_model_hash` is `base_model_hash()`: sha256 over the U-Net and text-encoder weight values
(name, shape, float32 little-endian bytes, in name order), independent of file layout and load dtype.
It names the base a run trained on (run.json's `base_model_hash`, `tune_base_model_hash` in exported
files) and keys what is cached per base (class images).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

# The canonical spelling of CLIPTextModel's names (transformers < 5, and every LoRA file). Spelled here,
# not borrowed from tune.lora's key mapping: the hash is stored in files and run directories, so it must
# not change when the LoRA code does.
_TEXT_MODEL_LEVEL = "text_model."


def base_model_hash(
    unet: nn.Module, text_encoder: nn.Module | None = None, text_encoder_2: nn.Module | None = None
) -> str:
    """`tune_base_model_hash`: sha256 over the U-Net's and text encoders' weights (not the VAE's: a
    LoRA never touches it, and VAEs are swapped freely). `text_encoder_2` is SDXL's second encoder;
    without one (SD1.x, SD2.x) the hash is what it always was.

    Hashed per tensor in name order: the name (text-encoder names in the canonical `text_model.`
    spelling), the shape, then the values as little-endian float32. So the hash names the weights
    themselves, whatever file layout (diffusers folder, single file) or load dtype they came from
    (fp16 -> fp32 is exact), and whatever transformers version named the modules. PEFT adapter
    tensors are skipped and `.base_layer` is dropped, so an injected model hashes as its base.
    """
    digest = hashlib.sha256()
    components = (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    for component, model in components:
        if model is None:
            continue
        state = {}
        for key, tensor in model.state_dict().items():
            if "lora_" in key:
                continue
            name = key.replace(".base_layer.", ".")
            if component.startswith("text_encoder") and not name.startswith(_TEXT_MODEL_LEVEL):
                name = _TEXT_MODEL_LEVEL + name
            state[f"{component}.{name}"] = tensor
        for name in sorted(state):
            tensor = state[name].detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()
