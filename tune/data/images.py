"""Open a user's photo safely: say why a file is unusable, fix orientation, convert any mode to RGB.

Every function here only reads: files are opened `"rb"` and nothing is written next to them.

Bad files are reported, not raised past the loader: `probe_image` returns an `ImageInfo` or raises
`BadImage` whose `reason` is one of `REASONS` (short, stable words the loader counts and `tune data
check` prints) and whose `detail` says what was seen.

Decompression bombs: the loader's own limit (`max_pixels`) is checked on the header size before any
pixel is decoded. PIL's global `Image.MAX_IMAGE_PIXELS` is left alone (changing it would change it for
every other library in the process); its `DecompressionBombWarning` is silenced here because our limit
already decided, and its `DecompressionBombError` (over twice PIL's limit, about 179 MP) still refuses
the file, with the same reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}
)
"""File suffixes (lower case) that a photo folder scan picks up; everything else is ignored silently."""

Reason = Literal["empty file", "not an image", "truncated", "unreadable", "too small", "too many pixels"]
REASONS: tuple[Reason, ...] = (
    "empty file",
    "not an image",
    "truncated",
    "unreadable",
    "too small",
    "too many pixels",
)

# EXIF orientations 5-8 rotate by 90 degrees, so the stored width and height swap.
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})


class BadImage(Exception):
    """A file the loader skips; `reason` is one of `REASONS`, `detail` what was seen."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: Reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What a successful probe learned about one photo."""

    width: int
    """Width in pixels after EXIF orientation."""
    height: int
    """Height in pixels after EXIF orientation."""
    sha256: str
    """Hex digest of the file's bytes: the photo's identity in the caches."""
    mode: str
    """PIL mode as stored (before conversion to RGB), for the report."""


def read_bytes(path: str | Path) -> bytes:
    """Read a file read-only; an empty file is a `BadImage`."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise BadImage("empty file", "0 bytes")
    return data


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """`Image.open` on bytes with our pixel limit; reads the header only."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides below; PIL's warning would otherwise fire a second, global rule.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too many pixels", str(e).split(" could")[0]) from None
    except UnidentifiedImageError:
        raise BadImage("not an image", "no image format recognises these bytes") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage("too many pixels", f"{width}x{height} is over max_pixels={max_pixels}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not cost the photo; exif_transpose copes the same way
        return 1


def _load(img: Image.Image) -> None:
    """Decode every pixel now: PIL is lazy, and a truncated file only fails here."""
    try:
        img.load()
    except OSError as e:
        if "truncated" in str(e) or "broken data stream" in str(e):
            raise BadImage("truncated", str(e)) from None
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None


def probe_image(data: bytes, *, min_side: int, max_pixels: int) -> ImageInfo:
    """Check that `data` is a complete, large-enough image and return its oriented size and hash.

    Decodes the whole file (that is the only way to catch truncation); JPEGs are decoded at a reduced
    DCT scale, which still reads every byte of the stream but is several times faster on big photos.
    """
    img = _open(data, max_pixels)
    stored_w, stored_h = img.size
    mode = img.mode
    if img.format == "JPEG":
        img.draft(img.mode, (max(1, stored_w // 8), max(1, stored_h // 8)))
    _load(img)
    if _orientation(img) in _SWAPS_SIDES:
        stored_w, stored_h = stored_h, stored_w
    if min(stored_w, stored_h) < min_side:
        raise BadImage("too small", f"{stored_w}x{stored_h} is under min_side={min_side}")
    return ImageInfo(stored_w, stored_h, hashlib.sha256(data).hexdigest(), mode)


def decode_image(data: bytes, *, max_pixels: int, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `data` into an upright RGB image.

    `min_size` (width, height, oriented) lets JPEGs decode at a reduced DCT scale that is still at
    least that large: a 12 MP photo trained at 512 px decodes in a fraction of the time.
    """
    img = _open(data, max_pixels)
    if min_size is not None and img.format == "JPEG":
        want_w, want_h = min_size
        if _orientation(img) in _SWAPS_SIDES:
            want_w, want_h = want_h, want_w
        img.draft(img.mode, (max(1, want_w), max(1, want_h)))
    _load(img)
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def _white_background(img: Image.Image) -> Image.Image:
    """Composite an image with alpha onto white: transparent pixels become white, not black."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit (I;16*) and 32-bit (I, F) grayscale to 8 bits; `convert("L")` would clip, not scale."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 1.0
        # Float images are either 0..1 or 0..255 by convention.
        scale = 255.0 if top <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(arr) * scale, 0, 255)
    else:
        arr = arr.astype(np.int64)
        # Mode "I" also holds 16-bit data (older PIL, TIFF); only a larger maximum means a 32-bit range.
        top = int(arr.max()) if arr.size else 0
        full = 65535 if top <= 65535 else (1 << 31) - 1
        # 8 -> 16 bit is x * 257, so dividing by 257 (= 65535 / 255) and rounding is the exact inverse.
        out = np.clip(arr, 0, full) * (255.0 / full)
    return Image.fromarray(np.rint(out).astype(np.uint8)).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha onto white, palettes (with transparency), CMYK, 1/L, 16-bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _white_background(img)
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    # P, CMYK, 1, L, YCbCr, LAB, HSV: PIL's own conversions are right.
    return img.convert("RGB")


def crop_and_resize(
    img: Image.Image,
    box: tuple[float, float, float, float],
    full_size: tuple[int, int],
    size: tuple[int, int],
) -> Image.Image:
    """Resize the region `box` (in `full_size` pixel coordinates) of `img` to `size` (width, height).

    `img` may be smaller than `full_size` when a JPEG was decoded at a reduced scale; the box is
    rescaled to it. One `resize(box=...)` crops and resamples in a single pass with sub-pixel accuracy.
    """
    sx = img.width / full_size[0]
    sy = img.height / full_size[1]
    left, top, right, bottom = box
    scaled = (left * sx, top * sy, right * sx, bottom * sy)
    # reducing_gap: a cheap integer reduce first, then Lanczos; same look, much faster on big photos.
    return img.resize(size, Image.Resampling.LANCZOS, box=scaled, reducing_gap=3.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image to a CHW float32 tensor in [-1, 1] (what the VAE expects)."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return t.div_(127.5).sub_(1.0)


def min_scale_size(
    full_size: tuple[int, int], box: tuple[float, float, float, float], size: tuple[int, int]
) -> tuple[int, int]:
    """Smallest full-image size whose `box` region still covers `size`: the draft target for JPEGs."""
    box_w = box[2] - box[0]
    box_h = box[3] - box[1]
    scale = max(size[0] / box_w, size[1] / box_h)
    return (math.ceil(full_size[0] * scale), math.ceil(full_size[1] * scale))
