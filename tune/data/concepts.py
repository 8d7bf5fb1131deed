"""Concepts: `concepts/<name>/concept.toml`, one subject to teach the model.

Example (every key but `token` and `class_word` is optional; defaults are the dataclass fields):

    token = "sks"
    class_word = "dog"
    instance_dir = "photos"                      # relative to this concept.toml
    instance_prompt = "a photo of {token} {class}"
    class_prompt = "a photo of {class}"
    validation_prompts = ["a photo of {token} {class} on a beach"]

    [prior_preservation]
    enabled = true
    num_class_images = 100
    prior_loss_weight = 1.0
    class_dir = "class_images"                   # optional: pre-made class images

Parsing is strict: an unknown key is an error that names it and suggests the nearest known key.
Prompts are templates with the placeholders `{token}` and `{class}` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune.errors import ConfigError

CONCEPT_FILE = "concept.toml"
_PLACEHOLDERS = frozenset({"token", "class"})


@dataclass(frozen=True)
class PriorPreservation:
    """Prior-preservation settings of a concept (DreamBooth's class images)."""

    enabled: bool = False
    """Train on class images too, so the class word keeps its meaning."""
    num_class_images: int = 100
    """How many class images to have; the recipe generates the missing ones."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image loss relative to the instance loss."""
    class_dir: Path | None = None
    """Folder of ready-made class images (relative to concept.toml); None lets the recipe generate them."""


@dataclass(frozen=True)
class Concept:
    """One subject: its token, class word, photos and prompts (templates with {token} and {class})."""

    name: str
    """The concept's folder name (`concepts/<name>/`); not a key in the file."""
    token: str
    """The rare token that will mean this subject, e.g. "sks"."""
    class_word: str
    """What the subject is, e.g. "dog"; `{class}` in prompts."""
    instance_dir: Path = Path("photos")
    """Folder of the subject's photos, relative to concept.toml."""
    instance_prompt: str = "a photo of {token} {class}"
    """Caption template for the subject's photos."""
    class_prompt: str = "a photo of {class}"
    """Caption template for class images (prior preservation)."""
    validation_prompts: tuple[str, ...] = ()
    """Prompt templates sampled during training to watch progress."""
    prior_preservation: PriorPreservation = field(default_factory=PriorPreservation)
    """Prior-preservation settings: the `[prior_preservation]` table."""

    def render(self, template: str) -> str:
        """Fill `{token}` and `{class}` in a prompt template."""
        return template.format(token=self.token, **{"class": self.class_word})

    @property
    def instance_caption(self) -> str:
        """The instance prompt, rendered."""
        return self.render(self.instance_prompt)

    @property
    def class_caption(self) -> str:
        """The class prompt, rendered."""
        return self.render(self.class_prompt)

    @property
    def validation_captions(self) -> tuple[str, ...]:
        """The validation prompts, rendered."""
        return tuple(self.render(t) for t in self.validation_prompts)


def _check_keys(table: dict[str, Any], allowed: list[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")


def _check_type(value: Any, expected: str, key: str, where: str) -> Any:
    ok = {
        "str": isinstance(value, str),
        # bool is an int in Python; `num_class_images = true` is a mistake, not 1.
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[expected]
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {expected}; got {value!r}")
    if expected == "float":
        return float(value)
    if expected == "list[str]":
        return tuple(value)
    return value


def _check_template(template: str, key: str, where: str) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(
            f"{where}: '{key}' is not a valid template ({e}); use {{token}} and {{class}}"
        ) from None
    unknown = names - _PLACEHOLDERS
    if unknown:
        raise ConfigError(
            f"{where}: '{key}' uses unknown placeholder {{{sorted(unknown)[0]}}}; only {{token}} and {{class}}"
        )


_PRIOR_TYPES = {
    "enabled": "bool",
    "num_class_images": "int",
    "prior_loss_weight": "float",
    "class_dir": "str",
}
_CONCEPT_TYPES = {
    "token": "str",
    "class_word": "str",
    "instance_dir": "str",
    "instance_prompt": "str",
    "class_prompt": "str",
    "validation_prompts": "list[str]",
    "prior_preservation": "table",
}
_TEMPLATES = ("instance_prompt", "class_prompt")


def parse_concept(table: dict[str, Any], *, name: str, base_dir: Path, where: str) -> Concept:
    """A `Concept` from a parsed concept.toml table; relative folders are resolved against `base_dir`."""
    _check_keys(table, list(_CONCEPT_TYPES), where)
    for required in ("token", "class_word"):
        if required not in table:
            raise ConfigError(f"{where}: missing required key '{required}'")
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key == "prior_preservation":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'prior_preservation' must be a table ([prior_preservation])")
            _check_keys(value, list(_PRIOR_TYPES), f"{where} [prior_preservation]")
            prior = {k: _check_type(v, _PRIOR_TYPES[k], k, where) for k, v in value.items()}
            if "class_dir" in prior:
                prior["class_dir"] = base_dir / prior["class_dir"]
            kwargs[key] = PriorPreservation(**prior)
        else:
            kwargs[key] = _check_type(value, _CONCEPT_TYPES[key], key, where)
    for key in _TEMPLATES:
        if key in kwargs:
            _check_template(kwargs[key], key, where)
    for i, template in enumerate(kwargs.get("validation_prompts", ())):
        _check_template(template, f"validation_prompts[{i}]", where)
    if not kwargs["token"].strip() or not kwargs["class_word"].strip():
        raise ConfigError(f"{where}: 'token' and 'class_word' must not be empty")
    concept = Concept(name=name, **{k: v for k, v in kwargs.items() if k != "instance_dir"})
    instance_dir = Path(kwargs.get("instance_dir", concept.instance_dir))
    concept = dataclasses.replace(concept, instance_dir=base_dir / instance_dir)
    prior = concept.prior_preservation
    if prior.num_class_images < 0:
        raise ConfigError(f"{where}: 'num_class_images' must be >= 0; got {prior.num_class_images}")
    if prior.prior_loss_weight < 0:
        raise ConfigError(f"{where}: 'prior_loss_weight' must be >= 0; got {prior.prior_loss_weight}")
    return concept


def load_concept(path: str | Path) -> Concept:
    """Load `concepts/<name>/concept.toml` (or its folder) strictly into a `Concept`."""
    path = Path(path)
    if path.is_dir():
        path = path / CONCEPT_FILE
    if not path.is_file():
        raise ConfigError(f"no concept file at {path}; a concept is a folder with a {CONCEPT_FILE}")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    base_dir = path.parent.resolve()
    return parse_concept(table, name=base_dir.name, base_dir=base_dir, where=str(path))


def load_concepts(root: str | Path) -> list[Concept]:
    """Every `<root>/<name>/concept.toml`, sorted by name."""
    root = Path(root)
    return [load_concept(p) for p in sorted(root.glob(f"*/{CONCEPT_FILE}"))]
