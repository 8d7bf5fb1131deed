"""Module names without a model: SD1.5, SD2.1 and SDXL skeletons on the meta device, and `read_lora`,
which maps a file onto the skeleton of its family (export, conversion and inspection load no model).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tune.lora.core import Lora, LoraModule
from tune.lora.keys import parse_lora
from tune.lora.read import peft_rules, read_lora_file

if TYPE_CHECKING:
    from tune.models.families import Family

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
# OpenCLIP-H as SD2's text encoder in transformers' form (23 of its 24 layers: the last is unused).
_SD2_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
}
# OpenCLIP bigG, SDXL's second text encoder, in transformers' form.
_SDXL_TEXT_ENCODER_2 = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# The real U-Net configs (stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0), less what
# does not change module names or kinds.
_SD2_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "sample_size": 96,
}
_SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}


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


@functools.cache
def module_skeleton(family: Family) -> dict[str, nn.Module]:
    """The family's real-size U-Net and text encoder(s) on the meta device (no memory, ~1 s for SDXL):
    what files of that family are mapped onto without a model. Read-only, shared between callers."""
    if family == "sd1":
        return sd1_module_skeleton()
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if family == "sd2":
            return {
                "unet": UNet2DConditionModel(**_SD2_UNET),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**_SD2_TEXT_ENCODER)),
            }
        return {
            "unet": UNet2DConditionModel(**_SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**_SD1_TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**_SDXL_TEXT_ENCODER_2)),
        }


def _cross_attention_width(lora: Lora) -> int | None:
    for target, pair in sorted(lora.modules.items()):
        if target.startswith("unet.") and target.endswith((".attn2.to_k", ".attn2.to_v")):
            return int(pair.down.shape[1]) if isinstance(pair, LoraModule) else None
    return None


def read_lora(path: str | Path, family: Family | None = None) -> Lora:
    """Read a LoRA file (any style `load_lora` reads) onto its family's module names, without a model.

    For export, conversion and inspection: names and kinds are checked, widths are not (any model of
    the family, from tune's tiny presets to the real one). The family is what the file says
    (`family_of_lora`: keys, metadata, widths, structure), else `family`, else SD1.x; a `family` the
    file contradicts is a one-line ModelError naming both.
    """
    from tune.models.families import check_same_family, family_of_lora

    path = Path(path)
    tensors, metadata = read_lora_file(path)
    found = family_of_lora(tensors, metadata)
    if found and family:
        check_same_family(f"LoRA {path}", found, family)
    family = found or family or "sd1"
    alpha_for, rank_for = peft_rules(path, metadata)
    return parse_lora(
        tensors,
        module_skeleton(family),
        alpha_for=alpha_for,
        rank_for=rank_for,
        metadata=metadata,
        source=str(path),
        check_shapes=False,
        family=family,
    )
