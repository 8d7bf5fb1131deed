"""Attribute detector for the shapes dataset: image -> (bg, color, shape, size, position).

It judges model samples (blurry, noisy, colours drifted), so every step is a robust measurement
snapped to the nearest class rather than a fit to the generator's exact pixels:

1. The image is resampled to `WORK_RESOLUTION` on its short side (box-filtered down, which also
   averages noise away; bilinear up).
2. Background: the palette colour most border pixels are nearest to; its RGB value is the median
   of those pixels (so a drifted background is measured, not assumed).
3. Object blob: pixels whose distance from the background colour, on a 3x3-smoothed copy (so
   pixel noise cannot chain stray pixels onto it), is over half the object's contrast (where an
   antialiased or blurred edge lies); the largest 8-connected blob, holes filled.
4. Object colour: median of the blob's core pixels (at least 80% of the contrast, so edge pixels
   mixed with the background do not pull it), nearest palette colour in CIELAB (which separates
   white from yellow and orange from red and yellow far better than RGB), never the background.
5. Size: the blob's bounding-box extent against the geometric mean of the two nominal sizes
   (every shape's box is `size` wide by construction).
6. Position: the nominal centre nearest to the bounding-box centre.
7. Shape: the angular harmonics of the object's radius around its centroid. A triangle is all
   3rd harmonic, a square 4th, a five-pointed star 5th, a circle none. Unlike fill ratio, hull
   solidity or outline corners (all tried), these are measured from the area in each angular
   sector of a soft coverage map, so they average over every pixel; and blur or noise shrink them
   towards the circle but never turn one into another. At 64px they separate the four shapes with
   wide margins even under a Gaussian blur of 1.5px; only small stars blurred by about 2px and
   more fall to "circle" (where they do look round).

Each attribute carries a confidence in [0, 1]: 0 means half-way between the two nearest classes,
1 means on a class prototype. When nothing stands out from the background, the object attributes
are "unknown" with confidence 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tune.data.imageops import ImageLike, box3, dilate, reconstruct, rgb_to_lab, to_array
from tune.data.shapes import (
    COLORS,
    PALETTE,
    POSITION_CENTER,
    SIZE_FRACTION,
    Color,
    Position,
    Shape,
    ShapeSpec,
    Size,
)

Unknown = Literal["unknown"]
ATTRIBUTES: tuple[str, ...] = ("bg", "color", "shape", "size", "position")

MIN_RESOLUTION = 32
WORK_RESOLUTION = 64
"""Inputs are resampled to this short side, the scale the thresholds were checked at."""

MIN_CONTRAST = 30.0
"""RGB distance (0-255 levels) the object must stand out from the background by; the closest
palette pair (orange, yellow) is 71 apart."""

MIN_AREA_FRACTION = 0.002
"""A blob smaller than this share of the image is noise, not an object (a small star is ~2.5%)."""

_HARMONIC_REFERENCE: dict[Shape, float] = {"triangle": 0.27, "square": 0.14, "star": 0.37}
"""Amplitude of each shape's harmonic (k = 3, 4, 5), relative to the mean radius, as generated."""
_HARMONIC_OF: dict[Shape, str] = {"triangle": "h3", "square": "h4", "star": "h5"}
_CIRCLE_WEIGHT = 3.0
"""The circle prototype's distance is scaled up by this, so that it only wins below 1/(1 + 3) of
a harmonic's nominal amplitude: blur shrinks a star's 5th harmonic a lot before it looks round."""
_EDGE_GAIN = 2.5
"""Soft coverage is stretched about 0.5 by this factor (and clipped), undoing some of a blur."""
_SECTORS = 60
_SUBPIXELS = 3
_SIZE_THRESHOLD = math.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"])


@dataclass(frozen=True)
class Detection:
    """What the detector found; object attributes are "unknown" when no object stands out."""

    bg: Color
    color: Color | Unknown
    shape: Shape | Unknown
    size: Size | Unknown
    position: Position | Unknown
    confidence: Mapping[str, float]
    """Per attribute, in [0, 1]: 0 = half-way between two classes, 1 = on a class prototype."""

    @property
    def found(self) -> bool:
        """Whether an object was found."""
        return self.shape != "unknown"

    def matches(self, spec: ShapeSpec) -> dict[str, bool]:
        """Per attribute, whether this detection agrees with `spec`."""
        return {name: getattr(self, name) == getattr(spec, name) for name in ATTRIBUTES}


@dataclass(frozen=True)
class DetectionScore:
    """Detector agreement with the intended specs over a set of images."""

    count: int
    accuracy: Mapping[str, float]
    """Per attribute (bg, color, shape, size, position): share of images detected correctly."""
    all_correct: float
    """Share of images with every attribute correct."""
    found: float
    """Share of images where an object was found at all."""

    def to_dict(self) -> dict[str, float]:
        """Flat metrics, e.g. for metrics.jsonl: {"bg": ..., ..., "all_correct": ..., "count": ...}."""
        return {**self.accuracy, "all_correct": self.all_correct, "found": self.found, "count": self.count}


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------


_PALETTE_LAB = rgb_to_lab(np.array([PALETTE[c] for c in COLORS], dtype=np.float64))


def _palette_distances(rgb: np.ndarray) -> np.ndarray:
    """CIELAB distance from each colour in `rgb` (..., 3) to each palette entry (..., 8)."""
    return np.linalg.norm(rgb_to_lab(rgb)[..., None, :] - _PALETTE_LAB, axis=-1)


def _margin(distances: np.ndarray) -> float:
    """Confidence from the two smallest distances: 0 when equal, 1 when the nearest is exact."""
    d = np.sort(distances)
    return float(1.0 - d[0] / d[1]) if d[1] > 0 else 0.0


def nearest_color(rgb: Sequence[float] | np.ndarray, exclude: Color | None = None) -> tuple[Color, float]:
    """The palette colour nearest to an RGB value (0-255) in CIELAB, and the confidence."""
    distances = _palette_distances(np.asarray(rgb, dtype=np.float64))
    if exclude is not None:
        distances[COLORS.index(exclude)] = np.inf
    index = int(np.argmin(distances))
    return COLORS[index], _margin(distances)


# ---------------------------------------------------------------------------------------------
# Mask helpers (numpy only)
# ---------------------------------------------------------------------------------------------


def _largest_blob(mask: np.ndarray, priority: np.ndarray, tries: int = 4) -> np.ndarray:
    """The largest 8-connected blob of `mask` among the first `tries`, seeded at high `priority`."""
    remaining = mask.copy()
    best = np.zeros_like(mask)
    for _ in range(tries):
        if remaining.sum() <= best.sum():
            break
        seed = np.zeros_like(mask)
        seed.flat[int(np.argmax(np.where(remaining, priority, -np.inf)))] = True
        blob = reconstruct(seed, remaining)
        if blob.sum() > best.sum():
            best = blob
        remaining &= ~blob
    return best


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every non-mask region not connected to the image border."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask
    # Everything outside the mask's box is outside; only the box (plus a margin) needs flooding.
    y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, mask.shape[0])
    x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, mask.shape[1])
    box = mask[y0:y1, x0:x1]
    edge = np.zeros_like(box)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    filled = mask.copy()
    filled[y0:y1, x0:x1] = ~reconstruct(edge, ~box)
    return filled


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def shape_features(coverage: np.ndarray) -> dict[str, float]:
    """Angular harmonics "h3", "h4", "h5" of an object given its soft coverage map (H, W).

    `coverage` is each pixel's share of object, 0 away from the object. The object's radius in each
    of `_SECTORS` angular sectors around its centroid comes from the area in that sector; the
    results are the amplitudes of the 3rd, 4th and 5th Fourier harmonics of that radius, relative
    to its mean (0 for a circle; about 0.27, 0.14, 0.37 for the generator's triangle, square, star).
    """
    ys, xs = np.nonzero(coverage)
    top, left = ys.min(), xs.min()
    patch = coverage[top : ys.max() + 1, left : xs.max() + 1]
    # Sub-pixel sample points keep the sectors near the centroid fair.
    offsets = (np.arange(_SUBPIXELS) + 0.5) / _SUBPIXELS
    grid_y = (np.arange(top, top + patch.shape[0])[:, None] + offsets).ravel()
    grid_x = (np.arange(left, left + patch.shape[1])[:, None] + offsets).ravel()
    weights = np.repeat(np.repeat(patch, _SUBPIXELS, axis=0), _SUBPIXELS, axis=1)
    total = weights.sum()
    cy = float(weights.sum(axis=1) @ grid_y / total)
    cx = float(weights.sum(axis=0) @ grid_x / total)
    angle = np.arctan2(grid_y[:, None] - cy, grid_x[None, :] - cx)
    sector = ((angle + np.pi) * (_SECTORS / (2 * np.pi))).astype(np.int64) % _SECTORS
    sector_area = np.bincount(sector.ravel(), weights.ravel(), minlength=_SECTORS)
    radius = np.sqrt(np.maximum(sector_area, 0.0))  # proportional to the radius; the scale cancels
    spectrum = np.abs(np.fft.rfft(radius))
    amplitude = 2 * spectrum / spectrum[0] if spectrum[0] > 0 else np.zeros_like(spectrum)
    return {f"h{k}": float(amplitude[k]) for k in (3, 4, 5)}


def _classify_shape(features: Mapping[str, float]) -> tuple[Shape, float]:
    """Nearest shape prototype in harmonic space, and the confidence.

    The point has one axis per non-circle shape: its harmonic over the generated amplitude; those
    shapes sit at the unit vectors and the circle at the origin (its distance weighted up, see
    `_CIRCLE_WEIGHT`).
    """
    shapes: tuple[Shape, ...] = ("triangle", "square", "star")
    point = np.array([features[_HARMONIC_OF[s]] / _HARMONIC_REFERENCE[s] for s in shapes])
    distances = np.array(
        [*(np.linalg.norm(point - np.eye(3)[k]) for k in range(3)), _CIRCLE_WEIGHT * np.linalg.norm(point)]
    )
    index = int(np.argmin(distances))
    return (*shapes, "circle")[index], _margin(distances)


def detect(image: ImageLike) -> Detection:
    """Find the background colour and the object's colour, shape, size and position."""
    pixels = to_array(image, WORK_RESOLUTION, MIN_RESOLUTION)
    height, width = pixels.shape[:2]

    # Background: the palette colour most of a thin border ring is nearest to.
    ring = max(1, round(min(height, width) / 32))
    border = np.ones((height, width), dtype=bool)
    border[ring:-ring, ring:-ring] = False
    border_rgb = pixels[border].astype(np.float64)
    votes = np.argmin(_palette_distances(border_rgb), axis=-1)
    counts = np.bincount(votes, minlength=len(COLORS))
    bg_rgb = np.median(border_rgb[votes == int(np.argmax(counts))], axis=0).astype(np.float32)
    bg, bg_margin = nearest_color(bg_rgb)
    bg_confidence = bg_margin * float(counts.max() / counts.sum())

    # Object: far from the background colour. The contrast is measured on a lightly smoothed copy
    # so that pixel noise neither seeds the blob nor inflates it.
    offset = pixels - bg_rgb
    distance = np.linalg.norm(offset, axis=-1)
    smooth = np.linalg.norm(box3(pixels) - bg_rgb, axis=-1)
    peak = float(smooth.max())
    contrast = float(np.median(smooth[smooth >= 0.5 * peak])) if peak > 0 else 0.0
    unknown = Detection(
        bg=bg,
        color="unknown",
        shape="unknown",
        size="unknown",
        position="unknown",
        confidence={"bg": bg_confidence, "color": 0.0, "shape": 0.0, "size": 0.0, "position": 0.0},
    )
    if contrast < MIN_CONTRAST:
        return unknown
    blob = _fill_holes(_largest_blob(smooth > 0.5 * contrast, smooth))
    if blob.sum() < MIN_AREA_FRACTION * height * width:
        return unknown

    # Colour: the blob's core, away from edge pixels mixed with the background.
    core = blob & (distance >= 0.8 * contrast)
    object_rgb = np.median(pixels[core] if core.sum() >= 3 else pixels[blob], axis=0)
    color, color_confidence = nearest_color(object_rgb, exclude=bg)

    # Size and position from the bounding box, as fractions of the side.
    ys, xs = np.nonzero(blob)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    extent = max((box[2] - box[0]) / width, (box[3] - box[1]) / height)
    size: Size = "large" if extent > _SIZE_THRESHOLD else "small"
    size_confidence = min(1.0, abs(math.log(extent / _SIZE_THRESHOLD)) / math.log(0.6 / _SIZE_THRESHOLD))
    center = np.array([(box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height])
    anchors = list(POSITION_CENTER)
    anchor_distances = np.array([np.linalg.norm(center - np.array(POSITION_CENTER[a])) for a in anchors])
    position = anchors[int(np.argmin(anchor_distances))]

    # Shape: soft coverage is each pixel's position on the line from background to object colour
    # (linear unmixing: exact for antialiased edges, unbiased under zero-mean noise), over the blob
    # and two pixels around it so that faint edge pixels and blurred tips still count.
    direction = (object_rgb - bg_rgb).astype(np.float32)
    coverage = offset @ direction / float(direction @ direction)
    coverage = np.clip((coverage - 0.5) * _EDGE_GAIN + 0.5, 0.0, 1.0)
    coverage = np.where(dilate(dilate(blob)), coverage, 0.0)
    shape, shape_confidence = _classify_shape(shape_features(coverage))

    return Detection(
        bg=bg,
        color=color,
        shape=shape,
        size=size,
        position=position,
        confidence={
            "bg": bg_confidence,
            "color": color_confidence,
            "shape": shape_confidence,
            "size": size_confidence,
            "position": _margin(anchor_distances),
        },
    )


def score(images: Iterable[ImageLike], specs: Sequence[ShapeSpec]) -> DetectionScore:
    """Per-attribute accuracy and all-correct rate of `detect` on images against intended specs."""
    correct = dict.fromkeys(ATTRIBUTES, 0)
    all_correct = found = count = 0
    for image, spec in zip(images, specs, strict=True):
        detection = detect(image)
        matches = detection.matches(spec)
        for name, ok in matches.items():
            correct[name] += ok
        all_correct += all(matches.values())
        found += detection.found
        count += 1
    if count == 0:
        raise ValueError("score needs at least one image")
    return DetectionScore(
        count=count,
        accuracy={name: correct[name] / count for name in ATTRIBUTES},
        all_correct=all_correct / count,
        found=found / count,
    )
