"""The built-in captioned shapes dataset: one flat-colour shape on a flat background, fully offline.

This is what the from-scratch recipes (VAE, CLIP, U-Net) train on, and what `tune eval` scores with
the attribute detector in `tune.data.shapes_detect`. Every image is described exactly by a
`ShapeSpec` (shape, color, bg, size, position), so a caption can be checked against a sample.

    tune data shapes data/shapes --count 20000 --split train --resolution 64 --seed 0

Domain
------
* Colours (object and background, never the same): see `PALETTE`.
* Shapes: circle, square, triangle (equilateral, pointing up), star (five points, upright). Each
  shape's bounding box is `size` wide: about 30% of the side for "small", 60% for "large".
* Positions: small objects sit at the center or in one of the four quadrants ("top left", ...);
  large objects are always centred.
* Jitter: size x U(0.9, 1.1) and centre +- 4% of the side; optional Gaussian pixel noise
  (`noise_std`, in 0-255 levels; off by default).

Captions
--------
The canonical caption, always present and the one used for evaluation, is::

    a {size} {color} {shape} on a {bg} background[ in the {position}]

where the position clause is written for small objects only ("a small red circle on a blue
background in the top left"; "a large red circle on a blue background"). `paraphrases(spec)` gives
the alternatives in `PARAPHRASE_TEMPLATES`; every paraphrase names all five attributes.

Held-out pairs
--------------
`HELDOUT_PAIRS` lists (colour, shape) object pairs that the "train" split never contains and the
"heldout" split contains exclusively, so evaluation measures composition rather than memory. One
pair per colour, two per shape; every colour is still seen with three shapes in training, every
shape with six colours, and the easily confused colours (red/orange, yellow/white) hold out
different shapes.

Sampling
--------
A random spec for a split picks an allowed (colour, shape) pair uniformly, a background uniformly
among the other seven colours, small or large with equal odds (so large objects are not 1 in 6 as
they would be under uniform sampling of specs), then a position uniformly for small objects.
Sample `i` of a stream with seed `s` depends only on (s, i), so streams and folders of different
lengths agree on their common prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from tune.config import suggest
from tune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Shape = Literal["circle", "square", "triangle", "star"]
Color = Literal["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
Size = Literal["small", "large"]
Position = Literal["center", "top left", "top right", "bottom left", "bottom right"]
Split = Literal["train", "heldout", "all"]

SHAPES: tuple[Shape, ...] = get_args(Shape)
COLORS: tuple[Color, ...] = get_args(Color)
SIZES: tuple[Size, ...] = get_args(Size)
POSITIONS: tuple[Position, ...] = get_args(Position)
SPLITS: tuple[Split, ...] = get_args(Split)

PALETTE: dict[Color, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}

HELDOUT_PAIRS: tuple[tuple[Color, Shape], ...] = (
    ("red", "star"),
    ("green", "circle"),
    ("blue", "triangle"),
    ("yellow", "square"),
    ("purple", "square"),
    ("orange", "triangle"),
    ("white", "star"),
    ("black", "circle"),
)
"""(colour, shape) object pairs never shown in the train split; see the module docstring."""

SIZE_FRACTION: dict[Size, float] = {"small": 0.30, "large": 0.60}
"""Bounding-box width of the object as a fraction of the image side, before jitter."""

POSITION_CENTER: dict[Position, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
"""(x, y) of the object's bounding-box centre as fractions of the side, before jitter."""

SIZE_JITTER = 0.10
"""Relative size jitter: size is multiplied by U(1 - SIZE_JITTER, 1 + SIZE_JITTER)."""

POSITION_JITTER = 0.04
"""Centre jitter in each axis, as a fraction of the side: U(-POSITION_JITTER, POSITION_JITTER)."""

SUPERSAMPLE = 4
"""Shapes are drawn at this multiple of the resolution and box-filtered down, for clean edges."""

MIN_RESOLUTION = 16

PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "a {bg} background with a {size} {color} {shape}{where}",
    "a picture of a {size} {color} {shape} on a {bg} background{where}",
    "{size} {color} {shape}{where}, {bg} background",
    "there is a {size} {color} {shape}{where} on a {bg} background",
)
"""Alternative captions; `{where}` is " in the {position}" for small objects and "" for large ones."""

_HELDOUT = frozenset(HELDOUT_PAIRS)


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that is in one image of the dataset (apart from jitter and noise)."""

    shape: Shape
    color: Color
    bg: Color
    size: Size
    position: Position = "center"

    def __post_init__(self) -> None:
        for name, choices in (
            ("shape", SHAPES),
            ("color", COLORS),
            ("bg", COLORS),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(
                    f"ShapeSpec.{name} must be one of {', '.join(choices)}; got {value!r}"
                    + suggest(str(value), choices)
                )
        if self.color == self.bg:
            raise ValueError(f"ShapeSpec.color and bg must differ; both are {self.color!r}")
        if self.size == "large" and self.position != "center":
            raise ValueError(f"large objects are always centred; got position {self.position!r}")

    @property
    def heldout(self) -> bool:
        """Whether the object's (colour, shape) pair is one of `HELDOUT_PAIRS`."""
        return (self.color, self.shape) in _HELDOUT


class ShapeSample(NamedTuple):
    """One streamed example."""

    image: Image.Image
    caption: str
    spec: ShapeSpec


class EvalPrompt(NamedTuple):
    """A canonical prompt and the spec it describes (what the detector should find)."""

    prompt: str
    spec: ShapeSpec


# ---------------------------------------------------------------------------------------------
# Specs and splits
# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}" + suggest(split, SPLITS))


def object_pairs(split: Split = "all") -> tuple[tuple[Color, Shape], ...]:
    """The (colour, shape) object pairs a split may contain, in a fixed order."""
    _check_split(split)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        return tuple(p for p in pairs if p not in _HELDOUT)
    if split == "heldout":
        return tuple(p for p in pairs if p in _HELDOUT)
    return tuple(pairs)


def _placements() -> list[tuple[Size, Position]]:
    return [("small", p) for p in POSITIONS] + [("large", "center")]


def enumerate_specs(split: Split = "all") -> tuple[ShapeSpec, ...]:
    """Every valid spec of a split, in a fixed order (1344 in all: 1008 train, 336 held out)."""
    return tuple(
        ShapeSpec(shape=shape, color=color, bg=bg, size=size, position=position)
        for color, shape in object_pairs(split)
        for bg in COLORS
        if bg != color
        for size, position in _placements()
    )


def sample_spec(split: Split, rng: np.random.Generator) -> ShapeSpec:
    """A random spec of a split (pair, then background, then size 50/50, then position)."""
    pairs = object_pairs(split)
    color, shape = pairs[int(rng.integers(len(pairs)))]
    bgs = [c for c in COLORS if c != color]
    bg = bgs[int(rng.integers(len(bgs)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))] if size == "small" else "center"
    return ShapeSpec(shape=shape, color=color, bg=bg, size=size, position=position)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _where(spec: ShapeSpec) -> str:
    return f" in the {spec.position}" if spec.size == "small" else ""


def caption(spec: ShapeSpec) -> str:
    """The canonical caption: 'a {size} {color} {shape} on a {bg} background[ in the {position}]'."""
    return f"a {spec.size} {spec.color} {spec.shape} on a {spec.bg} background{_where(spec)}"


def paraphrases(spec: ShapeSpec) -> tuple[str, ...]:
    """Alternative captions from `PARAPHRASE_TEMPLATES` (the canonical caption is not among them)."""
    fields = {"size": spec.size, "color": spec.color, "shape": spec.shape, "bg": spec.bg}
    return tuple(t.format(where=_where(spec), **fields) for t in PARAPHRASE_TEMPLATES)


def training_captions(spec: ShapeSpec) -> tuple[str, ...]:
    """All captions for a spec, canonical first."""
    return (caption(spec), *paraphrases(spec))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _outline(shape: Shape, cx: float, cy: float, width: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape whose bounding box is `width` wide and centred on (cx, cy)."""
    if shape == "square":
        h = width / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        half_height = width * math.sqrt(3) / 4
        return [
            (cx, cy - half_height),
            (cx + width / 2, cy + half_height),
            (cx - width / 2, cy + half_height),
        ]
    if shape == "star":
        outer = width / (2 * math.sin(math.radians(72)))
        # The inner radius of a regular pentagram; the star's box runs from -outer to
        # +outer*cos(36 deg) vertically, so shift it down to centre the box on cy.
        inner = outer * math.sin(math.radians(18)) / math.sin(math.radians(54))
        y0 = cy + outer * (1 - math.cos(math.radians(36))) / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), y0 + radius * math.sin(angle)))
        return points
    return None  # circle: drawn as an ellipse


def render(
    spec: ShapeSpec,
    resolution: int = 64,
    rng: np.random.Generator | None = None,
    noise_std: float = 0.0,
) -> Image.Image:
    """Draw a spec as an RGB image, `resolution` pixels square.

    With `rng`, size and position are jittered (see the module docstring) and `noise_std` > 0 adds
    Gaussian noise of that standard deviation in 0-255 levels; without `rng` the object sits exactly
    at its nominal size and place and `noise_std` must be 0.
    """
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}; got {resolution}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std}")
    if noise_std > 0 and rng is None:
        raise ValueError("noise_std > 0 needs an rng")
    fx, fy = POSITION_CENTER[spec.position]
    width = SIZE_FRACTION[spec.size]
    if rng is not None:
        width *= float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
        fx += float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
        fy += float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))

    side = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), PALETTE[spec.bg])
    draw = ImageDraw.Draw(canvas)
    cx, cy, w = fx * side, fy * side, width * side
    outline = _outline(spec.shape, cx, cy, w)
    if outline is None:
        draw.ellipse([cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2], fill=PALETTE[spec.color])
    else:
        draw.polygon(outline, fill=PALETTE[spec.color])
    # A box filter averages exactly the covered sub-pixels: antialiased edges with no ringing.
    image = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    if noise_std > 0:
        assert rng is not None
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + rng.normal(0.0, noise_std, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    return image


# ---------------------------------------------------------------------------------------------
# Streaming and writing
# ---------------------------------------------------------------------------------------------


def build_sample(
    index: int,
    *,
    split: Split = "train",
    resolution: int = 64,
    seed: int = 0,
    noise_std: float = 0.0,
    paraphrase_prob: float = 0.0,
) -> ShapeSample:
    """Sample `index` of the stream with this seed; it depends only on (seed, index) and the options.

    With probability `paraphrase_prob` the caption is a random paraphrase instead of the canonical one.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0; got {index}")
    if not 0.0 <= paraphrase_prob <= 1.0:
        raise ConfigError(f"paraphrase_prob must be in [0, 1]; got {paraphrase_prob}")
    # One generator per (seed, index): random access, and prefixes agree across lengths.
    rng = np.random.default_rng([seed, index])
    spec = sample_spec(split, rng)
    image = render(spec, resolution, rng, noise_std)
    text = caption(spec)
    if paraphrase_prob > 0 and rng.random() < paraphrase_prob:
        options = paraphrases(spec)
        text = options[int(rng.integers(len(options)))]
    return ShapeSample(image, text, spec)


def stream_shapes(
    split: Split = "train",
    *,
    count: int | None = None,
    resolution: int = 64,
    seed: int = 0,
    noise_std: float = 0.0,
    paraphrase_prob: float = 0.0,
) -> Iterator[ShapeSample]:
    """Yield (image, caption, spec) on the fly: `count` samples, or forever when `count` is None."""
    _check_split(split)
    index = 0
    while count is None or index < count:
        yield build_sample(
            index,
            split=split,
            resolution=resolution,
            seed=seed,
            noise_std=noise_std,
            paraphrase_prob=paraphrase_prob,
        )
        index += 1


def write_imagefolder(
    out_dir: str | Path,
    count: int,
    split: Split = "train",
    resolution: int = 64,
    seed: int = 0,
    *,
    noise_std: float = 0.0,
    progress: bool = False,
) -> Path:
    """Write `count` PNGs and a Hugging Face imagefolder `metadata.jsonl` into a new or empty folder.

    Each metadata row has `file_name`, `text` (the canonical caption), the spec's attributes
    (`shape`, `color`, `bg`, `size`, `position`), `heldout` and `paraphrases`, so
    `datasets.load_dataset("imagefolder", data_dir=out_dir)` loads it with those columns.
    """
    _check_split(split)
    if count <= 0:
        raise ConfigError(f"count must be > 0; got {count}")
    if resolution < MIN_RESOLUTION:
        raise ConfigError(f"resolution must be >= {MIN_RESOLUTION}; got {resolution}")
    if noise_std < 0:
        raise ConfigError(f"noise_std must be >= 0; got {noise_std}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; choose a new folder or empty it first")
    out.mkdir(parents=True, exist_ok=True)

    digits = max(6, len(str(count - 1)))
    samples = stream_shapes(split, count=count, resolution=resolution, seed=seed, noise_std=noise_std)
    rows = []
    for index, sample in enumerate(
        tqdm(samples, total=count, desc="shapes", unit="img", disable=not progress)
    ):
        file_name = f"{index:0{digits}d}.png"
        sample.image.save(out / file_name, format="PNG")
        spec = sample.spec
        row = {"file_name": file_name, "text": sample.caption, **asdict(spec)}
        row |= {"heldout": spec.heldout, "paraphrases": list(paraphrases(spec))}
        rows.append(json.dumps(row))
    # Metadata last: a folder without it is visibly unfinished rather than silently short.
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    logger.info("wrote %d %s shapes images (%dpx, seed %d) to %s", count, split, resolution, seed, out)
    return out


def make_eval_prompts(n: int = 200, split: Split = "heldout", seed: int = 0) -> list[EvalPrompt]:
    """`n` canonical prompts with their specs, for evaluation (default: held-out pairs only).

    The object pairs take turns so each gets an equal share; within a pair, large and small specs
    alternate (while large ones last) and backgrounds and positions are shuffled. Specs repeat only
    once all of a split's specs are used (336 for "heldout").
    """
    if n <= 0:
        raise ConfigError(f"n must be > 0; got {n}")
    rng = np.random.default_rng(seed)
    every = enumerate_specs(split)
    queues: list[list[ShapeSpec]] = []
    for color, shape in object_pairs(split):
        specs = [s for s in every if (s.color, s.shape) == (color, shape)]
        large = [specs[i] for i in rng.permutation(len(specs)) if specs[i].size == "large"]
        small = [specs[i] for i in rng.permutation(len(specs)) if specs[i].size == "small"]
        queue: list[ShapeSpec] = []
        while large or small:
            queue.extend(group.pop() for group in (large, small) if group)
        queues.append(queue)
    ordered = [q[i] for i in range(max(len(q) for q in queues)) for q in queues if i < len(q)]
    return [EvalPrompt(caption(s), s) for s in (ordered[i % len(ordered)] for i in range(n))]


# ---------------------------------------------------------------------------------------------
# CLI: `tune data shapes OUT_DIR ...` (wired up by tune.cli)
# ---------------------------------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Add the `tune data shapes` arguments to `parser`."""
    parser.description = "Write the built-in captioned shapes dataset as a Hugging Face imagefolder."
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="new or empty output folder")
    parser.add_argument("--count", type=int, default=10_000, help="number of images (default: 10000)")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help="train: no held-out (colour, shape) pairs; heldout: only those; all: both (default: train)",
    )
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--noise-std",
        type=float,
        default=0.0,
        help="Gaussian pixel noise, in 0-255 levels (default: 0, none)",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run `tune data shapes`; returns the exit code."""
    out = write_imagefolder(
        args.out_dir,
        count=args.count,
        split=args.split,
        resolution=args.resolution,
        seed=args.seed,
        noise_std=args.noise_std,
        progress=True,
    )
    print(f"wrote {args.count} {args.split} images ({args.resolution}px, seed {args.seed}) to {out}")
    return 0
