"""Tiny SD2 and SDXL pipelines with the real module names, built offline from a seed (for tests).

Only widths shrink: block types, layers per block, transformer depths, the text towers' depths and every
module name are the real ones, so LoRA keys, SGM single-file names and kohya names on these tiny models
are the names the real SD2 / SDXL have (`../shared/reference/sdxl.md` section 4). Constraints found by
running, kept here on purpose:
- SDXL's two text encoders have different widths (16 and 24): single-file loading tells CLIP-L from bigG
  by width, and equal widths copy te1 into te2;
- te2's projection is not square (24 -> 32), so a transposed `text_projection` fails loudly;
- te2 has at least 10 layers (diffusers recognises SDXL single files by `resblocks.9`);
- `layers_per_block=2` (diffusers' and A1111's SGM name rules assume it).

`tiny-sdxl` has SDXL's transformer depths (1, 2, 10): 1680 U-Net tensors and 560 attention projections,
as the real model, for name and count checks. `tiny-sdxl-shallow` has depth 1 everywhere (its names are a
subset of SDXL's) and is three times cheaper per step, for training-loop tests. `tiny-sd2` is SD2's
layout (OpenCLIP-style gelu text tower, Linear transformer projections, v-prediction as SD2-768-v).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tune.models.tokenizer import DEFAULT_CORPUS, build_clip_tokenizer

SDXL_PAD_TOKEN = "!"
"""SDXL's tokenizer_2 (and SD2's OpenCLIP tokenizer) pads with "!", CLIP-L's with <|endoftext|>."""


@dataclass(frozen=True)
class FamilyPreset:
    """Widths of a tiny SD2 or SDXL preset; everything else is the real model's value."""

    family: str
    unet_block_out_channels: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    attention_heads: tuple[int, ...]
    """Heads per level (diffusers' `attention_head_dim`, which SD2 and SDXL configs use as a head count)."""
    text_hidden_size: int
    text_num_layers: int
    text_hidden_size_2: int = 0
    """SDXL's second text encoder (bigG); 0 for SD2."""
    text_num_layers_2: int = 0
    projection_dim: int = 0
    addition_time_embed_dim: int = 0
    resolution: int = 64
    vocab_size: int = 1280


FAMILY_PRESETS: dict[str, FamilyPreset] = {
    "tiny-sd2": FamilyPreset(
        family="sd2",
        unet_block_out_channels=(32, 64, 128, 128),  # SD2's 1:2:4:4, so the same conv_shortcuts exist
        transformer_layers_per_block=(1, 1, 1, 1),
        attention_heads=(1, 2, 4, 4),
        text_hidden_size=32,
        text_num_layers=3,
        resolution=32,
    ),
    "tiny-sdxl": FamilyPreset(
        family="sdxl",
        unet_block_out_channels=(32, 64, 128),
        transformer_layers_per_block=(1, 2, 10),
        attention_heads=(1, 1, 2),
        text_hidden_size=16,
        text_num_layers=12,
        text_hidden_size_2=24,
        text_num_layers_2=32,
        projection_dim=32,
        addition_time_embed_dim=8,
    ),
    "tiny-sdxl-shallow": FamilyPreset(
        family="sdxl",
        unet_block_out_channels=(32, 64, 128),
        transformer_layers_per_block=(1, 1, 1),
        attention_heads=(1, 1, 2),
        text_hidden_size=16,
        text_num_layers=2,
        text_hidden_size_2=24,
        text_num_layers_2=10,
        projection_dim=32,
        addition_time_embed_dim=8,
    ),
}

SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SD2_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD2_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _tokenizers(vocab_size: int) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Our offline BPE tokenizer twice: as CLIP-L's (pads with eos) and as OpenCLIP's (pads with "!")."""
    with tempfile.TemporaryDirectory(prefix="tune-tokenizer-") as tmp:
        first = build_clip_tokenizer(DEFAULT_CORPUS, vocab_size, tmp)
        second = CLIPTokenizer.from_pretrained(tmp, pad_token=SDXL_PAD_TOKEN)
    return first, second


def _text_config(
    tokenizer: CLIPTokenizer, hidden: int, layers: int, act: str, projection_dim: int = 0
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(resolution: int, levels: int, scaling_factor: float, force_upcast: bool) -> AutoencoderKL:
    widths = (32, 32, 64, 64)[:levels]
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _unet(spec: FamilyPreset, latent_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    sdxl = spec.family == "sdxl"
    extra = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": spec.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": 6 * spec.addition_time_embed_dim + spec.projection_dim,
        }
        if sdxl
        else {}
    )
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        down_block_types=SDXL_DOWN if sdxl else SD2_DOWN,
        up_block_types=SDXL_UP if sdxl else SD2_UP,
        block_out_channels=spec.unet_block_out_channels,
        transformer_layers_per_block=spec.transformer_layers_per_block,
        attention_head_dim=spec.attention_heads,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=32,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        **extra,
    )


def build_family_pipeline(name: str, seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A randomly initialised tiny SD2 or SDXL pipeline; the same name and seed give the same weights."""
    spec = FAMILY_PRESETS[name]
    tokenizer, tokenizer_2 = _tokenizers(spec.vocab_size)
    if spec.family == "sd2":
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            _text_config(tokenizer_2, spec.text_hidden_size, spec.text_num_layers, "gelu")
        )
        torch.manual_seed(seed + 1)
        vae = _vae(spec.resolution, 3, 0.18215, force_upcast=False)
        torch.manual_seed(seed + 2)
        unet = _unet(spec, spec.resolution // 4, spec.text_hidden_size)
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
            timestep_spacing="leading",
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        _text_config(tokenizer, spec.text_hidden_size, spec.text_num_layers, "quick_gelu")
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(
            tokenizer_2, spec.text_hidden_size_2, spec.text_num_layers_2, "gelu", spec.projection_dim
        )
    )
    torch.manual_seed(seed + 1)
    vae = _vae(spec.resolution, 4, 0.13025, force_upcast=True)
    torch.manual_seed(seed + 2)
    unet = _unet(spec, spec.resolution // 8, spec.text_hidden_size + spec.text_hidden_size_2)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
