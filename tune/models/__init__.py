"""Base models: named presets, loading diffusers folders and single files, single-file export."""

from tune.models.loading import load_pipeline, resolve_model_path
from tune.models.presets import PRESETS, Preset, build_pipeline
from tune.models.single_file import save_single_file
from tune.models.tokenizer import build_clip_tokenizer

__all__ = [
    "PRESETS",
    "Preset",
    "build_clip_tokenizer",
    "build_pipeline",
    "load_pipeline",
    "resolve_model_path",
    "save_single_file",
]
