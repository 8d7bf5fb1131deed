"""Aspect-ratio buckets and crop boxes.

A bucket is a training size (width, height) whose sides are multiples of `step` (64 for SD's VAE
factor 8 and UNet down-sampling; a tiny model may use its own VAE factor) and whose area is at most
`resolution ** 2`, so memory per sample never exceeds the square case.

Which bucket a photo gets: among all such sizes with area >= resolution ** 2 / 4 and aspect within
`max_aspect`, the largest one whose aspect ratio is within `tolerance` of the photo's (relative:
bucket_aspect / photo_aspect in [1 / (1 + tolerance), 1 + tolerance]); ties go to the closer aspect.
The photo is then scaled to cover the bucket and the overhang cropped, which removes at most about
`tolerance` of one side. At 512 px, step 64, tolerance 0.1 this yields 27 buckets from 256x1024 to
1024x256, all at least 69% of 512^2 pixels. At 1024 px it gives SDXL's familiar sizes (1152x896,
1216x832, 1344x768 ...). Photos more extreme than `max_aspect` go to the most extreme bucket and lose
more to the crop; when no size meets the tolerance (tiny resolutions with few multiples of `step`),
the closest aspect wins.

Square mode (bucketing off) is the single bucket (resolution, resolution).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterable
from typing import Literal

Bucket = tuple[int, int]
"""(width, height) in pixels."""
Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in the photo's (oriented, full-size) pixel coordinates."""


@functools.lru_cache(maxsize=64)
def candidate_buckets(resolution: int, step: int, max_aspect: float) -> tuple[Bucket, ...]:
    """Every size a photo may be assigned: sides multiples of `step`, area in [res^2/4, res^2]."""
    area = resolution * resolution
    longest = int(resolution * math.sqrt(max_aspect)) + step
    sides = range(step, longest + 1, step)
    out = [
        (w, h)
        for w in sides
        for h in sides
        if area / 4 <= w * h <= area and max(w / h, h / w) <= max_aspect + 1e-9
    ]
    if not out:
        # A step larger than half the resolution leaves only the one-step square.
        out = [(step, step)]
    return tuple(out)


def choose_bucket(
    width: int,
    height: int,
    *,
    resolution: int,
    step: int = 64,
    tolerance: float = 0.1,
    max_aspect: float = 4.0,
) -> Bucket:
    """The bucket for a photo of `width` x `height` (see the module docstring for the rule)."""
    aspect = min(max(width / height, 1 / max_aspect), max_aspect)
    limit = math.log1p(tolerance) + 1e-12
    candidates = candidate_buckets(resolution, step, max_aspect)

    def error(b: Bucket) -> float:
        return abs(math.log(b[0] / b[1] / aspect))

    within = [b for b in candidates if error(b) <= limit]
    if within:
        return max(within, key=lambda b: (b[0] * b[1], -error(b)))
    return min(candidates, key=lambda b: (error(b), -b[0] * b[1]))


def square_bucket(resolution: int) -> Bucket:
    """The bucket of square mode."""
    return (resolution, resolution)


def crop_box(
    width: int,
    height: int,
    bucket: Bucket,
    *,
    mode: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
) -> Box:
    """The region of a `width` x `height` photo that, scaled, exactly fills `bucket`.

    The largest region with the bucket's aspect ratio: the photo is scaled to cover the bucket and
    the overhang on one axis is cut, centred or at a random offset (`rng` required for random).
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    box_w, box_h = bw / scale, bh / scale
    spare_x, spare_y = width - box_w, height - box_h
    if mode == "random":
        if rng is None:
            raise ValueError("crop_box(mode='random') needs an rng")
        left, top = rng.uniform(0, spare_x), rng.uniform(0, spare_y)
    else:
        left, top = spare_x / 2, spare_y / 2
    # Rounded to 1/1000 px so the box is a stable part of cache keys across platforms.
    return (round(left, 3), round(top, 3), round(left + box_w, 3), round(top + box_h, 3))


def histogram(buckets: Iterable[Bucket]) -> dict[Bucket, int]:
    """How many photos per bucket, widest-to-tallest order by aspect ratio."""
    counts: dict[Bucket, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[0][0] / kv[0][1], kv[0])))
