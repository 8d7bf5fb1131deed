"""Prior preservation: which class images a run trains beside the photos (the class prompt, the photos'
captions and the validation prompts with the trigger taken out), and drawing them with the base model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.errors import ConfigError, DataError
from tune.paths import find_path
from tune.personalize.config import PriorConfig
from tune.personalize.subject import Subject, without_trigger

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


@dataclass(frozen=True)
class Prior:
    """Resolved prior-preservation settings."""

    class_prompt: str
    num_class_images: int
    loss_weight: float
    class_dir: Path | None
    """Ready-made class images, or None to generate them."""
    prompts: tuple[str, ...] = ()
    """The prompts generated class images follow in turn (prior.from_captions); () means class_prompt alone."""


def resolve_prior(prior: PriorConfig, subject: Subject, validation: Sequence[str] = ()) -> Prior | None:
    """Prior preservation for this run (explicit keys, then the concept's settings, then defaults), or None.
    validation: the run's validation prompts, which class images follow too under `prior.from_prompts`."""
    concept_prior = subject.concept.prior_preservation if subject.concept is not None else None
    if prior.enabled is not None:
        enabled = prior.enabled
    elif concept_prior is not None:
        enabled = concept_prior.enabled
    else:
        enabled = bool(subject.class_prompt)
    if not enabled:
        return None
    if not subject.class_prompt:
        raise ConfigError(
            'prior preservation needs a class prompt: class_prompt="a photo of dog" (the subject\'s class), '
            "or turn it off with prior.enabled=false"
        )
    class_dir = (
        find_path(prior.class_dir)
        if prior.class_dir
        else (concept_prior.class_dir if concept_prior else None)
    )
    if class_dir is not None and not class_dir.is_dir():
        raise DataError(f"prior class_dir {class_dir} is not a folder of class images")
    count = prior.num_class_images or (concept_prior.num_class_images if concept_prior else 100)
    weight = (
        prior.loss_weight
        if prior.loss_weight is not None
        else (concept_prior.prior_loss_weight if concept_prior else 1.0)
    )
    prompts: tuple[str, ...] = ()
    if class_dir is None:
        more = list(class_captions(subject)) if prior.from_captions else []
        if prior.from_prompts:
            more += [without_trigger(v, subject.token) for v in validation]
        prompts = tuple(dict.fromkeys([subject.class_prompt, *more]))
        prompts = prompts if len(prompts) > 1 else ()  # the class prompt alone keeps its cache key
    return Prior(subject.class_prompt, max(1, count), weight, class_dir, prompts)


def class_captions(subject: Subject) -> tuple[str, ...]:
    """The class prompt, then each distinct photo caption (a sidecar that contains the instance prompt) with
    the instance prompt replaced by the class prompt; () when no photo has such a caption."""
    from tune.data.captions import instance_caption
    from tune.data.sources import visible_images

    prompt = " ".join(subject.instance_prompt.split())
    found = set()
    for path in visible_images(subject.photos):  # the photos the loader reads, subfolders too
        caption, own = instance_caption(path, prompt)
        if own:
            at = caption.lower().index(prompt.lower())
            found.add(caption[:at] + subject.class_prompt + caption[at + len(prompt) :])
    found.discard(subject.class_prompt)
    return (subject.class_prompt, *sorted(found)) if found else ()


def prepare_class_images(
    pipe: StableDiffusionPipeline,
    prior: Prior,
    settings: PriorConfig,
    *,
    base_hash: str,
    cache_dir: str,
    accelerator: Any,
) -> Path:
    """The folder of class images: the ready-made one, or the base model's (generated once, cached)."""
    from tune.data.class_images import generate_class_images

    if prior.class_dir is not None:
        return prior.class_dir
    result = generate_class_images(
        pipe,
        prior.prompts or prior.class_prompt,
        prior.num_class_images,
        base_hash=base_hash,
        seed=settings.seed,
        steps=settings.steps,
        guidance=settings.guidance,
        batch_size=settings.batch_size,
        cache_dir=cache_dir or None,
        accelerator=accelerator,
    )
    return result.folder
