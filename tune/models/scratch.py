"""The base model's parts trained from scratch by the `vae` and `clip` recipes: their builders, and where
the `unet` recipe finds and loads the vae and clip recipes' exports.

Layouts are SD1.5's (AutoencoderKL with 4 latent channels and a mid-block attention; CLIP's text and
vision transformers with quick_gelu) at the widths a recipe's config names; `tune.models.presets` builds
whole pipelines of fixed presets instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, Transformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file
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


def unet_weight_files(folder: str | Path) -> list[Path]:
    """A diffusers U-Net folder's weight files, or a ModelError that says what to pass."""
    files = sorted(Path(folder).glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise ModelError(
            f"init_unet: no diffusion_pytorch_model.safetensors in {folder}; pass a U-Net folder "
            "(models/world-base/unet, or a unet run's export/pipeline/unet)"
        )
    return files


def init_unet_from(unet: UNet2DConditionModel, folder: str | Path) -> list[str]:
    """Start `unet` from another U-Net's weights (a diffusers folder): every tensor the folder holds is
    copied (same name and shape, or a ModelError); the tensors it lacks (attention added on a level) keep
    their initialisation, each new transformer block's output projection zeroed, so that it starts as the
    identity and the copy draws what the folder's U-Net drew. Returns the new tensors' names."""
    state: dict[str, torch.Tensor] = {}
    for file in unet_weight_files(folder):
        state |= load_file(str(file))
    own = unet.state_dict()
    misfits = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if misfits:
        raise ModelError(
            f"init_unet: {len(misfits)} tensors of {folder} do not fit this U-Net (first: {misfits[0]}); "
            "its widths and levels must be the config's"
        )
    unet.load_state_dict(state, strict=False)
    new = sorted(set(own) - set(state))
    with torch.no_grad():
        for name, module in unet.named_modules():
            if isinstance(module, Transformer2DModel) and f"{name}.proj_out.weight" in new:
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
    return new
