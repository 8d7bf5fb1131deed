"""The run directory files of LoRA runs: adapter paths, finding a run's adapter, export paths and metadata.

Run directory contract of LoRA runs (the lora recipe writes, `tune export` and the dashboard read):

    <run>/config.toml, <run>/run.json         via tune.runs; run.json carries "recipe", "base_model"
                                              (path or hub id), "instance_prompt" and/or "trigger", and
                                              optionally "base_model_hash" (= base_model_hash(unet,
                                              text_encoder) before injection; else export computes it)
    <run>/checkpoints/step_NNNNNN/lora.safetensors     the adapter at step N (diffusers format above),
                                              written with save_adapter(...) before the COMPLETE marker
    <run>/export/pytorch_lora_weights.safetensors      the final adapter, save_adapter(...) at the end
    <run>/export/<run name>[-step_NNNNNN].safetensors  `tune export` (kohya, the default)
    <run>/export/diffusers[-step_NNNNNN]/pytorch_lora_weights.safetensors   `tune export --format diffusers`

    A recipe does:  save_adapter(unet, text_encoder, run.checkpoint_dir(step) / CHECKPOINT_ADAPTER,
                                 {"tune_step": str(step)})   # text_encoder=None if not trained
                    save_adapter(unet, text_encoder, final_adapter_path(run.path))
    and, optionally, export_run(run.path, "kohya") for a ready-to-share file.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from tune.errors import ConfigError, ModelError, TuneError
from tune.lora.core import ExportFormat

if TYPE_CHECKING:
    from tune.models.families import Family

logger = logging.getLogger(__name__)

CHECKPOINT_ADAPTER = "lora.safetensors"
FINAL_ADAPTER = "pytorch_lora_weights.safetensors"


def checkpoint_adapter_path(run_dir: str | Path, step: int) -> Path:
    """`<run>/checkpoints/step_NNNNNN/lora.safetensors`."""
    from tune.runs import step_dir_name

    return Path(run_dir) / "checkpoints" / step_dir_name(step) / CHECKPOINT_ADAPTER


def final_adapter_path(run_dir: str | Path) -> Path:
    """`<run>/export/pytorch_lora_weights.safetensors`."""
    return Path(run_dir) / "export" / FINAL_ADAPTER


def find_run_adapter(run_dir: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(adapter file, its step; None for the final adapter) of a LoRA run.

    With `step`: that checkpoint's adapter. Without: the final adapter, else the newest complete
    checkpoint's. Only checkpoints with their COMPLETE marker count.
    """
    from tune.runs import read_run

    run = read_run(run_dir)
    available = [s for s in run.checkpoint_steps if checkpoint_adapter_path(run.path, s).is_file()]
    listed = ", ".join(map(str, available)) or "none"
    if step is not None:
        path = checkpoint_adapter_path(run.path, step)
        if step not in available:
            why = "is not complete" if path.is_file() else "has no LoRA adapter"
            raise ConfigError(f"checkpoint step {step} of {run.path} {why}; steps with an adapter: {listed}")
        return path, step
    if final_adapter_path(run.path).is_file():
        return final_adapter_path(run.path), None
    if available:
        return checkpoint_adapter_path(run.path, available[-1]), available[-1]
    raise ModelError(
        f"{run.path} has no trained LoRA adapter yet (no export/{FINAL_ADAPTER} and no complete "
        f"checkpoints/step_*/{CHECKPOINT_ADAPTER}); is it a LoRA run that saved a checkpoint?"
    )


def default_export_path(run_dir: str | Path, format: ExportFormat, step: int | None) -> Path:
    """Where `tune export` writes without --out.

    kohya:     <run>/export/<run name>[-step_NNNNNN].safetensors  (the name A1111 and ComfyUI list)
    diffusers: <run>/export/diffusers[-step_NNNNNN]/pytorch_lora_weights.safetensors  (a folder, so
               `pipe.load_lora_weights(folder)` finds it; never the final adapter itself)
    """
    from tune.runs import step_dir_name

    run = Path(run_dir)
    suffix = f"-{step_dir_name(step)}" if step is not None else ""
    if format == "kohya":
        return run / "export" / f"{run.resolve().name}{suffix}.safetensors"
    return run / "export" / f"diffusers{suffix}" / FINAL_ADAPTER


def _find_value(config: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    """The first of `names` in a config, searched top-level first, then one table deep."""
    for name in names:
        if name in config:
            return config[name]
    for value in config.values():
        if isinstance(value, Mapping):
            for name in names:
                if name in value:
                    return value[name]
    return None


def _run_base_hash(info: Mapping[str, Any]) -> str | None:
    """run.json's `base_model_hash`, else computed by loading `base_model` (None if that fails)."""
    if info.get("base_model_hash"):
        return str(info["base_model_hash"])
    base = info.get("base_model")
    if not base:
        return None
    from tune.models import load_pipeline
    from tune.models.identity import base_model_hash

    logger.info("hashing base model %s (recipes can store base_model_hash in run.json to skip this)", base)
    try:
        pipe = load_pipeline(str(base))
    except TuneError as err:
        logger.warning("no tune_base_model_hash: cannot load the base model (%s)", err)
        return None
    return base_model_hash(pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))


def run_base_family(run_dir: str | Path) -> tuple[Family | None, bool]:
    """(family of the run's base model, whether it predicts v), read from its configs without loading
    weights: a diffusers folder's JSON files, a single file's tensor names. (None, False) when the base
    is not on disk (a hub id) or unreadable; callers then go by what the adapter file says."""
    import json

    from tune.runs import read_run

    run = read_run(run_dir)
    base = run.info.get("base_model") or _find_value(run.config, ("base_model", "pretrained_model"))
    if not base:
        return None, False
    from tune.models import resolve_model_path
    from tune.models.families import family_of_checkpoint, family_of_folder

    path = resolve_model_path(str(base))
    try:
        if path.is_dir():
            scheduler = path / "scheduler" / "scheduler_config.json"
            config = json.loads(scheduler.read_text()) if scheduler.is_file() else {}
            return family_of_folder(path), config.get("prediction_type") == "v_prediction"
        if path.is_file() and path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return family_of_checkpoint(f.keys()), False
    except (TuneError, OSError, ValueError, SafetensorError) as err:
        logger.warning("cannot tell the family of the base model %s (%s)", base, err)
    return None, False


def run_metadata(run_dir: str | Path, *, output_name: str, step: int | None) -> dict[str, str]:
    """The descriptive metadata `tune export` writes (A1111 shows ss_*; modelspec.* is Stability's
    ModelSpec; tune_* are ours): name, trigger, recipe, resolved config and base model hash."""
    from tune import __version__
    from tune.runs import read_run

    run = read_run(run_dir)
    config, info = run.config, run.info
    trigger = (
        info.get("trigger")
        or info.get("instance_prompt")
        or _find_value(config, ("trigger", "instance_prompt"))
    )
    base = str(info.get("base_model") or _find_value(config, ("base_model", "pretrained_model")) or "")
    title = run.path.resolve().name + (f" step {step}" if step is not None else "")
    comment = f"trained with tune ({run.recipe} recipe)" + (f"; trigger: {trigger}" if trigger else "")
    metadata = {
        "ss_output_name": output_name,
        "ss_training_comment": comment,
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tune_recipe": run.recipe,
        "tune_config": (run.path / "config.toml").read_text(encoding="utf-8"),
        "tune_step": "final" if step is None else str(step),
        "tune_version": __version__,
    }
    if trigger:
        metadata["modelspec.trigger_phrase"] = str(trigger)
    if base:
        metadata["ss_sd_model_name"] = Path(base).name
        metadata["tune_base_model"] = base
    resolution = _find_value(config, ("resolution",))
    if isinstance(resolution, int):
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    base_hash = _run_base_hash(info | {"base_model": base})
    if base_hash:
        metadata["tune_base_model_hash"] = base_hash
    return metadata
