"""Which Stable Diffusion family a base model is: SD1.x, SD2.x or SDXL, told apart from the structure.

Widths cannot tell them apart (our tiny presets have real module names at toy widths), so the rules read
structure first, as `../shared/reference/sdxl.md` section 8 records:

- SDXL: the U-Net takes pooled text and size conditioning (`addition_embed_type == "text_time"`) and there
  is a second text encoder (`text_encoder_2`, OpenCLIP bigG in transformers' form, with a projection);
  single files hold `conditioner.embedders.*`.
- SD2: one OpenCLIP text tower (gelu activations) and Linear transformer projections
  (`use_linear_projection`); single files hold `cond_stage_model.model.*`. Often v-prediction.
- SD1: CLIP ViT-L (quick_gelu) and 1x1-conv projections; single files hold `cond_stage_model.transformer.*`.

LoRA files say it by a second text encoder's keys, by their metadata (kohya's `ss_base_model_version`,
`modelspec.architecture`), by the cross-attention width of `attn2.to_k` (real models only) or by where
their U-Net attention sits (SDXL attends on other levels than SD1/SD2, and ten blocks deep). Embedding
files by their keys (SDXL: `clip_l` + `clip_g`) and, for one-tensor files, by the real widths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from tune.errors import ModelError

Family = Literal["sd1", "sd2", "sdxl"]
FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "sdxl")
FAMILY_NAMES: dict[Family, str] = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL",
}


def _family_from_configs(
    unet: dict[str, Any], text_encoder: dict[str, Any], has_second_encoder: bool
) -> Family:
    if unet.get("addition_embed_type") == "text_time" or has_second_encoder:
        return "sdxl"
    if text_encoder.get("hidden_act") == "gelu" or unet.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline (or anything with `unet` and `text_encoder` attributes)."""
    text_encoder = getattr(pipe, "text_encoder", None)
    te_config = text_encoder.config.to_dict() if text_encoder is not None else {}
    return _family_from_configs(
        dict(pipe.unet.config), te_config, getattr(pipe, "text_encoder_2", None) is not None
    )


def family_of_folder(path: str | Path) -> Family:
    """The family of a diffusers pipeline folder, read from its JSON configs alone (no weights loaded)."""
    folder = Path(path)

    def read(*parts: str) -> dict[str, Any]:
        file = folder.joinpath(*parts)
        try:
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError) as error:
            raise ModelError(f"{file} is not readable JSON ({error}); the model folder is damaged") from error

    index = read("model_index.json")
    if not index:
        raise ModelError(f"{folder} has no model_index.json; pass a diffusers pipeline folder")
    second = bool((index.get("text_encoder_2") or [None])[0])
    return _family_from_configs(read("unet", "config.json"), read("text_encoder", "config.json"), second)


def family_of_checkpoint(keys: Iterable[str]) -> Family | None:
    """The family of a single-file (LDM/SGM layout) checkpoint from its tensor names; None when the keys
    hold no full model."""
    names = list(keys)
    if not any(key.startswith("model.diffusion_model.") for key in names):
        return None
    if any(key.startswith("conditioner.embedders.") for key in names):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in names):
        return "sd2"
    return "sd1"


# attn2.to_k's in-features of the real models (the text width).
_CROSS_ATTENTION_WIDTHS: dict[int, Family] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Text widths of one-vector-per-token embedding files: CLIP ViT-L (SD1) and OpenCLIP-H (SD2).
_EMBEDDING_WIDTHS: dict[int, Family] = {768: "sd1", 1024: "sd2"}
# Where only SDXL has U-Net attention, in diffusers and in SGM spelling (`.` or `_`): a second and later
# transformer block (SD1/SD2 have depth 1), up block 0 (SD1/SD2's is attention-free; SGM output_blocks
# 0-2, slot 1). And where only SD1/SD2 have it: down block 0 (SGM input_blocks 1-2), a fourth level.
_SDXL_ONLY = re.compile(
    r"transformer_blocks[._][1-9]|up_blocks[._]0[._]attentions|output_blocks[._][0-2][._]1[._](?!conv)"
)
_SD_ONLY = re.compile(
    r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks[._][12][._]1[._]"
    r"|(down|up)_blocks[._]3[._]"
)


def _declared_family(metadata: Mapping[str, str]) -> Family | None:
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def family_of_lora(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Family | None:
    """The family a LoRA file is for, from its keys, metadata and shapes; None when nothing tells.

    In order: a second text encoder's keys (`lora_te2_`, `text_encoder_2.`) mean SDXL; then the
    metadata kohya and tune write; then attn2.to_k's width when it is a real model's (768/1024/2048); then
    the U-Net structure (attention where only SDXL has it means SDXL). Structure cannot tell SD1 from SD2.
    """
    keys = list(tensors)
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in keys):
        return "sdxl"
    declared = _declared_family(metadata or {})
    if declared:
        return declared
    for key in sorted(keys):
        if re.search(r"attn2[._]to_k[._](lora_down|lora_A|lora\.down|lora_linear_layer\.down)", key):
            width = int(tensors[key].shape[1])
            if width in _CROSS_ATTENTION_WIDTHS:
                return _CROSS_ATTENTION_WIDTHS[width]
            break
    unet = [key for key in keys if not key.startswith(("lora_te", "text_encoder"))]
    if any(_SDXL_ONLY.search(key) for key in unet) and not any(_SD_ONLY.search(key) for key in unet):
        return "sdxl"
    return None


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
"""An SDXL textual-inversion file's tensors, one per text encoder (A1111, ComfyUI, kohya, tune)."""


def family_of_embedding(tensors: Mapping[str, Any]) -> Family | None:
    """The family a textual-inversion file is for: SDXL for `clip_l` + `clip_g`; SD1 / SD2 for one tensor
    (diffusers names it after the token; A1111 `emb_params` / `string_to_param`) 768 / 1024 wide. None for
    other widths (tiny models): the caller compares the width with its base model's text width."""
    if all(key in tensors for key in SDXL_EMBEDDING_KEYS):
        return "sdxl"
    for key, tensor in tensors.items():
        if len(tensors) == 1 or key == "emb_params" or key.startswith("string_to_param"):
            return _EMBEDDING_WIDTHS.get(int(tensor.shape[-1]))
    return None


def prediction_type_of(pipe: Any) -> str:
    """epsilon or v_prediction, from the pipeline's scheduler config."""
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


def check_same_family(what: str, found: Family, expected: Family) -> None:
    """A file of another family than the base model: one line naming both."""
    if found != expected:
        raise ModelError(
            f"{what} is for {FAMILY_NAMES[found]} but the base model is {FAMILY_NAMES[expected]}; "
            f"use a base model of that family, or a file made for {FAMILY_NAMES[expected]}"
        )
