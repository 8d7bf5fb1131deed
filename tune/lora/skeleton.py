"""SD1.x module names without a model: the SD1.5 skeleton on the meta device, and `read_lora`, which
maps a file onto it (export, conversion and inspection load no model).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tune.errors import ModelError
from tune.lora.core import Lora
from tune.lora.keys import parse_lora
from tune.lora.read import _peft_alpha_rule, read_lora_file

# CLIP ViT-L/14's text tower, SD1.x's text encoder. Only module names, kinds and kernels are used.
_SD1_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
# Cross-attention widths that name another architecture than SD1.x (SD1.x is 768; tune's own presets
# are narrower, so narrower is fine).
_OTHER_ARCHITECTURES = {1024: "SD2.x (1024-wide OpenCLIP-H text)", 2048: "SDXL (2048-wide text)"}


@functools.cache
def sd1_module_skeleton() -> dict[str, nn.Module]:
    """SD1.5's U-Net and CLIP-L text encoder at real size on the meta device (no memory, ~0.2 s).

    What files are mapped onto when no model is loaded (export, convert, inspect): SD1.x has one
    module topology whatever the widths, so its names, Linear/Conv2d kinds and kernels are all a
    file needs to match. Treat the modules as read-only: they are shared between callers.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    from tune.models.presets import Preset, build_unet

    sd15 = Preset(
        resolution=512,
        vae_block_out_channels=(128, 256, 512, 512),
        vae_norm_num_groups=32,
        unet_block_out_channels=(320, 640, 1280, 1280),
        unet_norm_num_groups=32,
        unet_attention_heads=8,
        text_hidden_size=768,
        text_num_layers=12,
        text_num_heads=12,
        vocab_size=49408,
    )
    with torch.device("meta"):
        unet = build_unet(sd15)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_SD1_TEXT_ENCODER))
    return {"unet": unet, "text_encoder": text_encoder}


def _declared_architecture(metadata: Mapping[str, str]) -> str | None:
    """What the file's metadata says it is for, when that is not SD1.x."""
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "SDXL"
    if (
        metadata.get("ss_v2") == "True"
        or version.startswith("sd_v2")
        or architecture.startswith("stable-diffusion-v2")
    ):
        return "SD2.x"
    return None


def _cross_attention_width(lora: Lora) -> int | None:
    for target, pair in sorted(lora.modules.items()):
        if target.startswith("unet.") and target.endswith((".attn2.to_k", ".attn2.to_v")):
            return int(pair.down.shape[1])
    return None


def read_lora(path: str | Path) -> Lora:
    """Read a LoRA file (any style `load_lora` reads) onto SD1.x's module names, without a model.

    For export, conversion and inspection: names and kinds are checked, widths are not (any SD1.x
    topology model, from tune's tiny preset to SD1.5). Raises ModelError for files made for SD2.x or
    SDXL, by their metadata or their 1024/2048-wide cross-attention.
    """
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    declared = _declared_architecture(metadata)
    if declared:
        raise ModelError(f"{path} is a {declared} LoRA (by its metadata); tune reads SD1.x LoRAs only")
    lora = parse_lora(
        tensors,
        sd1_module_skeleton(),
        alpha_for=_peft_alpha_rule(path, metadata),
        metadata=metadata,
        source=str(path),
        check_shapes=False,
    )
    width = _cross_attention_width(lora)
    if width in _OTHER_ARCHITECTURES:
        raise ModelError(
            f"{path} looks like a {_OTHER_ARCHITECTURES[width]} LoRA; tune reads SD1.x LoRAs only"
        )
    return lora
