"""Which Stable Diffusion family a base model is: SD1.x, SD2.x or SDXL, told apart from the structure.

Widths cannot tell them apart (our tiny presets have real module names at toy widths), so the rules read
structure first, as `../shared/reference/sdxl.md` section 8 records:

- SDXL: the U-Net takes pooled text and size conditioning (`addition_embed_type == "text_time"`) and there
  is a second text encoder (`text_encoder_2`, OpenCLIP bigG in transformers' form, with a projection);
  single files hold `conditioner.embedders.*`.
- SD2: one OpenCLIP text tower (gelu activations) and Linear transformer projections
  (`use_linear_projection`); single files hold `cond_stage_model.model.*`. Often v-prediction.
- SD1: CLIP ViT-L (quick_gelu) and 1x1-conv projections; single files hold `cond_stage_model.transformer.*`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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


def prediction_type_of(pipe: Any) -> str:
    """epsilon or v_prediction, from the pipeline's scheduler config."""
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


def check_same_family(what: str, found: Family, expected: Family) -> None:
    """A file of another family than the base model: one line naming both."""
    if found != expected:
        raise ModelError(
            f"{what} is for {FAMILY_NAMES[found]} but the base model is {FAMILY_NAMES[expected]}; "
            f"use a {FAMILY_NAMES[found]} base model or a file made for {FAMILY_NAMES[expected]}"
        )
