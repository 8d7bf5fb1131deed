"""Load a Stable Diffusion base model from a diffusers folder, a single file, or (online) the hub.

Diffusers folders and single files of every family load (SD1.x, SD2.x, SDXL: `tune.models.families`
tells them apart).

Everything a user can get wrong here (a path that does not exist, a folder that is not a pipeline, a
LoRA or random file passed as a checkpoint, a checkpoint that does not match its config folder) is
raised as `tune.errors.ModelError` with one line that says what to do; the CLI prints it without a
traceback.

Single files (`.safetensors`, or `.ckpt`/`.pt` read with `torch.load(weights_only=True)`, which
refuses pickled code) hold weights only. diffusers needs a config folder too: any local diffusers folder
of the same family (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also
text_encoder_2/, tokenizer_2/) whose configs match the checkpoint's shapes. It is always passed to
`from_single_file(config=...)`: without it diffusers fetches configs from the hub, even when asked to stay
local, and guesses the family by real-model widths (a narrow SD2 reads as SD1). Pass it as `config=`;
without it we look, in order, for

    <dir>/<name>/            a diffusers folder named like the file without its suffix
    <dir>/                   the folder the file sits in, if it is itself a diffusers folder
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tune.errors import ModelError
from tune.models.families import FAMILY_NAMES, Family, family_of_checkpoint, family_of_folder
from tune.models.single_file import TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIX, convert_to_ldm
from tune.paths import DATA_ROOT, find_path

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# owner/name, as the hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PIPELINE_KWARGS = {"safety_checker": None, "requires_safety_checker": False}
PIPELINE_CLASSES: dict[Family, type] = {
    "sd1": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
"""The diffusers text-to-image pipeline of each family (SD2 shares SD1's; its scheduler says v-prediction)."""


def resolve_model_path(name: str | os.PathLike[str]) -> Path:
    """A model path as given when it exists, else the shipped one of that name (tune.paths.find_path)."""
    return find_path(name)


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub only reads them at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def load_pipeline(
    path_or_id: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    torch_dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline (no safety checker) from a diffusers folder, a single file or a hub id.

    `config` is the diffusers folder whose configs and tokenizer go with a single-file checkpoint; it
    is ignored for diffusers folders. Hub ids load only when not offline.
    """
    path = resolve_model_path(path_or_id)
    if path.is_dir():
        if config is not None:
            logger.warning("config=%s is only used for single-file checkpoints; ignoring it", config)
        return _load_diffusers_folder(path, torch_dtype)
    if path.is_file():
        return _load_single_file(path, config, torch_dtype)
    return _load_from_hub(str(path_or_id), torch_dtype)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _load_diffusers_folder(path: Path, torch_dtype: torch.dtype | None) -> StableDiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"{path} is a folder without model_index.json; pass a diffusers pipeline folder "
            "(as written by save_pretrained) or a single .safetensors checkpoint"
        )
    pipeline_class = PIPELINE_CLASSES[family_of_folder(path)]
    kwargs = _PIPELINE_KWARGS if pipeline_class is StableDiffusionPipeline else {"add_watermarker": False}
    try:
        pipe = pipeline_class.from_pretrained(path, local_files_only=True, dtype=torch_dtype, **kwargs)
    # Any failure inside diffusers here means unusable files, which the user has to fix, not a bug.
    except Exception as error:
        logger.debug("loading %s failed", path, exc_info=True)
        raise ModelError(
            f"could not load the diffusers folder {path} ({_one_line(error)}); check that it is a complete "
            "Stable Diffusion pipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also "
            "text_encoder_2/, tokenizer_2/)"
        ) from error
    _check_no_missing_weights(pipe, path)
    return pipe


def _load_from_hub(name: str, torch_dtype: torch.dtype | None) -> StableDiffusionPipeline:
    where = "" if Path(name).is_absolute() else f" (looked in {Path.cwd()} and {DATA_ROOT})"
    if not _HUB_ID.fullmatch(name):
        raise ModelError(f"no model file or folder at {name!r}{where}; check the path")
    if is_offline():
        raise ModelError(
            f"no local model at {name!r}{where}, and hub ids cannot be downloaded while HF_HUB_OFFLINE "
            "is set; pass a local diffusers folder or .safetensors file"
        )
    logger.info("loading %s from the Hugging Face hub", name)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(name, dtype=torch_dtype, **_PIPELINE_KWARGS)
    # Network, auth and missing-repo errors all mean the same thing to the user.
    except Exception as error:
        logger.debug("loading %s from the hub failed", name, exc_info=True)
        raise ModelError(
            f"could not load {name!r} from the Hugging Face hub ({_one_line(error)}); check the repo id, "
            "your network and access rights, or pass a local folder"
        ) from error
    _check_no_missing_weights(pipe, name)
    return pipe


# ---------------------------------------------------------------------------------------------
# single files
# ---------------------------------------------------------------------------------------------


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without loading a safetensors file's data."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as error:  # safetensors raises its own error type for any malformed file
            raise ModelError(f"{path} is not a readable .safetensors file ({_one_line(error)})") from error
    if suffix in TORCH_SUFFIXES:
        try:
            # weights_only refuses arbitrary pickled objects, so a .ckpt cannot run code on load.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:
            raise ModelError(
                f"could not read {path} safely as a PyTorch checkpoint ({_one_line(error)}); "
                "convert it to .safetensors with a tool you trust and load that"
            ) from error
        while isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ModelError(f"{path} does not hold a state dict; pass a Stable Diffusion checkpoint")
        return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    raise ModelError(
        f"{path} is not a model: expected a diffusers folder, a .safetensors file or a .ckpt file; got {path.suffix!r}"
    )


def _checkpoint_family(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> Family:
    """The family of a full checkpoint; a one-line ModelError for anything else (LoRA, embedding, ...)."""
    keys = list(shapes)
    family = family_of_checkpoint(keys)
    if family is not None:
        return family
    lowered = [key.lower() for key in keys]
    if any("lora" in key for key in lowered):
        raise ModelError(
            f"{path} is a LoRA file, not a full checkpoint; load a base model and apply the LoRA to it"
        )
    if any(key in {"emb_params", "string_to_param", "clip_l"} for key in lowered) or len(keys) <= 2:
        raise ModelError(
            f"{path} holds no model (a textual-inversion embedding?); pass a full Stable Diffusion checkpoint"
        )
    if any(
        key.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers."))
        for key in keys
    ):
        raise ModelError(
            f"{path} holds the weights of one diffusers component; pass the pipeline folder that contains "
            "model_index.json instead"
        )
    raise ModelError(
        f"{path} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* tensors); "
        "pass a full SD1.x, SD2.x or SDXL .safetensors file or a diffusers folder"
    )


def _find_config_folder(path: Path, config: str | os.PathLike[str] | None, family: Family) -> Path:
    if config is not None:
        folder = resolve_model_path(config)
        if not (folder / "model_index.json").is_file():
            raise ModelError(
                f"config={str(config)!r} is not a diffusers folder (no model_index.json); pass the folder of "
                f"a {FAMILY_NAMES[family]} pipeline whose configs match the checkpoint"
            )
        _check_config_family(path, folder, family)
        return folder
    for candidate in (path.with_suffix(""), path.parent):
        if (candidate / "model_index.json").is_file():
            logger.info("using %s as the config folder for %s", candidate, path.name)
            _check_config_family(path, candidate, family)
            return candidate
    raise ModelError(
        f"{path} needs a config folder (the same model's configs + tokenizer as a diffusers folder): put one at "
        f"{path.with_suffix('')} (recipes, tune eval and the dashboard look there), or pass --config DIR to "
        "tune sample / tune lora (config= in Python)"
    )


def _check_config_family(path: Path, folder: Path, family: Family) -> None:
    found = family_of_folder(folder)
    if found != family:
        raise ModelError(
            f"{path.name} is a {FAMILY_NAMES[family]} checkpoint but the config folder {folder} is "
            f"{FAMILY_NAMES[found]}; pass config= a {FAMILY_NAMES[family]} diffusers folder"
        )


def _expected_shapes(folder: Path, family: Family) -> dict[str, tuple[int, ...]]:
    """LDM names and shapes the config folder's models would have, built on the meta device (no memory)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        text_encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
            if family == "sdxl"
            else None
        )
    checkpoint = convert_to_ldm(
        unet.state_dict(),
        unet.config,
        vae.state_dict(),
        vae.config,
        text_encoder.state_dict(),
        text_encoder_2.state_dict() if text_encoder_2 is not None else None,
        family=family,
    )
    return {key: tuple(tensor.shape) for key, tensor in checkpoint.items()}


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Some exporters store the VAE attention's 1x1 convs as Linear weights; both load.
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_matches_config(
    path: Path, shapes: Mapping[str, tuple[int, ...]], folder: Path, family: Family
) -> None:
    try:
        expected = _expected_shapes(folder, family)
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(
            f"could not read the model configs in {folder} ({_one_line(error)}); pass a complete "
            f"{FAMILY_NAMES[family]} diffusers folder as config"
        ) from error
    missing = [key for key in expected if key not in shapes]
    wrong = [key for key in expected if key in shapes and _squeeze(shapes[key]) != _squeeze(expected[key])]
    if missing or wrong:
        parts = []
        text = zip(TEXT_ENCODER_PREFIXES[family], ("text encoder", "text_encoder_2"), strict=False)
        for prefix, what in ((UNET_PREFIX, "unet"), (VAE_PREFIX, "vae"), *text):
            n_missing = sum(key.startswith(prefix) for key in missing)
            if n_missing:
                parts.append(f"{n_missing} {what} tensors missing")
        example = (
            f"{wrong[0]} is {shapes[wrong[0]]}, config expects {expected[wrong[0]]}"
            if wrong
            else f"e.g. {missing[0]}"
        )
        if wrong:
            parts.append(f"{len(wrong)} with other shapes")
        raise ModelError(
            f"{path.name} does not match the config folder {folder}: {', '.join(parts)} ({example}); "
            "pass config= a folder of the same architecture"
        )


def _load_single_file(
    path: Path, config: str | os.PathLike[str] | None, torch_dtype: torch.dtype | None
) -> StableDiffusionPipeline:
    shapes = _read_shapes(path)
    family = _checkpoint_family(path, shapes)
    folder = _find_config_folder(path, config, family)
    _check_matches_config(path, shapes, folder, family)
    pipeline_class = PIPELINE_CLASSES[family]
    kwargs = _PIPELINE_KWARGS if pipeline_class is StableDiffusionPipeline else {"add_watermarker": False}
    try:
        # config= always: without it diffusers fetches configs from the hub (sdxl.md section 6.1).
        pipe = pipeline_class.from_single_file(
            str(path), config=str(folder), local_files_only=True, dtype=torch_dtype, **kwargs
        )
    # The checks above catch the usual mistakes; anything left is still about the user's files.
    except Exception as error:
        logger.debug("from_single_file(%s) failed", path, exc_info=True)
        raise ModelError(
            f"could not load {path} with configs from {folder} ({_one_line(error)}); check that both are "
            f"the same {FAMILY_NAMES[family]} model"
        ) from error
    _check_no_missing_weights(pipe, path)
    return pipe


def _check_no_missing_weights(pipe: StableDiffusionPipeline, source: object) -> None:
    # diffusers builds models on the meta device and fills them from the file; anything the file
    # lacked stays on meta and would only fail later, deep inside a forward pass.
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if hasattr(pipe, "text_encoder_2") else ())
    for name in names:
        module = getattr(pipe, name, None)
        if module is None:
            raise ModelError(f"{source} has no {name}; pass a complete Stable Diffusion model")
        empty = [key for key, tensor in module.state_dict().items() if tensor.is_meta]
        if empty:
            raise ModelError(
                f"{source}: {len(empty)} {name} weights are missing (e.g. {empty[0]}); the files are incomplete"
            )
