"""During training: validation samples through the shared sampler, and the run.json summary."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tune.paths import find_path
from tune.personalize.config import PersonalizeConfig, SampleConfig
from tune.personalize.loading import cache_info
from tune.personalize.subject import Subject

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from tune.data.loader import PhotoDataset


def sample_validation(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    sample: SampleConfig,
    out_dir: Path,
    *,
    accelerator: Any,
    modules: Iterable[torch.nn.Module],
) -> None:
    """A prompts x seeds grid of `pipe` as it is now into `out_dir`; `modules` are put in eval mode
    meanwhile (LoRA dropout off) and back afterwards, and a schedule-free optimizer's evaluation weights
    are used. Only the main process samples (and writes); every process switches weights."""
    from tune.training import evaluation_weights

    with evaluation_weights(accelerator):
        if accelerator.is_main_process:
            _sample_grid(pipe, prompts, sample, out_dir, accelerator=accelerator, modules=modules)


def _sample_grid(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    sample: SampleConfig,
    out_dir: Path,
    *,
    accelerator: Any,
    modules: Iterable[torch.nn.Module],
) -> None:
    from tune.sampling import sample_grid

    modes = [(m, m.training) for m in modules]
    for m, _ in modes:
        m.eval()
    try:
        with accelerator.autocast():
            sample_grid(
                pipe,
                prompts,
                list(sample.seeds),
                out_dir,
                steps=sample.steps,
                guidance=sample.guidance,
                scheduler=sample.scheduler or None,
                negative_prompt=sample.negative_prompt or None,
                batch_size=sample.batch_size,
                progress=False,
            )
    finally:
        for m, mode in modes:
            m.train(mode)


def run_info(
    subject: Subject, cfg: PersonalizeConfig, base_hash: str, dataset: PhotoDataset, *, pipe: Any = None
) -> dict[str, Any]:
    """The facts run.json carries for eval, export and the dashboard; with the base `pipe`, also its
    family (`base_family`: sd1, sd2 or sdxl)."""
    family = {}
    if pipe is not None:
        from tune.models.families import family_of_pipeline

        family["base_family"] = family_of_pipeline(pipe)
    return {
        **family,
        "base_model": cfg.base_model,
        "base_model_hash": base_hash,
        "concept": str(find_path(cfg.concept).resolve()) if cfg.concept else "",
        "concept_name": subject.concept.name if subject.concept else "",
        "instance_dir": str(subject.photos),
        "instance_prompt": subject.instance_prompt,
        "class_prompt": subject.class_prompt,
        "trigger": subject.token,
        "class_word": subject.class_word,
        "photos": len(dataset.instance_indices),
        "class_images": len(dataset.prior_indices),
        "max_steps": cfg.max_steps,
        "cache": cache_info(dataset),
    }
