"""The toy world's vocabulary: what one image holds (`Spec`), how specs are drawn, and what is held out.

A scene is one object on one background, drawn in one style:

* class: a toy (ball, ring, block, cup, cone; "toy" is their common noun) or a person (round head,
  body, arms), whose hair colour and shirt (colour and pattern) describe them;
* colour: twelve named colours (`COLORS`, the RGB values of `PALETTE`); a pattern (plain, striped,
  spotted) in a second colour;
* background: a colour, or a textured surface (a wooden table, grass, sand, a rug);
* style: a photo, a drawing, a pencil sketch (no colours: grey lines on paper), pixel art;
* size: small (in the centre or a corner) or large (centred).

Held out of the generative model's training (the "train" split never holds them; the "heldout" split
holds only these pairs, plain): `HELDOUT_PAIRS`, twelve (colour, class) pairs that measure composition,
one per colour, never shown in any pattern; and `HELDOUT_LOOKS`, the exact looks of the example subjects
(every pink-and-teal striped ring, the "w person" and three more subjects), so that personalization
teaches something new. The judge may see everything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np

from tune.errors import ConfigError

Cls = Literal["ball", "ring", "block", "cup", "cone", "person"]
Color = Literal[
    "red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "brown", "white", "grey", "black"
]  # fmt: skip
Pattern = Literal["plain", "striped", "spotted"]
Surface = Literal["wooden table", "grass", "sand", "rug"]
Style = Literal["photo", "drawing", "sketch", "pixel"]
Size = Literal["small", "large"]
Position = Literal["center", "top left", "top right", "bottom left", "bottom right"]
Split = Literal["train", "heldout", "all"]

CLASSES: tuple[Cls, ...] = get_args(Cls)
TOYS: tuple[Cls, ...] = CLASSES[:5]
COLORS: tuple[Color, ...] = get_args(Color)
PATTERNS: tuple[Pattern, ...] = get_args(Pattern)
SURFACES: tuple[Surface, ...] = get_args(Surface)
BACKGROUNDS: tuple[str, ...] = COLORS + SURFACES
STYLES: tuple[Style, ...] = get_args(Style)
SIZES: tuple[Size, ...] = get_args(Size)
POSITIONS: tuple[Position, ...] = get_args(Position)
SPLITS: tuple[Split, ...] = get_args(Split)

PALETTE: dict[Color, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 170, 60),
    "teal": (30, 195, 195),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (235, 80, 170),
    "brown": (140, 90, 50),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
}

COLORLESS_STYLES: frozenset[Style] = frozenset({"sketch"})
"""Styles that draw no colours: a sketch's colour attributes (and colour backgrounds) are not shown."""

SURFACE_CLASH: dict[Surface, frozenset[Color]] = {
    "wooden table": frozenset({"brown", "orange"}),
    "grass": frozenset({"green"}),
    "sand": frozenset({"yellow", "white"}),
    "rug": frozenset({"red", "pink"}),
}
"""Object colours too close to a surface's own to tell apart on it; never drawn on that surface."""

HELDOUT_PAIRS: tuple[tuple[Color, Cls], ...] = (
    ("red", "cup"),
    ("orange", "ball"),
    ("yellow", "cone"),
    ("green", "ring"),
    ("teal", "cup"),
    ("blue", "block"),
    ("purple", "cone"),
    ("pink", "ball"),
    ("brown", "ring"),
    ("white", "block"),
    ("grey", "ball"),
    ("black", "cup"),
)
"""Plain (colour, class) toys never in the train split: one per colour, two or three per class, and
confusable colours (red/pink/orange, teal/green/blue, white/grey) hold out different classes."""


@dataclass(frozen=True)
class Spec:
    """Everything one image shows, apart from jitter. For a person, `color`/`pattern`/`color2` are the
    shirt's and `hair` the hair colour; toys have no hair."""

    cls: Cls
    color: Color
    background: str
    style: Style = "photo"
    size: Size = "large"
    position: Position = "center"
    pattern: Pattern = "plain"
    color2: Color | None = None
    hair: Color | None = None

    def __post_init__(self) -> None:
        checks = (
            ("cls", self.cls, CLASSES),
            ("color", self.color, COLORS),
            ("background", self.background, BACKGROUNDS),
            ("style", self.style, STYLES),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("pattern", self.pattern, PATTERNS),
        )
        for name, value, choices in checks:
            if value not in choices:
                raise ValueError(f"Spec.{name} must be one of {', '.join(choices)}; got {value!r}")
        if (self.pattern == "plain") != (self.color2 is None):
            raise ValueError("Spec.color2 is the pattern's colour: set for striped/spotted, None for plain")
        if self.color2 is not None and self.color2 not in COLORS:
            raise ValueError(f"Spec.color2 must be a colour; got {self.color2!r}")
        if self.color2 == self.color:
            raise ValueError(f"Spec.color2 must differ from color; both are {self.color!r}")
        if (self.cls == "person") != (self.hair is not None):
            raise ValueError("Spec.hair is set for a person and only for a person")
        if self.hair is not None and self.hair not in COLORS:
            raise ValueError(f"Spec.hair must be a colour; got {self.hair!r}")
        if self.size == "large" and self.position != "center":
            raise ValueError(f"large objects are always centred; got position {self.position!r}")

    @property
    def colors_shown(self) -> bool:
        return self.style not in COLORLESS_STYLES

    @property
    def look(self) -> tuple[str, str, str, str | None, str | None]:
        """(class, colour, pattern, colour2, hair): the object's own look, whatever the scene."""
        return (self.cls, self.color, self.pattern, self.color2, self.hair)


def with_scene(spec: Spec, **changes: str) -> Spec:
    """`spec` with other scene attributes (background, style, size, position)."""
    if changes.get("size") == "large":
        changes.setdefault("position", "center")
    return replace(spec, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Held-out looks: the example subjects (tune.world.subjects describes them in words)
# ---------------------------------------------------------------------------------------------

HELDOUT_LOOKS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("ring", "pink", "striped", "teal", None),  # sks-toy, and its colour-swapped twin below
    ("ring", "teal", "striped", "pink", None),
    ("person", "yellow", "spotted", "purple", "green"),  # w-person: green hair, yellow shirt, purple spots
    ("cup", "yellow", "spotted", "purple", None),  # the three subjects that show the defaults generalize
    ("cone", "blue", "striped", "orange", None),
    ("ball", "red", "spotted", "white", None),
)
"""Exact looks (class, colour, pattern, colour2, hair) that no split ever renders; see the docstring."""

_HELDOUT_PAIRS = frozenset(HELDOUT_PAIRS)
_HELDOUT_LOOKS = frozenset(HELDOUT_LOOKS)


def is_heldout_pair(spec: Spec) -> bool:
    """Whether the object's main colour and class are a held-out pair (whatever its pattern: the train
    split holds no red cup at all, striped or not, so "a red cup" is composed, not remembered)."""
    return (spec.color, spec.cls) in _HELDOUT_PAIRS


def is_heldout_look(spec: Spec) -> bool:
    return spec.look in _HELDOUT_LOOKS


def allowed(spec: Spec) -> bool:
    """Whether the colours can be told apart: object and pattern colours differ from a colour background
    (and from each other), and the object's colour does not clash with a surface."""
    shown = {spec.color, spec.color2, spec.hair} - {None}
    if spec.background in COLORS:
        return spec.background not in shown
    return spec.color not in SURFACE_CLASH[spec.background]  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Drawing specs
# ---------------------------------------------------------------------------------------------

STYLE_WEIGHTS: dict[Style, float] = {"photo": 0.4, "drawing": 0.2, "sketch": 0.2, "pixel": 0.2}
"""Photos are what users train on and prompt for most; each other style still gets a fifth."""
PATTERN_WEIGHTS: dict[Pattern, float] = {"plain": 0.5, "striped": 0.25, "spotted": 0.25}


def _choice(rng: np.random.Generator, values: tuple | list, weights: dict | None = None):  # noqa: ANN202
    if weights is None:
        return values[int(rng.integers(len(values)))]
    p = np.array([weights[v] for v in values], dtype=np.float64)
    return values[int(rng.choice(len(values), p=p / p.sum()))]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")


def in_split(spec: Spec, split: Split) -> bool:
    if is_heldout_look(spec):
        return False
    if split == "train":
        return not is_heldout_pair(spec)
    if split == "heldout":
        return is_heldout_pair(spec) and spec.pattern == "plain"
    return True


def sample_spec(rng: np.random.Generator, split: Split = "train", style: Style | None = None) -> Spec:
    """A random spec of `split`: class uniform, colours uniform, pattern half plain, background uniform
    among those allowed, style by `STYLE_WEIGHTS` (or `style`), size 50/50, position uniform if small."""
    check_split(split)
    for _ in range(1000):
        if split == "heldout":
            color, cls = _choice(rng, HELDOUT_PAIRS)
            pattern, color2 = "plain", None
        else:
            cls = _choice(rng, CLASSES)
            color = _choice(rng, COLORS)
            pattern = _choice(rng, PATTERNS, PATTERN_WEIGHTS)
            color2 = None if pattern == "plain" else _choice(rng, [c for c in COLORS if c != color])
        hair = _choice(rng, COLORS) if cls == "person" else None
        size = _choice(rng, SIZES)
        spec = Spec(
            cls=cls,
            color=color,
            pattern=pattern,
            color2=color2,
            hair=hair,
            background=_choice(rng, BACKGROUNDS),
            style=style or _choice(rng, STYLES, STYLE_WEIGHTS),
            size=size,
            position=_choice(rng, POSITIONS) if size == "small" else "center",
        )
        if allowed(spec) and in_split(spec, split):
            return spec
    raise RuntimeError("no allowed spec found in 1000 draws")  # unreachable with the tables above
