"""The example subject the personalization recipes teach: photo-like pictures of one distinctive toy.

The toy is a glossy pink plastic ring (a torus with a clear hole) wrapped by four teal stripes, like a
small swim ring. It is built to be something the shapes base model cannot already draw, and that a
simple detector (`tune.data.example_concept_detect`) can still find in a blurry 64x64 sample:

* two colours that are in none of the shapes palette's eight (hot pink and teal sit between the
  palette's hues: pink between red and purple, teal between green and blue);
* a hole in the middle, so that no filled shape, of any colour, looks like it;
* four stripes, each about a tenth of the ring's circumference, so the second colour covers 40% of
  the ring and survives downscaling to 64x64.

The pictures look like photos rather than like the flat shapes dataset: the ring is shaded as a 3D
torus lit from one side (with a specular highlight), seen slightly from above (an ellipse) with a
random roll; it casts a soft contact shadow on a background that is a gradient with soft texture
(fabric, wood or plain) in assorted colours, most of them not in the palette; then lens blur, a
white-balance cast, vignetting, grain and JPEG compression. Every picture is a function of the
random generator it is given, so `write_concept_photos(out, seed=s)` always writes the same files.

    python scripts/make_example_concept.py --out concepts/sks-toy/photos --seed 0
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np
from PIL import Image, ImageFilter

from tune.data.shapes import PALETTE, Color
from tune.errors import DataError

RGB: TypeAlias = tuple[int, int, int]
Texture = Literal["plain", "fabric", "wood"]

TOY_BODY_RGB: RGB = (235, 80, 170)
"""Hot pink: CIELAB hue 347 deg, between the palette's red (35) and purple (316)."""
TOY_BAND_RGB: RGB = (30, 195, 195)
"""Teal: CIELAB hue 197 deg, between the palette's green (141) and blue (297)."""


@dataclass(frozen=True)
class ToyDesign:
    """What the toy looks like. The default is the example subject; tests vary it to make look-alikes."""

    body_rgb: RGB = TOY_BODY_RGB
    """Colour of the ring's plastic."""
    band_rgb: RGB = TOY_BAND_RGB
    """Colour of the stripes across the ring."""
    inner_ratio: float = 0.42
    """Radius of the hole over the ring's outer radius; 0 draws a disc (no hole)."""
    bands: int = 4
    """Number of stripes, evenly spaced around the ring; 0 draws a plain ring."""
    band_fraction: float = 0.42
    """Share of each stripe's period (360 deg / bands) that is stripe: 0.42 * 90 deg = 38 deg, wide
    enough that a stripe's middle keeps its colour through a 64x64 downscale and a blur."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.inner_ratio < 1.0:
            raise ValueError(f"ToyDesign.inner_ratio must be in [0, 1); got {self.inner_ratio}")
        if self.bands < 0:
            raise ValueError(f"ToyDesign.bands must be >= 0; got {self.bands}")
        if not 0.0 < self.band_fraction < 1.0:
            raise ValueError(f"ToyDesign.band_fraction must be in (0, 1); got {self.band_fraction}")


TOY = ToyDesign()

PHOTO_BACKGROUNDS: dict[str, tuple[RGB, Texture]] = {
    "linen": ((226, 216, 196), "fabric"),
    "oak": ((186, 140, 92), "wood"),
    "slate": ((92, 102, 114), "plain"),
    "sage": ((150, 174, 138), "fabric"),
    "peach": ((238, 202, 172), "plain"),
    "sand": ((214, 190, 150), "plain"),
    "charcoal": ((58, 58, 64), "fabric"),
    "walnut": ((110, 78, 52), "wood"),
    "mist": ((200, 204, 210), "plain"),
    "butter": ((236, 220, 160), "fabric"),
}
"""Surfaces the toy is photographed on when no background is asked for: tabletops, cloths and walls.
None is pink, or blue enough to pass for teal; none is a palette colour, so the subject is not
learned together with one backdrop."""

CONCEPT_PHOTOS: tuple[tuple[int, int, str], ...] = (
    (512, 512, "linen"),
    (640, 480, "oak"),
    (384, 512, "peach"),
    (96, 96, "green"),
    (320, 240, "slate"),
    (240, 320, "sand"),
    (448, 336, "charcoal"),
    (256, 256, "blue"),
    (360, 480, "sage"),
    (160, 128, "yellow"),
)
"""(width, height, background) of the example concept's photos, in file order: square, landscape and
portrait, 96 to 640 pixels; seven surfaces and three palette colours (which the validation prompts
ask for, so the model has seen the toy on a flat colour at least once)."""

PHOTO_JPEG_QUALITY = 85
MIN_PHOTO_SIDE = 32
_SUPERSAMPLE = 2
"""The scene is drawn at this multiple of the output size and box-filtered down, for clean edges."""


# ---------------------------------------------------------------------------------------------
# Background
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Noise in about [-1, 1] that varies over `cells` cells along the long side (bicubic upsampled)."""
    gh = max(2, round(cells * height / max(height, width)) + 1)
    gw = max(2, round(cells * width / max(height, width)) + 1)
    grid = rng.normal(0.0, 0.5, size=(gh, gw)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def _background(
    rng: np.random.Generator, height: int, width: int, rgb: RGB, texture: Texture, strength: float
) -> np.ndarray:
    """A lit surface of colour `rgb` (H, W, 3) in 0-255: a light falloff gradient and soft texture.

    `strength` scales every variation: palette backgrounds use less, so that each pixel stays
    nearest to its palette colour (what the shapes detector's background reading votes on).
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    side = float(max(height, width))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = ((x - width / 2) * math.cos(angle) + (y - height / 2) * math.sin(angle)) / side
    shade = 1.0 + strength * (0.22 * ramp + 0.05 * _smooth_noise(rng, height, width, 3))
    base = np.asarray(rgb, dtype=np.float32)
    if texture == "wood":
        # Grain: stripes along a slightly tilted axis, warped by smooth noise, darker late wood.
        tilt = rng.uniform(-0.15, 0.15)
        period = side / rng.uniform(24, 36)
        warp = 1.5 * period * _smooth_noise(rng, height, width, 2)
        fine = 0.12 * period * _smooth_noise(rng, height, width, 10)
        phase = (y + tilt * x + warp + fine) / period
        grain = 0.7 * (0.5 + 0.5 * np.sin(2 * math.pi * phase)) ** 4
        grain += 0.3 * (0.5 + 0.5 * np.sin(2 * math.pi * 2.7 * phase + 1.0)) ** 2
        shade = shade * (1.0 - strength * 0.12 * grain)
    elif texture == "fabric":
        # Weave: a faint fine crosshatch of threads.
        pitch = rng.uniform(2.5, 4.0) * _SUPERSAMPLE
        weave = np.sin(2 * math.pi * x / pitch) * np.sin(2 * math.pi * y / pitch)
        shade = shade * (1.0 + strength * 0.025 * weave)
    # A little per-channel variation so the colour itself, not just its brightness, drifts.
    tint = 1.0 + strength * 0.025 * np.stack([_smooth_noise(rng, height, width, 2) for _ in range(3)], -1)
    return base * shade[..., None] * tint


# ---------------------------------------------------------------------------------------------
# The toy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    cx: float
    cy: float
    radius: float
    aspect: float
    """Minor over major axis of the ring's outline: cos of the camera's tilt from straight above."""
    roll: float
    phase: float
    light: tuple[float, float, float]


def _toy_layer(pose: _Pose, design: ToyDesign, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The shaded toy (H, W, 3) in 0-255 and its coverage mask (H, W) in {0, 1}."""
    rgb_full = np.zeros((height, width, 3), dtype=np.float32)
    mask_full = np.zeros((height, width), dtype=np.float32)
    # Shade only the toy's bounding box: most of a photo is background.
    top, bottom = (
        max(0, math.floor(pose.cy - pose.radius) - 1),
        min(height, math.ceil(pose.cy + pose.radius) + 2),
    )
    left, right = (
        max(0, math.floor(pose.cx - pose.radius) - 1),
        min(width, math.ceil(pose.cx + pose.radius) + 2),
    )
    if top >= bottom or left >= right:
        return rgb_full, mask_full
    y, x = np.mgrid[top:bottom, left:right].astype(np.float32)
    x -= pose.cx
    y -= pose.cy
    cos_r, sin_r = math.cos(pose.roll), math.sin(pose.roll)
    u = x * cos_r + y * sin_r
    v = (-x * sin_r + y * cos_r) / pose.aspect  # undo the tilt's foreshortening: the ring's plane
    d = np.hypot(u, v)
    outer = pose.radius
    inner = pose.radius * design.inner_ratio
    mid, tube = (outer + inner) / 2, (outer - inner) / 2
    t = np.clip((d - mid) / tube, -1.0, 1.0)
    mask = (d <= outer) & (d >= inner)

    # Torus normal in the ring's frame: radial tilt t, height sqrt(1 - t^2) out of the ring's plane.
    # A disc (inner_ratio 0) is a dome instead: the same formula with the "tube" spanning the radius.
    with np.errstate(invalid="ignore", divide="ignore"):
        ur, vr = np.where(d > 0, u / d, 0.0), np.where(d > 0, v / d, 0.0)
    if design.inner_ratio <= 0:
        t = np.clip(d / outer, 0.0, 1.0)
    nz = np.sqrt(np.maximum(0.0, 1.0 - t * t))
    nx, ny = t * ur, t * vr
    # Into the camera's frame (image x right, y down, z to the camera): the ring's plane is tilted
    # so that its near side is at the bottom of the picture; then undo the roll.
    tilt = math.acos(pose.aspect)
    cy_, sy_ = math.cos(tilt), math.sin(tilt)
    cam_y = ny * cy_ - nz * sy_
    cam_z = ny * sy_ + nz * cy_
    cam_x = nx * cos_r - cam_y * sin_r
    cam_y = nx * sin_r + cam_y * cos_r
    lx, ly, lz = pose.light
    lambert = np.maximum(0.0, cam_x * lx + cam_y * ly + cam_z * lz)
    hx, hy, hz = lx, ly, lz + 1.0
    norm = math.sqrt(hx * hx + hy * hy + hz * hz)
    specular = np.maximum(0.0, (cam_x * hx + cam_y * hy + cam_z * hz) / norm) ** 40

    colour = np.empty((*d.shape, 3), dtype=np.float32)
    colour[:] = design.body_rgb
    if design.bands > 0:
        period = 2 * math.pi / design.bands
        around = (np.arctan2(v, u) + pose.phase) % period
        colour[around < design.band_fraction * period] = design.band_rgb
    # Ambient plus diffuse, and a white highlight: glossy plastic.
    rgb = colour * (0.42 + 0.62 * lambert)[..., None] + 255.0 * 0.45 * specular[..., None]
    rgb_full[top:bottom, left:right] = rgb
    mask_full[top:bottom, left:right] = mask
    return rgb_full, mask_full


def _blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a mask in [0, 1] (Pillow blurs 8-bit images only; 256 levels do for shadows)."""
    image = Image.fromarray(np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8), mode="L")
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx) pixels, zero where it moved away from (np.roll would wrap around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    src = mask[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def _resolve_bg(bg: str | RGB | None, rng: np.random.Generator) -> tuple[RGB, Texture, float]:
    """The surface colour, texture and variation strength for `render_photo`'s `bg`."""
    if bg is None:
        names = sorted(PHOTO_BACKGROUNDS)
        rgb, texture = PHOTO_BACKGROUNDS[names[int(rng.integers(len(names)))]]
        return rgb, texture, 1.0
    if isinstance(bg, str):
        if bg in PHOTO_BACKGROUNDS:
            rgb, texture = PHOTO_BACKGROUNDS[bg]
            return rgb, texture, 1.0
        if bg not in PALETTE:
            known = ", ".join([*PALETTE, *PHOTO_BACKGROUNDS])
            raise ValueError(
                f"bg must be a palette colour, a photo background or an RGB tuple ({known}); got {bg!r}"
            )
        return PALETTE[bg], "plain", 0.5  # type: ignore[index]
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ValueError(f"an RGB bg must be three values in 0-255; got {bg!r}")
    return (int(bg[0]), int(bg[1]), int(bg[2])), "plain", 0.5


def render_photo(
    rng: np.random.Generator,
    width: int,
    height: int,
    bg: Color | str | RGB | None = None,
    *,
    design: ToyDesign = TOY,
    scale: float | None = None,
    jpeg_quality: int | None = 90,
) -> Image.Image:
    """A photo-like RGB picture of the toy, `width` x `height`; everything random comes from `rng`.

    `bg` is a shapes palette colour ("blue": a nearly flat backdrop of that colour), a name in
    `PHOTO_BACKGROUNDS`, an RGB tuple, or None for a random photo background. `scale` is the ring's
    outer diameter as a fraction of the short side (default: random in [0.38, 0.7]). The toy always
    lies inside the centred square crop, so square crops and buckets keep all of it. With
    `jpeg_quality`, the picture is JPEG-compressed and decoded again, as a photo file would be
    (`write_concept_photos` renders with None and compresses once, when it saves).
    """
    if min(width, height) < MIN_PHOTO_SIDE:
        raise ValueError(f"width and height must be >= {MIN_PHOTO_SIDE}; got {width}x{height}")
    if scale is not None and not 0.05 <= scale <= 0.95:
        raise ValueError(f"scale must be in [0.05, 0.95]; got {scale}")
    surface, texture, strength = _resolve_bg(bg, rng)
    scale = float(rng.uniform(0.38, 0.7)) if scale is None else scale

    w, h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    short = min(w, h)
    radius = scale * short / 2
    aspect = float(rng.uniform(0.72, 0.95))
    # Stay inside the centred square, with a margin for the shadow.
    room = max(0.0, short / 2 - radius * 1.12)
    cx = w / 2 + float(rng.uniform(-room, room))
    cy = h / 2 + float(rng.uniform(-room, room)) * 0.8
    # Light from the upper left or upper right, above the table.
    azimuth = math.radians(float(rng.uniform(200, 340)))  # image y points down: 270 deg is "up"
    elevation = math.radians(float(rng.uniform(35, 60)))
    light = (
        math.cos(elevation) * math.cos(azimuth),
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
    )
    pose = _Pose(
        cx=cx,
        cy=cy,
        radius=radius,
        aspect=aspect,
        roll=float(rng.uniform(-0.3, 0.3)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        light=light,
    )

    ground = _background(rng, h, w, surface, texture, strength)
    toy_rgb, toy_mask = _toy_layer(pose, design, h, w)
    # Contact shadow: the footprint pushed away from the light and blurred, plus a tight dark
    # rim where the toy touches the table (ambient occlusion).
    tube = radius * (1 - design.inner_ratio) / 2
    shift_x = round(-light[0] * tube * 0.9)
    shift_y = round(-light[1] * tube * 0.9 + tube * 0.25)
    footprint = _shift(toy_mask, shift_y, shift_x)
    cast = _blur_mask(footprint, max(1.0, tube * 0.55))
    contact = _blur_mask(toy_mask, max(1.0, tube * 0.18))
    darkness = float(rng.uniform(0.35, 0.5))
    ground = ground * (1.0 - darkness * cast - 0.25 * contact)[..., None]
    scene = ground * (1.0 - toy_mask[..., None]) + toy_rgb * toy_mask[..., None]

    # Camera: downsample (box filter = exact coverage), lens softness, white balance, vignette, grain.
    scene_u8 = np.clip(np.rint(scene), 0, 255).astype(np.uint8)
    image = Image.fromarray(scene_u8, mode="RGB").resize((width, height), Image.Resampling.BOX)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.6))))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * rng.uniform(0.96, 1.04, size=3).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r2 = ((x - width / 2) / width) ** 2 + ((y - height / 2) / height) ** 2
    pixels = pixels * (1.0 - strength * 0.35 * r2)[..., None]
    grain = float(rng.uniform(2.0, 4.0))
    luma_noise = rng.normal(0.0, grain, size=(height, width, 1))
    chroma_noise = rng.normal(0.0, grain * 0.35, size=(height, width, 3))
    pixels = pixels + (luma_noise + chroma_noise).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


# ---------------------------------------------------------------------------------------------
# The example concept's photo folder
# ---------------------------------------------------------------------------------------------


def concept_photo_names(count: int = len(CONCEPT_PHOTOS)) -> list[str]:
    """File names `write_concept_photos` uses for `count` photos."""
    return [f"sks_toy_{i:02d}.jpg" for i in range(count)]


def render_concept_photo(index: int, seed: int = 0) -> Image.Image:
    """Photo `index` of the example concept (before JPEG): size and background from `CONCEPT_PHOTOS`
    (cycled), everything else from a generator seeded with (seed, index)."""
    if index < 0:
        raise ValueError(f"index must be >= 0; got {index}")
    width, height, bg = CONCEPT_PHOTOS[index % len(CONCEPT_PHOTOS)]
    rng = np.random.default_rng([seed, index])
    return render_photo(rng, width, height, bg, jpeg_quality=None)


def write_concept_photos(
    out_dir: str | Path,
    count: int = len(CONCEPT_PHOTOS),
    seed: int = 0,
    *,
    overwrite: bool = False,
    quality: int = PHOTO_JPEG_QUALITY,
) -> list[Path]:
    """Write `count` JPEGs of the toy (`sks_toy_00.jpg`, ...) into `out_dir`; the same seed gives the
    same files. Existing files of those names are an error unless `overwrite`; other files are left."""
    if count <= 0:
        raise ValueError(f"count must be > 0; got {count}")
    out = Path(out_dir)
    paths = [out / name for name in concept_photo_names(count)]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise DataError(
            f"{len(existing)} photo(s) already exist in {out} (e.g. {existing[0].name}); "
            "pass overwrite=True (--force) to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(paths):
        # Baseline JPEG without optimisation flags: the bytes depend only on pixels and quality.
        render_concept_photo(index, seed).save(path, "JPEG", quality=quality)
    return paths


def contact_sheet(images: Sequence[Image.Image], cell: int = 160, columns: int = 5) -> Image.Image:
    """The images fitted into `cell`-pixel squares on a grey sheet, `columns` across (for looking)."""
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), (128, 128, 128))
    for i, image in enumerate(images):
        thumb = image.copy()
        thumb.thumbnail((cell - 4, cell - 4), Image.Resampling.LANCZOS)
        x = (i % columns) * cell + (cell - thumb.width) // 2
        y = (i // columns) * cell + (cell - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    return sheet
