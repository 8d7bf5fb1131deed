"""The base model's parts trained from scratch by the `vae` and `clip` recipes: their builders, and where
the `unet` recipe finds and loads the vae and clip recipes' exports.

Layouts are SD1.5's (AutoencoderKL with 4 latent channels and a mid-block attention; CLIP's text and
vision transformers with quick_gelu) at the widths a recipe's config names; `tune.models.presets` builds
whole pipelines of fixed presets instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from tune.errors import ModelError


def build_autoencoder(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    resolution: int,
    latent_channels: int = 4,
) -> AutoencoderKL:
    """SD's AutoencoderKL layout (mid-block attention; SD's 4 latent channels unless told) at the given
    widths."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
    )


@torch.no_grad()
def sample_latents(
    vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator, batch_size: int = 64
) -> torch.Tensor:
    """Sampled posteriors of `pixels` (fp32), `batch_size` images at a time: SD's recipe sets the VAE's
    scaling_factor to 1 / their std, so the U-Net trains on unit-variance latents."""
    return torch.cat([vae.encode(c).latent_dist.sample(generator) for c in pixels.split(batch_size)]).float()


def build_clip_model(
    tokenizer: CLIPTokenizer,
    *,
    text: tuple[int, int, int],
    vision: tuple[int, int, int],
    resolution: int,
    patch_size: int,
    projection_dim: int,
) -> CLIPModel:
    """CLIP with `text` and `vision` towers of (hidden size, layers, heads) each, for `resolution` px
    images cut in `patch_size` patches. The text tower's settings are presets.build_text_encoder's, so
    it drops into the base model as its text encoder."""

    def tower(hidden_size: int, num_layers: int, num_heads: int) -> dict:
        return dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=4 * hidden_size,
            hidden_act="quick_gelu",
        )

    text_config = tower(*text) | dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = tower(*vision) | dict(image_size=resolution, patch_size=patch_size)
    return CLIPModel(
        CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    )


def clip_paths(clip: str | Path) -> tuple[Path, Path]:
    """The text tower's folder (text_encoder/ if there, else the CLIPModel folder) and the tokenizer's,
    in a `clip` recipe export.

    CLIPTextModel also loads from a whole CLIPModel folder: the text weights have the same names."""
    root = Path(clip)
    text_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    return text_dir, root / "tokenizer" if (root / "tokenizer").is_dir() else root


def check_base_parts(vae: str | Path, clip: str | Path) -> None:
    """A ModelError that says what to run when the `vae` recipe's export (an AutoencoderKL folder) or the
    `clip` recipe's (a CLIP model and tokenizer) is missing."""
    if not (Path(vae) / "config.json").is_file():
        raise ModelError(
            f"vae: no AutoencoderKL folder at {vae}; train one with `tune run vae` or set vae=PATH"
        )
    text_dir, tokenizer_dir = clip_paths(clip)
    has_tokenizer = any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "vocab.json"))
    if not (text_dir / "config.json").is_file() or not has_tokenizer:
        raise ModelError(
            f"clip: no CLIP model and tokenizer at {clip}; train one with `tune run clip` or set clip=PATH"
        )


def load_base_parts(
    vae: str | Path, clip: str | Path, device: torch.device | str
) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """The `vae` recipe's AutoencoderKL and the `clip` recipe's text tower, frozen, in eval mode and on
    `device`, and its tokenizer: the parts of the base model a U-Net trains against."""
    autoencoder = AutoencoderKL.from_pretrained(vae).requires_grad_(False).eval().to(device)
    text_dir, tokenizer_dir = clip_paths(clip)
    text_encoder = CLIPTextModel.from_pretrained(text_dir).requires_grad_(False).eval().to(device)
    return autoencoder, text_encoder, CLIPTokenizer.from_pretrained(tokenizer_dir)
