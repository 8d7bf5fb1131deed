"""Live generation for the dashboard: base vs tuned images of one prompt and seed, on demand.

This module imports torch and diffusers (through tune.sampling), so the app imports it only when the
user asks for an image (a live prompt, a LoRA scale, a film strip): browsing stays torch-free.

What "tuned" is depends on the run's recipe (its run directory contract):

    lora                the base model + the run's adapter (export/pytorch_lora_weights.safetensors, or a
                        checkpoint's lora.safetensors for a given step) merged at a scale, plus the
                        pivotal-tuning embedding when the run exported one
    textual_inversion   the base model + export/learned_embeds.safetensors (or a checkpoint's)
    dreambooth          export/pipeline/ (a whole diffusers pipeline)

Images are drawn with the settings of the run's step-0 samples (steps, guidance, scheduler, size,
negative prompt), so a live image of a grid prompt and seed matches the grid's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from dashboard.data import read_sample_set
from tune.errors import ModelError
from tune.runs import read_run, step_dir_name
from tune.sampling import SCHEDULERS, Sample, generate

EMBEDDINGS_FILE = "learned_embeds.safetensors"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LiveModel:
    """The base and tuned pipelines of one run, loaded on first use; safe to share between sessions
    (one image at a time: LoRA scales are merged into shared weights)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run = read_run(run_dir)
        self.kind = self.run.recipe
        self.base_model = str(self.run.info.get("base_model") or self.run.config.get("base_model") or "")
        if not self.base_model:
            raise ModelError(
                f"{self.run.path} records no base_model (run.json / config.toml); cannot generate"
            )
        self._lock = threading.Lock()
        self._base: Any = None
        self._tuned: Any = None
        self._stack: Any = None
        self._tuned_step: int | None | str = "unloaded"
        first = min(self.run.sample_steps) if self.run.sample_steps else None
        found = read_sample_set(self.run.samples_at(first), first) if first is not None else None
        self.settings = _generate_settings(found.settings if found else {})

    @property
    def has_scale(self) -> bool:
        return self.kind == "lora"

    def _load(self, path: str | Path) -> Any:
        from tune import models

        pipe = models.load_pipeline(str(models.resolve_model_path(path)))
        pipe.to(_device())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def base(self) -> Any:
        if self._base is None:
            self._base = self._load(self.base_model)
        return self._base

    def tuned(self, step: int | None = None, scale: float = 1.0) -> Any:
        """The tuned pipeline (for LoRA and textual inversion: at checkpoint `step`, None = final)."""
        if self.kind == "dreambooth":
            if self._tuned is None:
                folder = self.run.path / "export" / "pipeline"
                if not (folder / "model_index.json").is_file():
                    raise ModelError(
                        f"{self.run.path} has no export/pipeline/ yet (the run has not finished)"
                    )
                self._tuned = self._load(folder)
            return self._tuned
        if self.kind not in ("lora", "textual_inversion"):
            raise ModelError(
                f"live tuned images need a lora, textual_inversion or dreambooth run; this is {self.kind}"
            )
        if self._tuned_step != step:
            self._tuned, self._stack = self._load(self.base_model), None
            self._tuned_step = step
            folder = (
                self.run.path / "export"
                if step is None
                else self.run.path / "checkpoints" / step_dir_name(step)
            )
            embeds = folder / EMBEDDINGS_FILE
            if embeds.is_file():
                from tune.tokens import load_embeddings

                token, _ = load_embeddings(embeds)
                self._tuned.load_textual_inversion(str(embeds), token=token)
            elif self.kind == "textual_inversion":
                raise ModelError(f"{folder} has no {EMBEDDINGS_FILE}")
            if self.kind == "lora":
                from tune import lora as lora_io

                adapter, _ = lora_io.find_run_adapter(self.run.path, step)
                self._stack = lora_io.LoraStack(self._tuned)
                self._stack.add(lora_io.load_lora(adapter, self._tuned), scale, name="run")
        if self._stack is not None and self._stack.scales.get("run") != scale:
            self._stack.set_scale("run", scale)
        return self._tuned

    def generate(
        self,
        prompt: str,
        seed: int,
        *,
        tuned: bool,
        scale: float = 1.0,
        step: int | None = None,
        trajectory_every: int = 0,
    ) -> Sample:
        """One image of `prompt` and `seed` from the base model or the tuned one."""
        with self._lock:
            pipe = self.tuned(step, scale) if tuned else self.base()
            [sample] = generate(
                pipe, prompt, int(seed), trajectory_every=trajectory_every, progress=False, **self.settings
            )
            return sample


def _generate_settings(index: dict[str, Any]) -> dict[str, Any]:
    """generate() keyword arguments from a prompts.json index (what the grid was drawn with)."""
    settings: dict[str, Any] = {}
    for key in ("steps", "guidance", "negative_prompt", "width", "height", "batch_size"):
        if index.get(key) is not None:
            settings[key] = index[key]
    if index.get("scheduler") in SCHEDULERS:  # otherwise it names the model's own class
        settings["scheduler"] = index["scheduler"]
    return settings
