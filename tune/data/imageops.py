"""Small numpy image operations shared by our detectors (shapes attributes, the example concept).

numpy only: 3x3 morphology and colour conversion on 64 px images is all the detectors need, and no
installed library offers them without OpenCV/scipy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0-255 (..., 3) -> CIELAB (D65) (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [
            [0.4124564, 0.2126729, 0.0193339],
            [0.3575761, 0.7151522, 0.1191920],
            [0.1804375, 0.0721750, 0.9503041],
        ]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def to_array(
    image: ImageLike, work_resolution: int, min_resolution: int, who: str = "the detector"
) -> np.ndarray:
    """An RGB float32 array in 0-255 at most work_resolution on its short side.

    Arrays may be uint8 (0-255) or float (0-1), HxWx3, HxWx4 (alpha dropped) or HxW (grey).
    """
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"expected an HxWx3 image array; got shape {array.shape}")
        array = array[..., :3]
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255)
        pil = Image.fromarray(array.astype(np.uint8), mode="RGB")
    width, height = pil.size
    if min(width, height) < min_resolution:
        raise ValueError(f"{who} needs images at least {min_resolution}px on a side; got {width}x{height}")
    scale = work_resolution / min(width, height)
    if scale != 1:
        # Down: a box filter averages (and so denoises). Up: bilinear keeps the edges' soft
        # coverage, which the shape features measure, smooth instead of blocky.
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        pil = pil.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)
    return np.asarray(pil, dtype=np.float32)


def box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter (edges replicated) over the first two axes."""
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    h, w = a.shape[:2]
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (8-connected) binary dilation, as a vertical then a horizontal 3-pixel max."""
    tall = mask.copy()
    tall[1:] |= mask[:-1]
    tall[:-1] |= mask[1:]
    out = tall.copy()
    out[:, 1:] |= tall[:, :-1]
    out[:, :-1] |= tall[:, 1:]
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (outside the image counts as set, so the border does not eat regions)."""
    return ~dilate(~mask)


def reconstruct(seed: np.ndarray, within: np.ndarray) -> np.ndarray:
    """The pixels of `within` 8-connected to `seed` (morphological reconstruction)."""
    region = seed & within
    while True:
        grown = dilate(region) & within
        if np.array_equal(grown, region):
            return region
        region = grown
