"""Named model presets: SD1.5's module topology at small widths, built in-process from a seed.

Every preset keeps SD1.5's layout exactly (block types, two layers per block, 1x1-conv attention
projections, the time embedding, CLIP's text transformer), so module names such as
`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k` mean the same thing in a tiny test model,
in our own small base model and in real SD1.5. Recipes, LoRA naming and single-file export can then
be tested on the tiny preset and trusted on the real thing. Only widths, depths of the text encoder
and the VAE's downsampling factor change.
"""

from __future__ import annotations

import difflib
import logging
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tune.errors import ModelError
from tune.models.presets_families import FAMILY_PRESETS, build_family_pipeline
from tune.models.tokenizer import DEFAULT_CORPUS, build_clip_tokenizer

logger = logging.getLogger(__name__)

PresetName = Literal["tiny", "small"]

# SD1.5's block layout; also what `tune.models.single_file` knows how to export.
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"


@dataclass(frozen=True)
class Preset:
    """Widths of one preset. Everything not listed here is SD1.5's value."""

    resolution: int
    """Image side in pixels."""
    vae_block_out_channels: tuple[int, ...]
    """One entry per VAE level; the VAE downsamples by 2 ** (len - 1)."""
    vae_norm_num_groups: int
    unet_block_out_channels: tuple[int, int, int, int]
    """Keep SD1.5's 1:2:4:4 ratio: other ratios add or drop `conv_shortcut` modules."""
    unet_norm_num_groups: int
    unet_attention_heads: int
    """Heads per attention layer (diffusers stores this as `attention_head_dim`, as SD1.5 does)."""
    text_hidden_size: int
    text_num_layers: int
    text_num_heads: int
    vocab_size: int
    """Target size of the BPE vocabulary built from the default corpus."""
    vae_scaling_factor: float = 0.18215
    """SD's value as a starting point; a trained VAE should set it to 1 / std(latents)."""
    unet_down_block_types: tuple[str, ...] = DOWN_BLOCK_TYPES
    """SD1.5's (attention on the three outer levels); SDXL drops the outermost level's attention, the
    costliest one, with `DownBlock2D` there. The up blocks mirror these."""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor


PRESETS: dict[PresetName, Preset] = {
    # For tests: as small as SD1.5's topology allows, so a forward pass is milliseconds on a CPU.
    "tiny": Preset(
        resolution=32,
        vae_block_out_channels=(8, 16, 16),
        vae_norm_num_groups=4,
        # SD1.5's 1:2:4:4 width ratio, so the same resnets get a conv_shortcut as in SD1.5.
        unet_block_out_channels=(8, 16, 32, 32),
        unet_norm_num_groups=8,
        unet_attention_heads=2,
        text_hidden_size=32,
        text_num_layers=2,
        text_num_heads=2,
        # The default corpus runs out of merges at ~1,250 tokens, so this covers every corpus word.
        vocab_size=1280,
    ),
    # Starting point for our own 64 px base model (16x16 latents); widths to be tuned by training runs.
    "small": Preset(
        resolution=64,
        vae_block_out_channels=(32, 64, 64),
        vae_norm_num_groups=16,
        unet_block_out_channels=(32, 64, 128, 128),
        unet_norm_num_groups=16,
        unet_attention_heads=4,
        text_hidden_size=128,
        text_num_layers=4,
        text_num_heads=4,
        vocab_size=1280,
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name; unknown names get a did-you-mean."""
    for preset_name, preset in PRESETS.items():
        if name == preset_name:
            return preset
    names = [*PRESETS, *FAMILY_PRESETS]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ModelError(f"unknown model preset {name!r}; {hint}choose one of: {', '.join(names)}")


UP_BLOCK_FOR = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
"""The down blocks our U-Nets may use (SD1.x's and SDXL's), each with the up block that mirrors it."""


def mirror_block_types(down_block_types: tuple[str, ...]) -> tuple[str, ...]:
    """The up blocks that mirror `down_block_types` (attention where the matching down level has it)."""
    return tuple(UP_BLOCK_FOR[block] for block in reversed(down_block_types))


def build_unet(
    preset: Preset, cross_attention_dim: int | None = None, latent_channels: int = 4
) -> UNet2DConditionModel:
    """SD1.5's UNet2DConditionModel config with the preset's widths (weights from the global RNG)."""
    return UNet2DConditionModel(
        sample_size=preset.latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=preset.unet_down_block_types,
        mid_block_type=MID_BLOCK_TYPE,
        up_block_types=mirror_block_types(preset.unet_down_block_types),
        block_out_channels=preset.unet_block_out_channels,
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=preset.unet_norm_num_groups,
        norm_eps=1e-5,
        cross_attention_dim=cross_attention_dim or preset.text_hidden_size,
        attention_head_dim=preset.unet_attention_heads,
        use_linear_projection=False,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def build_vae(preset: Preset) -> AutoencoderKL:
    """SD1.5's AutoencoderKL layout (4 latent channels) with fewer, narrower levels."""
    levels = len(preset.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=preset.vae_block_out_channels,
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=preset.vae_norm_num_groups,
        sample_size=preset.resolution,
        scaling_factor=preset.vae_scaling_factor,
    )


def build_text_encoder(preset: Preset, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """CLIP ViT-L/14's text transformer (quick_gelu, 77 positions) with the preset's width and depth."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden_size,
        intermediate_size=4 * preset.text_hidden_size,
        num_hidden_layers=preset.text_num_layers,
        num_attention_heads=preset.text_num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler() -> DDIMScheduler:
    """SD1.5's noise schedule. DDIM rather than SD1.5's PNDM: same config keys, deterministic, good in
    few steps; `from_config` swaps it for any other scheduler."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )


def build_pipeline(preset: str = "tiny", seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> Any:
    """A randomly initialised StableDiffusionPipeline of the named preset (a StableDiffusionXLPipeline for
    the SDXL ones: `tune.models.presets_families`).

    The same preset and seed give bit-identical weights. Without a tokenizer, one is built from
    `DEFAULT_CORPUS` (deterministic too); the text encoder's vocabulary matches the tokenizer's size.
    """
    if preset in FAMILY_PRESETS:
        if tokenizer is not None:
            raise ModelError(f"preset {preset!r} builds its own tokenizers; pass no tokenizer")
        return build_family_pipeline(preset, seed)
    spec = get_preset(preset)
    if tokenizer is None:
        with tempfile.TemporaryDirectory(prefix="tune-tokenizer-") as tmp:
            tokenizer = build_clip_tokenizer(DEFAULT_CORPUS, spec.vocab_size, tmp)

    # Seed before each component so one component's shape does not shift another's weights.
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(spec, tokenizer)
    torch.manual_seed(seed + 1)
    vae = build_vae(spec)
    torch.manual_seed(seed + 2)
    unet = build_unet(spec)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    logger.debug("built %s pipeline (seed %d)", preset, seed)
    return pipe
