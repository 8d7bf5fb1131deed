"""diffusers <-> LDM/SGM U-Net names: `down_blocks.1.attentions.0.proj_in` <-> `input_blocks.4.1.proj_in`.

The original Stable Diffusion code (LDM for SD1.x/SD2.x, SGM for SDXL) numbers the U-Net's blocks
`input_blocks.N.M` / `middle_block.M` / `output_blocks.N.M`; single-file checkpoints and SDXL's kohya LoRA
keys use those names. No installed library maps diffusers -> LDM (diffusers converts only the other way,
inside its single-file loader), so the rule is written by hand, parameterised by the U-Net config
(`layers_per_block`, which up blocks attend); see ../shared/reference/lora-formats.md section 5. SD1.5
and SDXL give the names ComfyUI's `unet_to_diffusers` and kohya's conversion maps give (tested).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# diffusers ResnetBlock2D names -> LDM ResBlock names (U-Net only; the VAE keeps norm1/conv1/...).
_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's pooled-text + size embedding
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _rename_resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(rest)


def unet_key_to_sgm(key: str, config: Mapping[str, Any]) -> str:
    """One diffusers UNet2DConditionModel parameter name (`...conv1.weight`) -> its LDM/SGM name.

    Raises KeyError for a name outside the SD U-Net layout."""
    per_block = config["layers_per_block"] + 1  # one LDM slot per layer, plus the down/upsampler
    for old, new in _TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer + 1
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the last layer's modules: slot 1 after a ResBlock, 2 after attention
        # (SDXL's up block 0 attends, so its upsampler is output_blocks.2.2.conv; SD1's is 2.1).
        slot = 2 if config["up_block_types"][block].startswith("CrossAttn") else 1
        return f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def unet_module_to_sgm(path: str, config: Mapping[str, Any]) -> str:
    """A U-Net module path (`down_blocks.1.downsamplers.0.conv`) -> its SGM path (`input_blocks.6.0.op`)."""
    return unet_key_to_sgm(path + ".weight", config).removesuffix(".weight")
