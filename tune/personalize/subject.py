"""The subject being taught: from a concept folder or instance_dir + instance_prompt, its trigger word
and class, validation prompts, and the prior (class images drawn by the base model)."""

from __future__ import annotations

import dataclasses
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tune.errors import ConfigError, DataError
from tune.paths import find_path
from tune.personalize.config import PersonalizeConfig, PivotalConfig, PriorConfig, SampleConfig
from tune.runs import check_not_in_use

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from tune.data.concepts import Concept
    from tune.tokens import NewTokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """What a personalization run teaches, resolved from a concept and/or explicit keys."""

    photos: Path
    instance_prompt: str
    class_prompt: str
    """"" when there is none."""
    token: str
    """The trigger word; "" when neither a concept nor `token` named one."""
    class_word: str
    """"" without a concept."""
    validation_prompts: tuple[str, ...]
    """Rendered validation prompts (the concept's; the recipe may replace them)."""
    concept: Concept | None = None

    def render(self, template: str) -> str:
        """Fill {token} and {class} (other braces are left alone)."""
        return template.replace("{token}", self.token).replace("{class}", self.class_word)


def resolve_subject(cfg: PersonalizeConfig) -> Subject:
    """The subject from `cfg.concept` and/or `instance_dir`, `instance_prompt`, `class_prompt`, `token`.

    The recipes call it first, so it also refuses an `output_dir` that another run is writing: that
    error then comes before the base model loads (start_run takes the lock itself later)."""
    from tune.data.concepts import load_concept

    if cfg.output_dir:
        check_not_in_use(cfg.output_dir)
    concept = load_concept(find_path(cfg.concept)) if cfg.concept else None
    if concept is None:
        if not cfg.instance_dir:
            raise ConfigError(
                "instance_dir is required: a folder of photos of the subject (or concept=concepts/<name>)"
            )
        if not cfg.instance_prompt:
            raise ConfigError(
                'instance_prompt is required: the caption of the photos, e.g. instance_prompt="a photo of sks dog"'
            )
    photos = find_path(cfg.instance_dir) if cfg.instance_dir else concept.instance_dir  # type: ignore[union-attr]
    if not photos.is_dir():
        raise DataError(
            f"instance_dir {photos} is not a folder; pass the folder that holds the subject's photos"
        )
    token = cfg.token or (concept.token if concept else "")
    class_word = concept.class_word if concept else ""
    if not token or not class_word:
        prompt = cfg.instance_prompt or (concept.instance_caption if concept else "")
        told = trigger_and_class(prompt, token)
        if told is None:
            raise ConfigError(
                f"cannot tell the trigger word and the class from instance_prompt {prompt!r}: write it as "
                '"a photo of TOKEN CLASS" (e.g. "a photo of sks toy") or give token=WORD'
            )
        token, class_word = token or told[0], class_word or told[1]
    subject = Subject(
        photos=photos,
        instance_prompt=cfg.instance_prompt or concept.instance_caption,  # type: ignore[union-attr]
        class_prompt=cfg.class_prompt or (concept.class_caption if concept else ""),
        token=token,
        class_word=class_word,
        validation_prompts=(),
        concept=concept,
    )
    if concept is not None:
        rendered = tuple(subject.render(t) for t in concept.validation_prompts)
        subject = dataclasses.replace(subject, validation_prompts=rendered)
    if token and token not in subject.instance_prompt.split():
        log.warning("the token %r does not appear in the instance prompt %r", token, subject.instance_prompt)
    return subject


_LEAD = re.compile(r"^(?:.*?\bof\s+)?(?:(?:a|an|the)\s+)?", re.IGNORECASE)


def trigger_and_class(prompt: str, token: str = "") -> tuple[str, str] | None:
    """(trigger, class word) of an instance prompt: the word after `token` when one is given, else the two
    words after a leading "... of" and article ("a photo of sks toy" -> sks, toy; "a sks dog" -> sks,
    dog); None when the prompt does not say."""
    words = [w.strip(string.punctuation) for w in prompt.split()]
    words = [w for w in words if w]
    if token:
        if token in words and words.index(token) + 1 < len(words):
            return token, words[words.index(token) + 1]
        return None
    rest = _LEAD.sub("", " ".join(words), count=1).split()
    if len(rest) < 2 or "of" in (w.lower() for w in rest[:2]):
        return None
    return rest[0], rest[1]


def validation_prompts(subject: Subject, sample: SampleConfig) -> list[str]:
    """`sample.prompts` (rendered), else the concept's, else the instance prompt and the class prompt."""
    if sample.prompts:
        return [subject.render(p) for p in sample.prompts]
    if subject.validation_prompts:
        return list(subject.validation_prompts)
    return [subject.instance_prompt] + ([subject.class_prompt] if subject.class_prompt else [])


BLANK_TRIGGER = 0.25
"""A known word whose trigger weight (`trigger_weight`) is below this means next to nothing to the base's text
encoder, and pivotal "auto" trains it in place. Measured on our base: single letters ("w", "x", "q") 0.17-0.19
in "a photo of w person"; real words 0.29 ("striped") to 0.82 ("person"); "a" 0.26."""

Pivotal = Literal["off", "new", "known"]
"""How a run trains its trigger: not at all, as a new token, or in its own row (a word the tokenizer has)."""


def resolve_pivotal(
    options: PivotalConfig, subject: Subject, tokenizers: list[Any], text_encoders: list[Any]
) -> Pivotal:
    """How the run trains its trigger (`options.enabled`). "auto": as a new token when it is a new word to the
    tokenizer(s) in the instance prompt; in place when it is one token the tokenizer has that the base's
    text encoder reads as next to nothing (`trigger_weight` below BLANK_TRIGGER: our base's "w"), since
    whatever learns the subject under such a word also draws it for the class prompt; else off. Pivotal
    tuning asked for outright on a trigger that is not in the instance prompt, or is a word the tokenizer
    has, is a ConfigError."""
    from tune.tokens import check_new_token, is_known_word, is_new_token

    in_prompt = subject.token in subject.instance_prompt.split()
    if not options.enabled or (options.enabled == "auto" and not in_prompt):
        if options.enabled:
            log.info("pivotal tuning: off (%r is not in the instance prompt)", subject.token)
        return "off"
    if not in_prompt:
        raise ConfigError(
            f"pivotal tuning trains the trigger word, which must be in the instance prompt: token=sks and "
            f'instance_prompt="a photo of sks toy" (got token {subject.token!r}, {subject.instance_prompt!r})'
        )
    how: Pivotal = "off"
    if is_new_token(tokenizers, subject.token, options.num_vectors):
        how, why = "new", f"{subject.token!r} becomes a new token"
    elif options.num_vectors == 1 and is_known_word(tokenizers, subject.token):
        weight = trigger_weight(tokenizers[0], text_encoders[0], subject.instance_prompt, subject.token)
        how = "known" if weight < BLANK_TRIGGER else "off"
        why = f"{subject.token!r} is a word the tokenizer has, which the text encoder reads as " + (
            f"next to nothing (trigger weight {weight:.2f} < {BLANK_TRIGGER}): its own embedding trains"
            if how == "known"
            else f"a word (trigger weight {weight:.2f} >= {BLANK_TRIGGER}): off"
        )
    else:
        why = f"off ({subject.token!r} is a word the tokenizer has, in several pieces)"
    if how == "off" and options.enabled is True:  # asked for outright: a word the base reads is an error
        check_new_token(tokenizers, subject.token, options.num_vectors)
    log.info("pivotal tuning: %s", why)
    return how


def add_trigger(
    options: PivotalConfig, how: Pivotal, subject: Subject, tokenizers: list[Any], text_encoders: list[Any]
) -> NewTokens | None:
    """The trigger as a token to train beside the recipe's weights (`how` from `resolve_pivotal`): a new
    token, or a known word's own row ("known"), starting from `options.initializer_token`, else the class
    word; None when `how` is "off"."""
    from tune.tokens import add_tokens

    if how == "off":
        return None
    initializer = options.initializer_token or subject.class_word
    return add_tokens(
        tokenizers, text_encoders, subject.token, initializer, options.num_vectors, known=how == "known"
    )


def trigger_weight(tokenizer: Any, text_encoder: Any, prompt: str, token: str) -> float:
    """How much `token` changes the text encoder's reading of `prompt`: the relative distance of its last
    hidden states (the prompt padded as pipelines pad it) with and without the token."""
    import torch

    ids = tokenizer(
        [prompt, without_trigger(prompt, token)],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        out = text_encoder(ids.to(text_encoder.device))[0].float()
    return float((out[0] - out[1]).norm() / out[1].norm())


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


def without_trigger(prompt: str, token: str) -> str:
    """`prompt` with the trigger word taken out: "a drawing of sks toy" -> "a drawing of toy"."""
    if not token:
        return prompt
    return " ".join(w for w in prompt.split() if w.strip(string.punctuation) != token)


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
