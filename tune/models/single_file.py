"""Export a pipeline as one Stable Diffusion checkpoint in the original (LDM / SGM) layout.

This is the `.safetensors` file A1111, ComfyUI and diffusers' `from_single_file` load:

    model.diffusion_model.*                          U-Net (input_blocks / middle_block / output_blocks)
    first_stage_model.*                              VAE (encoder.down.N.block.M, mid.attn_1 as 1x1 convs)
    SD1.x  cond_stage_model.transformer.text_model.*      CLIP ViT-L text encoder (transformers' names)
    SD2.x  cond_stage_model.model.*                       OpenCLIP-H text tower, OpenCLIP's names
    SDXL   conditioner.embedders.0.transformer.text_model.*   CLIP-L (transformers' names)
           conditioner.embedders.1.model.*                    OpenCLIP bigG, OpenCLIP's names

OpenCLIP's names: `transformer.resblocks.N.{ln_1, ln_2, attn.in_proj_weight/bias (q, k, v stacked),
attn.out_proj, mlp.c_fc, mlp.c_proj}`, `token_embedding.weight`, `positional_embedding`, `ln_final.*` and
`text_projection` = the transformers Linear weight transposed ([width, proj]: OpenCLIP computes x @ P;
diffusers and ComfyUI transpose it on load, kohya's converter does not and is wrong there).

No installed library converts diffusers -> LDM/SGM (diffusers only has the other direction, in
`diffusers.loaders.single_file_utils`), so the mapping is written by hand as the inverse of that
converter: the U-Net rule is `tune.lora.sgm`, parameterised by the U-Net config; the VAE's by its number of
levels. Any parameter it cannot place is an error, so an unsupported architecture fails loudly instead of
writing a file other tools load half-empty.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tune.durable import atomic_file
from tune.lora.sgm import unet_key_to_sgm
from tune.models.families import Family, family_of_pipeline
from tune.models.presets import UP_BLOCK_FOR, mirror_block_types

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
"""SD1.x's text encoder."""
TEXT_ENCODER_PREFIXES: dict[Family, tuple[str, ...]] = {
    "sd1": (TEXT_ENCODER_PREFIX,),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."),
}
"""Where each family's text encoder(s) live in a single file (text_encoder, then text_encoder_2)."""

SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.bfloat16)

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


def _text_model_key(key: str) -> str:
    # transformers >= 5 flattened CLIPTextModel (no `text_model.` level); older versions still have it.
    return key.removeprefix("text_model.")


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def _open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict in OpenCLIP's names (see the module doc)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name = _text_model_key(key)
        if name == "embeddings.position_ids":
            continue  # a buffer, not a weight; OpenCLIP has none
        if name == "text_projection.weight":
            out["text_projection"] = tensor.T
            continue
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = tensor
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise KeyError(key)
        block, rest = f"transformer.resblocks.{m[1]}.", m[2]
        if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            qkv.setdefault(f"{block}attn.in_proj_{q[2]}", {})[q[1]] = tensor
            continue
        for old, new in _OPEN_CLIP_LAYER.items():
            if rest.startswith(old):
                out[block + new + rest[len(old) :]] = tensor
                break
        else:
            raise KeyError(key)
    for key, parts in qkv.items():
        if parts.keys() != {"q", "k", "v"}:
            raise KeyError(f"{key}: q, k and v projections are needed, got {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _check_unet(config: Mapping[str, Any], family: Family) -> None:
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    sdxl = family == "sdxl"
    problems = []
    # SD1.x's layout, SDXL's, or SD1.x with SDXL's choice of which levels attend (up mirrors down).
    if not set(down) <= set(UP_BLOCK_FOR) or (down[-1] != "DownBlock2D" and not sdxl):
        problems.append(f"down_block_types={down}")
    elif up != list(mirror_block_types(down)):
        problems.append(f"up_block_types={up}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type={config['mid_block_type']}")
    if not isinstance(config["layers_per_block"], int):
        problems.append(f"layers_per_block={config['layers_per_block']}")
    if config.get("class_embed_type") or config.get("addition_embed_type") not in (
        ("text_time", None) if sdxl else (None,)
    ):
        problems.append("class/addition embeddings")
    depth = config.get("transformer_layers_per_block", 1)
    if not sdxl and set(depth if isinstance(depth, (list, tuple)) else [depth]) != {1}:
        problems.append(f"transformer_layers_per_block={depth}")
    if problems:
        layout = "SDXL" if sdxl else "SD1.x"
        raise ValueError(
            f"single-file export supports the {layout} U-Net layout only; this U-Net has "
            + ", ".join(problems)
        )


def _convert(
    state_dict: Mapping[str, torch.Tensor], rename: Callable[[str], str], prefix: str, what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        try:
            new_key = prefix + rename(key)
        except KeyError:
            raise ValueError(f"no single-file name for {what} parameter {key!r}") from None
        if new_key in out:
            raise ValueError(f"two {what} parameters map to {new_key!r}")
        out[new_key] = tensor
    return out


def _text_encoders(
    family: Family,
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    prefixes = TEXT_ENCODER_PREFIXES[family]
    if family == "sd2":
        try:
            converted = _open_clip_state_dict(text_encoder)
        except KeyError as error:
            raise ValueError(f"no single-file name for text_encoder parameter {error}") from None
        return {prefixes[0] + key: tensor for key, tensor in converted.items()}
    out = _convert(text_encoder, _text_model_key, prefixes[0], "text_encoder")
    if family == "sdxl":
        if text_encoder_2 is None:
            raise ValueError("an SDXL single file needs text_encoder_2's weights")
        try:
            converted = _open_clip_state_dict(text_encoder_2)
        except KeyError as error:
            raise ValueError(f"no single-file name for text_encoder_2 parameter {error}") from None
        out.update({prefixes[1] + key: tensor for key, tensor in converted.items()})
    return out


def convert_to_ldm(
    unet_state_dict: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_state_dict: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_encoder_state_dict: Mapping[str, torch.Tensor],
    text_encoder_2_state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    family: Family = "sd1",
) -> dict[str, torch.Tensor]:
    """diffusers state dicts -> one LDM/SGM-layout state dict (tensors are not copied, except q/k/v,
    which OpenCLIP stacks; meta tensors work).

    Raises ValueError for a U-Net not of the family's layout or any parameter without a single-file name.
    """
    _check_unet(unet_config, family)
    checkpoint = _convert(unet_state_dict, lambda k: unet_key_to_sgm(k, unet_config), UNET_PREFIX, "unet")
    vae = _convert(vae_state_dict, lambda k: _vae_key_to_ldm(k, vae_config), VAE_PREFIX, "vae")
    for key, tensor in vae.items():
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses Linear layers.
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            vae[key] = tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor
    checkpoint.update(vae)
    checkpoint.update(_text_encoders(family, text_encoder_state_dict, text_encoder_2_state_dict))
    return checkpoint


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """A loaded pipeline of any family as one LDM/SGM-layout state dict (see `convert_to_ldm`)."""
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    return convert_to_ldm(
        pipe.unet.state_dict(),
        pipe.unet.config,
        pipe.vae.state_dict(),
        pipe.vae.config,
        pipe.text_encoder.state_dict(),
        text_encoder_2.state_dict() if text_encoder_2 is not None else None,
        family=family_of_pipeline(pipe),
    )


def save_single_file(pipe: Any, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `pipe`'s unet, vae and text encoder(s) as one checkpoint of its family (safetensors).

    The tokenizers, scheduler and component configs are not part of the format: loading the file back
    with diffusers needs a diffusers folder with matching configs (`load_pipeline(file, config=folder)`).
    fp16 halves the file and is what other tools expect; fp32 round-trips bit-exactly.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}; got {dtype}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors; got {path.name!r}")
    checkpoint = pipeline_to_ldm(pipe)
    tensors = {key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in checkpoint.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, size) as tmp:  # a crash mid-write leaves the old file (or none), never half of one
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    logger.info("wrote %d tensors (%s) to %s", len(tensors), dtype, path)
    return path
