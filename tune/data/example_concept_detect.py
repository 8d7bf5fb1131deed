"""Does a generated image show the example toy (`tune.data.example_concept`), and on what background?

The toy is a pink ring with a hole, striped teal. The detector looks for exactly that combination,
with measurements that blur, noise and colour drift bend but do not break:

1. The image is resampled to `WORK_RESOLUTION` on its short side (box filter down, which averages
   noise away) and smoothed 3x3, so single noisy pixels cannot make a region.
2. Background: the median colour of a thin border ring (any colour, not only the palette's); most
   of that ring must be near it (little `clutter`), or there is no background to find an object on.
3. Object regions: pixels whose CIELAB distance from the background, lightness weighted by half
   (shading and soft shadows change lightness most), is over a threshold: `MIN_DISTANCE`, raised
   for high-contrast images (30% of the 99th percentile, at most `MAX_DISTANCE`) so that the toy's
   contact shadow does not fill its hole; plus pixels of the toy's two hue classes (step 5) unless
   the background has that hue; then closed (dilated and eroded) so the seams between stripes,
   blurred to lavender-blue, do not cut the ring. The largest few 8-connected regions are candidates.
4. Per candidate, the ring test: the largest enclosed background-like region (the hole) must be a
   real share of the filled region and sit near its centre. A filled blob, even one with a white
   highlight, has none: a highlight differs from the background, so it is part of the region.
5. Per candidate, the colour test: each pixel gets a hue class from its CIELAB hue angle (if its
   chroma is high enough to have a hue): the nearest of the palette's six chromatic hues and the
   toy's pink and teal. Hue, unlike an RGB distance, stays put when the plastic's shading darkens
   or lightens it; pink sits between the palette's red and purple, teal between its green and blue,
   so a drifted pink still reads as pink. The shares of pink and of teal are counted on the
   region's core (eroded twice), because a blurred edge between a palette object and a palette
   background can mix to pink (red on purple) or teal (green on blue): those mixes lie along the
   rim, while the toy's colours fill the tube across.

Each measurement becomes a ratio to its bound (`MINIMA`: value / bound; `MAXIMA`: bound / value; 1 =
just passing, capped at 2). A candidate's score is half its smallest ratio, so it lies in [0, 1],
`present` is score >= 0.5, and the score says by how much.

Checked on 64x64 renders on the eight palette backdrops (blur sigma 1px, noise 6): the toy is found
in all of them (94% with blur 1.5px, 95% with a +-10% per-channel colour cast); no image of 1000
from the shapes dataset and none of 100 noise images counts, nor do pink discs, plain pink rings or
rings in palette colours. It does not check which of the two colours is the stripe: a teal ring
with pink stripes passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tune.data.example_concept import TOY_BAND_RGB, TOY_BODY_RGB
from tune.data.imageops import ImageLike, box3, dilate, erode, reconstruct, rgb_to_lab, to_array
from tune.data.shapes import COLORS, PALETTE, Color
from tune.data.shapes_detect import detect

WORK_RESOLUTION = 64
"""Inputs are resampled to this short side, the scale the thresholds were checked at."""
MIN_RESOLUTION = 32

MIN_DISTANCE = 20.0
MAX_DISTANCE = 35.0
"""Bounds of the object threshold: CIELAB distance from the background with lightness halved."""
MIN_CHROMA = 15.0
"""CIELAB chroma below which a pixel has no hue (greys, white, black; dark or washed-out edges)."""

MINIMA: Mapping[str, float] = {
    "area": 0.012,
    "hole": 0.025,
    "pink": 0.12,
    "teal": 0.05,
}
"""Lower bounds a candidate must reach to be the toy. `area`: the filled region's share of the image
(the toy's is 0.1-0.3 at the renderer's scales). `hole`: the hole's share of the filled region
(about 0.18 unblurred; blur and shadow shrink it to 0.05-0.17). `pink`, `teal`: shares of the
region's core (the toy's are about 0.2-0.75 and 0.05-0.35; look-alikes with a palette colour in
place of pink or teal reach about 0.2 and 0.06 only at their rims, hence the core)."""

MAXIMA: Mapping[str, float] = {
    "offset": 0.25,
    "clutter": 0.3,
}
"""Upper bounds. `offset`: distance from the filled region's centroid to the hole's, in equivalent
radii (the toy's is under 0.06; 1 when there is no hole). `clutter`: share of the border ring that
is object-like: an image must have a background at all, which noise has not (the toy's: 0-0.03)."""

_RATIO_CAP = 2.0
_LIGHTNESS_WEIGHT = 0.5
_RELATIVE_DISTANCE = 0.3
_CORE_EROSIONS = 2
_MIN_CORE_PIXELS = 8
_CANDIDATES = 3
_MAX_REGIONS = 64


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------


def _hue_degrees(rgb: Sequence[int]) -> float:
    lab = rgb_to_lab(np.asarray(rgb, dtype=np.float64))
    return math.degrees(math.atan2(lab[2], lab[1])) % 360


# The palette's chromatic colours (white and black have no hue), then the toy's two colours.
_HUE_NAMES: tuple[str, ...] = (*(c for c in COLORS if c not in ("white", "black")), "pink", "teal")
_HUES = np.array(
    [_hue_degrees(PALETTE[c]) for c in _HUE_NAMES[:-2]]
    + [_hue_degrees(TOY_BODY_RGB), _hue_degrees(TOY_BAND_RGB)]
)
_PINK, _TEAL = len(_HUE_NAMES) - 2, len(_HUE_NAMES) - 1


def _hue_classes(lab: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the nearest hue in `_HUE_NAMES`, or -1 where chroma is too low."""
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360
    gap = np.abs((hue[..., None] - _HUES + 180) % 360 - 180)
    return np.where(chroma >= MIN_CHROMA, np.argmin(gap, axis=-1), -1)


# ---------------------------------------------------------------------------------------------
# Masks (numpy only)
# ---------------------------------------------------------------------------------------------


def _regions(mask: np.ndarray, count: int) -> list[np.ndarray]:
    """The `count` largest 8-connected regions of `mask` (among the first `_MAX_REGIONS` found)."""
    remaining = mask.copy()
    found: list[np.ndarray] = []
    while remaining.any() and len(found) < _MAX_REGIONS:
        seed = np.zeros_like(mask)
        seed.flat[int(np.argmax(remaining))] = True
        region = reconstruct(seed, remaining)
        found.append(region)
        remaining &= ~region
    found.sort(key=lambda r: -int(r.sum()))
    return found[:count]


def _outside(mask: np.ndarray) -> np.ndarray:
    """Non-mask pixels connected to the image border."""
    edge = np.zeros_like(mask)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    return reconstruct(edge, ~mask)


def _core(region: np.ndarray) -> np.ndarray:
    """`region` eroded up to `_CORE_EROSIONS` times, stopping before it would all but vanish."""
    core = region
    for _ in range(_CORE_EROSIONS):
        eroded = erode(core)
        if eroded.sum() < _MIN_CORE_PIXELS:
            break
        core = eroded
    return core


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


def _measure(region: np.ndarray, pink: np.ndarray, teal: np.ndarray, clutter: float) -> dict[str, float]:
    """The measurements of one candidate region (see the module docstring)."""
    filled = ~_outside(region)
    holes = filled & ~region
    hole = _regions(holes, 1)[0] if holes.any() else holes
    filled_area = float(filled.sum())
    hole_area = float(hole.sum())
    offset = 1.0
    if hole_area > 0:
        ys, xs = np.nonzero(filled)
        hy, hx = np.nonzero(hole)
        distance = math.hypot(hy.mean() - ys.mean(), hx.mean() - xs.mean())
        offset = distance / math.sqrt(filled_area / math.pi)
    core = _core(region)
    core_area = max(float(core.sum()), 1.0)
    return {
        "area": filled_area / region.size,
        "hole": hole_area / max(filled_area, 1.0),
        "pink": float((pink & core).sum()) / core_area,
        "teal": float((teal & core).sum()) / core_area,
        "offset": offset,
        "clutter": clutter,
    }


def _score(measured: Mapping[str, float]) -> float:
    """Half the smallest ratio of a measurement to its bound (each capped at `_RATIO_CAP`)."""
    ratios = [min(measured[name] / bound, _RATIO_CAP) for name, bound in MINIMA.items()]
    ratios += [min(bound / max(measured[name], 1e-9), _RATIO_CAP) for name, bound in MAXIMA.items()]
    return 0.5 * min(ratios)


def concept_measurements(image: ImageLike) -> dict[str, float]:
    """The best candidate region's measurements (the keys of `MINIMA` and `MAXIMA`) and its `score`.

    With no candidate at all (a flat image), the score is 0.
    """
    pixels = box3(to_array(image, WORK_RESOLUTION, MIN_RESOLUTION, "detect_concept"))
    height, width = pixels.shape[:2]
    ring = max(1, round(min(height, width) / 32))
    border = np.ones((height, width), dtype=bool)
    border[ring:-ring, ring:-ring] = False
    lab = rgb_to_lab(pixels)
    bg_lab = rgb_to_lab(np.median(pixels[border], axis=0))
    weights = np.array([_LIGHTNESS_WEIGHT, 1.0, 1.0])
    distance = np.linalg.norm((lab - bg_lab) * weights, axis=-1)
    threshold = float(np.clip(_RELATIVE_DISTANCE * np.percentile(distance, 99), MIN_DISTANCE, MAX_DISTANCE))
    classes = _hue_classes(lab)
    pink, teal = classes == _PINK, classes == _TEAL
    # The toy's own hues are object even where shading brings them near a greyish background
    # (dark teal on slate) -- unless the background has that hue itself.
    bg_class = int(_hue_classes(bg_lab))
    objects = (distance > threshold) | (pink & (bg_class != _PINK)) | (teal & (bg_class != _TEAL))
    # Closing: the blurred seams between pink and teal are lavender-blue, near a blue-grey
    # background, and would cut the ring into pieces.
    objects = erode(dilate(objects))
    clutter = float(objects[border].mean())

    best: dict[str, float] | None = None
    for region in _regions(objects, _CANDIDATES):
        measured = _measure(region, pink, teal, clutter)
        measured["score"] = _score(measured)
        if best is None or measured["score"] > best["score"]:
            best = measured
    if best is None:
        best = {**dict.fromkeys(MINIMA, 0.0), "offset": 1.0, "clutter": clutter, "score": 0.0}
    return best


def detect_concept(image: ImageLike) -> tuple[bool, float]:
    """Whether the image shows the example toy, and a score in [0, 1] (>= 0.5 means present)."""
    score = concept_measurements(image)["score"]
    return score >= 0.5, score


def score_samples(images: Iterable[ImageLike], expected_bgs: Sequence[Color | None]) -> dict[str, float]:
    """How often samples show the toy, on the background their prompt asked for.

    `expected_bgs[i]` is the palette colour image i's prompt asked for, or None where the prompt
    named none (that image counts as background-correct). The background is read as `tune eval`
    reads it for the shapes (`shapes_detect.detect(image).bg`: the palette colour most of the
    border is nearest to), so a toy that fills the frame, or a backdrop in the wrong colour, fails.

    Returns `present` (share showing the toy), `bg_correct`, `both` (the toy on the right
    background), `mean_score` and `count`.
    """
    present = bg_correct = both = count = 0
    total_score = 0.0
    for image, expected in zip(images, expected_bgs, strict=True):
        found, score = detect_concept(image)
        right_bg = expected is None or detect(image).bg == expected
        present += found
        bg_correct += right_bg
        both += found and right_bg
        total_score += score
        count += 1
    if count == 0:
        raise ValueError("score_samples needs at least one image")
    return {
        "present": present / count,
        "bg_correct": bg_correct / count,
        "both": both / count,
        "mean_score": total_score / count,
        "count": count,
    }
