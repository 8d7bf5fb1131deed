"""Live generation for the dashboard: base vs tuned images of one prompt and seed, on demand.

This module imports torch and diffusers (through tune.sampling), so the app imports it only when the
user asks for an image (a live prompt, a LoRA scale, a film strip): browsing stays torch-free.

"Tuned" is a second copy of the base model with the run's weights put in at a step (None: the export)
by `tune.personalize.weights.apply_run_weights`, as `tune eval` does: a lora run's adapter at the
slider's scale (plus its pivotal-tuning embedding), a textual_inversion run's embedding, a dreambooth
run's U-Net (and text encoder). Another step takes the weights out and puts that step's in.

Images are drawn with the settings of the run's step-0 samples (steps, guidance, scheduler, size,
negative prompt), so a live image of a grid prompt and seed matches the grid's.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dashboard.data import read_sample_set
from tune.errors import ModelError
from tune.runs import read_run
from tune.sampling import SCHEDULERS, Sample, generate

if TYPE_CHECKING:
    from tune.personalize.weights import AppliedWeights


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
        self._weights = contextlib.ExitStack()  # holds the tuned pipeline's weights in until closed
        self._applied: AppliedWeights | None = None
        self._applied_step: int | None = None  # the step asked for (a lora run's None may be a checkpoint)
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
        """The tuned pipeline at checkpoint `step` (None = the export); lora runs at `scale`."""
        from tune.personalize.weights import RECIPES, apply_run_weights

        if self.kind not in RECIPES:
            raise ModelError(
                f"live tuned images need a run of {', '.join(RECIPES)}; this is a {self.kind} run"
            )
        if self._tuned is None:
            self._tuned = self._load(self.base_model)
        if self._applied is None or self._applied_step != step:
            self._weights.close()  # the previous step's weights out: the base model again
            self._applied = None
            self._applied = self._weights.enter_context(
                apply_run_weights(self._tuned, self.run.path, step, lora_scale=scale)
            )
            self._applied_step = step
        elif self.has_scale:
            self._applied.set_lora_scale(scale)
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
