"""What a LoRA file for each base family looks like: key prefixes, U-Net names, metadata, and the text
projections A1111 needs all of (see ../shared/reference/lora-formats.md section 0 and sdxl.md section 5).

    family  U-Net keys                          text keys                          ss_base_model_version
    sd1     lora_unet_<diffusers path>          lora_te_text_model_...             sd_v1
    sd2     lora_unet_<diffusers path>          lora_te_text_model_...             sd_v2 / sd_v2_v
    sdxl    lora_unet_<SGM path> (input_blocks) lora_te1_text_model_..., lora_te2_  sdxl_base_v1-0

SDXL U-Net keys use SGM names because A1111's diffusers-name rule misplaces SDXL's up-block-0 upsampler;
every other tool reads them. SD2's text encoder and SDXL's second one are OpenCLIP towers in A1111, where
q, k and v are one fused in_proj: A1111 applies a layer's q/k/v LoRA only when q, k, v and out_proj are
all in the file, so a layer with some of them gets zero pairs for the rest (they change nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tune.lora.core import AdapterModule, LoraModule
from tune.lora.lycoris import LohaModule
from tune.lora.sgm import unet_module_to_sgm

if TYPE_CHECKING:
    from tune.models.families import Family

# SDXL's U-Net layout as the SGM rule needs it (the same for every SDXL, tiny presets included).
SDXL_UNET_LAYOUT = {
    "layers_per_block": 2,
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sd2": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}
# The OpenCLIP text tower of each family (A1111 fuses its q/k/v).
_OPEN_CLIP_COMPONENT = {"sd2": "text_encoder", "sdxl": "text_encoder_2"}
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def kohya_unet_path(path: str, family: Family) -> str:
    """The U-Net module path a kohya key spells: SGM for SDXL, diffusers' otherwise."""
    return unet_module_to_sgm(path, SDXL_UNET_LAYOUT) if family == "sdxl" else path


def with_all_text_projections(modules: dict[str, AdapterModule], family: Family) -> dict[str, AdapterModule]:
    """`modules` plus zero pairs for the q/k/v/out_proj an OpenCLIP layer lacks (see the module doc)."""
    component = _OPEN_CLIP_COMPONENT.get(family)
    if component is None:
        return modules
    out = dict(modules)
    for target, pair in modules.items():
        head, _, leaf = target.rpartition(".")
        if not target.startswith(component + ".") or leaf not in _ATTENTION_PROJECTIONS:
            continue
        for other in _ATTENTION_PROJECTIONS:  # CLIP's four projections are all [width, width]
            out.setdefault(f"{head}.{other}", _zero_like(pair))
    return out


def _zero_like(module: AdapterModule) -> LoraModule:
    """A zero LoRA pair for a projection of the same width (LoHa/LoKr: rank 1; A1111 picks the type
    per module)."""
    if isinstance(module, LoraModule):
        return LoraModule(
            down=torch.zeros_like(module.down), up=torch.zeros_like(module.up), alpha=module.alpha
        )
    width = _out_width(module)
    return LoraModule(down=torch.zeros(1, width), up=torch.zeros(width, 1), alpha=1.0)


def _out_width(module: AdapterModule) -> int:
    """The output width of a LoHa or LoKr module: its delta's rows."""
    if isinstance(module, LohaModule):
        return int(module.w1a.shape[0])
    w1 = module.w1[0] if isinstance(module.w1, tuple) else module.w1
    w2 = module.w2[0] if isinstance(module.w2, tuple) else module.w2
    return int(w1.shape[0] * w2.shape[0])


def is_v_prediction(metadata: dict[str, str]) -> bool:
    """Whether a file's metadata says its base predicts v (kohya's sd_v2_v, ModelSpec's prediction_type)."""
    return (
        metadata.get("ss_base_model_version") == "sd_v2_v"
        or metadata.get("modelspec.prediction_type") == "v"
        or "-v/" in metadata.get("modelspec.architecture", "")
    )


def kohya_metadata(family: Family, v_prediction: bool) -> dict[str, str]:
    """The architecture metadata kohya writes (A1111 sorts LoRAs by ss_base_model_version)."""
    if family == "sdxl":
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.resolution": "1024x1024",
            "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        }
    if family == "sd2":
        return {
            "ss_base_model_version": "sd_v2_v" if v_prediction else "sd_v2",
            "ss_v2": "True",
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": f"stable-diffusion-v2-{'768-v' if v_prediction else '512'}/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        }
    return {  # SD1.x files stay exactly as they were before other families existed
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
    }
