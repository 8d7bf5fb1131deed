"""Export a pipeline as one Stable Diffusion 1.x checkpoint in the original (LDM/CompVis) layout.

This is the `.safetensors` file A1111, ComfyUI and diffusers' `from_single_file` load:

    model.diffusion_model.*                     U-Net (input_blocks / middle_block / output_blocks)
    first_stage_model.*                         VAE (encoder.down.N.block.M, mid.attn_1 as 1x1 convs)
    cond_stage_model.transformer.text_model.*   CLIP text encoder

No installed library converts diffusers -> LDM (diffusers only has the LDM -> diffusers direction in
`diffusers.loaders.single_file_utils`), so the mapping below is written by hand as the exact inverse of
that converter, derived from SD1.5's topology and parameterised by the U-Net config (number of
blocks, `layers_per_block`) and the VAE's number of levels. For SD1.5's own widths it gives the same
names as the diffusers repository's (unshipped) `scripts/convert_diffusers_to_original_stable_diffusion.py`. Any parameter it cannot place is an error,
so an unsupported architecture fails loudly instead of writing a file other tools load half-empty.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from tune.models.presets import UP_BLOCK_FOR, mirror_block_types
from tune.runs import atomic_file

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."

SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.bfloat16)

# diffusers ResnetBlock2D names -> LDM ResBlock names (U-Net only; the VAE keeps norm1/conv1/...).
_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_VAE_TOP_LEVEL = {
    "encoder.conv_in.": "encoder.conv_in.",
    "encoder.conv_out.": "encoder.conv_out.",
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_in.": "decoder.conv_in.",
    "decoder.conv_out.": "decoder.conv_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
    "quant_conv.": "quant_conv.",
    "post_quant_conv.": "post_quant_conv.",
}
# VAE mid-block attention: diffusers Linear -> LDM 1x1 Conv2d.
_VAE_ATTENTION_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _rename_unet_resnet(rest: str) -> str:
    for old, new in _UNET_RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(rest)


def _unet_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """One diffusers UNet2DConditionModel parameter name -> its LDM UNetModel name."""
    per_block = config["layers_per_block"] + 1  # one LDM slot per layer, plus the down/upsampler
    for old, new in _UNET_TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer + 1
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_unet_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_unet_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_unet_resnet(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the last layer's modules: slot 1 after a ResBlock, 2 after attention.
        slot = 2 if config["up_block_types"][block].startswith("CrossAttn") else 1
        return f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def _vae_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """One diffusers AutoencoderKL parameter name -> its LDM AutoencoderKL name."""
    levels = len(config["block_out_channels"])
    for old, new in _VAE_TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # LDM numbers decoder levels from the lowest resolution up, the reverse of diffusers' up_blocks.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        for old, new in _VAE_ATTENTION_RENAMES.items():
            if m[2].startswith(old):
                return f"{m[1]}.mid.attn_1.{new}{m[2][len(old) :]}"
    raise KeyError(key)


def _text_encoder_key_to_ldm(key: str) -> str:
    # transformers >= 5 flattened CLIPTextModel (no `text_model.` level); older versions still have it.
    return key.removeprefix("text_model.")


def _check_sd1_unet(config: Mapping[str, Any]) -> None:
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    # SD1.x's layout, or SDXL's choice of which levels attend (the up blocks mirror the down blocks).
    problems = []
    if not set(down) <= set(UP_BLOCK_FOR) or down[-1] != "DownBlock2D":
        problems.append(f"down_block_types={down}")
    elif up != list(mirror_block_types(down)):
        problems.append(f"up_block_types={up}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type={config['mid_block_type']}")
    if not isinstance(config["layers_per_block"], int):
        problems.append(f"layers_per_block={config['layers_per_block']}")
    if config.get("class_embed_type") or config.get("addition_embed_type"):
        problems.append("class/addition embeddings")
    if config.get("transformer_layers_per_block", 1) != 1:
        problems.append(f"transformer_layers_per_block={config['transformer_layers_per_block']}")
    if problems:
        raise ValueError(
            "single-file export supports the SD1.x U-Net layout only; this U-Net has " + ", ".join(problems)
        )


def _convert(
    state_dict: Mapping[str, torch.Tensor], rename: Callable[[str], str], prefix: str, what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        try:
            new_key = prefix + rename(key)
        except KeyError:
            raise ValueError(f"no SD1.x single-file name for {what} parameter {key!r}") from None
        if new_key in out:
            raise ValueError(f"two {what} parameters map to {new_key!r}")
        out[new_key] = tensor
    return out


def convert_to_ldm(
    unet_state_dict: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_state_dict: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_encoder_state_dict: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """diffusers state dicts -> one LDM-layout state dict (tensors are not copied; meta tensors work).

    Raises ValueError for a U-Net that is not SD1.x-shaped or any parameter without an LDM name.
    """
    _check_sd1_unet(unet_config)
    checkpoint = _convert(unet_state_dict, lambda k: _unet_key_to_ldm(k, unet_config), UNET_PREFIX, "unet")
    vae = _convert(vae_state_dict, lambda k: _vae_key_to_ldm(k, vae_config), VAE_PREFIX, "vae")
    for key, tensor in vae.items():
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses Linear layers.
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            vae[key] = tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor
    checkpoint.update(vae)
    checkpoint.update(
        _convert(text_encoder_state_dict, _text_encoder_key_to_ldm, TEXT_ENCODER_PREFIX, "text_encoder")
    )
    return checkpoint


def save_single_file(
    pipe: StableDiffusionPipeline, path: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write `pipe`'s unet, vae and text_encoder as one SD1.x checkpoint (LDM layout, safetensors).

    The tokenizer, scheduler and component configs are not part of the format: loading the file back
    with diffusers needs a diffusers folder with matching configs (`load_pipeline(file, config=folder)`).
    fp16 halves the file and is what other tools expect; fp32 round-trips bit-exactly.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}; got {dtype}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors; got {path.name!r}")
    checkpoint = convert_to_ldm(
        pipe.unet.state_dict(),
        pipe.unet.config,
        pipe.vae.state_dict(),
        pipe.vae.config,
        pipe.text_encoder.state_dict(),
    )
    tensors = {key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in checkpoint.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, size) as tmp:  # a crash mid-write leaves the old file (or none), never half of one
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    logger.info("wrote %d tensors (%s) to %s", len(tensors), dtype, path)
    return path
