"""The subject being taught: from a concept folder or instance_dir + instance_prompt, its trigger word
and class, and validation prompts. How its trigger trains: `tune.personalize.trigger`; its class images:
`tune.personalize.prior`."""

from __future__ import annotations

import dataclasses
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tune.errors import ConfigError, DataError
from tune.paths import find_path
from tune.personalize.config import PersonalizeConfig, SampleConfig
from tune.runs import check_not_in_use

if TYPE_CHECKING:
    from tune.data.concepts import Concept

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


def without_trigger(prompt: str, token: str) -> str:
    """`prompt` with the trigger word taken out: "a drawing of sks toy" -> "a drawing of toy"."""
    if not token:
        return prompt
    return " ".join(w for w in prompt.split() if w.strip(string.punctuation) != token)
