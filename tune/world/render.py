"""Render a `Spec` to pixels: backgrounds and the four styles (photo, drawing, pencil sketch, pixel art).

    image = render(spec, np.random.default_rng(seed), width=64, height=64)

Deterministic: the same spec, generator state and size give the same pixels. The object sits in the
centred square of the picture (so square crops keep it); its box is `SIZE_FRACTION` of the short side,
centred or, when small, in a corner. Styles:

* photo: the object shaded as a 3D surface (diffuse light, a highlight on plastic), a soft contact
  shadow, a lit background with texture, a background lens blur, white balance, vignette and grain
  (the look of `concepts/sks-toy/photos`);
* drawing: flat fills with a two-tone cel shade and dark outlines, flat backgrounds;
* sketch: grey pencil lines and hatching on paper, no colour (colour backgrounds are blank paper);
* pixel: the scene on a coarse grid (32 cells along the short side), few colours, a dark outline.

Hand-written with numpy and Pillow: no library renders this world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from tune.world import geometry as geo
from tune.world.spec import COLORS, PALETTE, Spec

SIZE_FRACTION = {"small": 0.48, "large": 0.68}
"""The object's box side over the picture's short side, before jitter. Small was 0.44: a small toy's
stripes or spots were read wrong in 5-8% of photos and pixel art (large ones: under 1%)."""
SMALL_PERSON_SCALE = 1.15
"""A small person's box is this much larger than a small toy's: its shirt's pattern stays a few pixels
wide at 64 px (a person is narrow: its box is about 0.65 as wide as it is tall)."""
CORNER = 0.30
"""A small object's centre in a corner, as a fraction of the short side from the two near edges."""
POSITION_CENTRE = {
    "center": (0.5, 0.5),
    "top left": (CORNER, CORNER),
    "top right": (1 - CORNER, CORNER),
    "bottom left": (CORNER, 1 - CORNER),
    "bottom right": (1 - CORNER, 1 - CORNER),
}
PIXEL_CELLS = 32
"""Pixel art's grid: cells along the short side (2 px cells at 64 px). With 24 cells (2.7 px) a small
person's shirt was two or three cells inside its outline: the judge read its second colour right in 90%."""

SKIN = (236, 196, 160)
TROUSERS = (52, 58, 84)
INK = (28, 28, 34)
PAPER = (244, 240, 229)
GRAPHITE = (78, 78, 86)
SURFACE_RGB = {
    "wooden table": (172, 122, 76),
    "grass": (78, 152, 58),
    "sand": (222, 197, 146),
    "rug": (150, 46, 58),
}
RUG_LIGHT = (232, 214, 172)
RUG_LINE = (44, 52, 92)


@dataclass(frozen=True)
class Layout:
    """Where and how the object is drawn in one picture (pixels of the output size)."""

    cx: float
    cy: float
    side: float
    pose: geo.Pose
    light: tuple[float, float, float]


def layout(spec: Spec, rng: np.random.Generator, width: int, height: int) -> Layout:
    """Place, size and pose of the object, with mild jitter (size x U(0.9, 1.1), centre +- 3%)."""
    short = min(width, height)
    fx, fy = POSITION_CENTRE[spec.position]
    jitter = rng.uniform(-0.03, 0.03, size=2)
    cx = (width - short) / 2 + (fx + jitter[0]) * short
    cy = (height - short) / 2 + (fy + jitter[1]) * short
    side = SIZE_FRACTION[spec.size] * short * float(rng.uniform(0.9, 1.1))
    if spec.cls == "person" and spec.size == "small":
        side *= SMALL_PERSON_SCALE
    azimuth = math.radians(float(rng.uniform(200, 340)))  # y points down: 270 deg is light from above
    elevation = math.radians(float(rng.uniform(35, 60)))
    light = (
        math.cos(elevation) * math.cos(azimuth),
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
    )
    pose = geo.Pose(
        roll=float(rng.uniform(-0.3, 0.3)),
        tilt=float(rng.uniform(0.72, 0.95)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        mirror=bool(rng.integers(2)),
        arms=float(rng.uniform(-0.15, 0.35)),
    )
    return Layout(cx, cy, side, pose, light)


# ---------------------------------------------------------------------------------------------
# Small image helpers
# ---------------------------------------------------------------------------------------------


def smooth_noise(
    rng: np.random.Generator, height: int, width: int, cells_y: float, cells_x: float
) -> np.ndarray:
    """Noise in about [-1, 1] varying over cells_y x cells_x cells (bicubic upsampled)."""
    gh, gw = max(2, round(cells_y) + 1), max(2, round(cells_x) + 1)
    grid = rng.normal(0.0, 0.5, size=(gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))


def blur(array: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float array in [0, 1] (H, W) or colour array in 0-255 (H, W, 3)."""
    if radius <= 0:
        return array
    if array.ndim == 2:
        image = Image.fromarray(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8), mode="L")
        return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
    image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="RGB")
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def edges(labels: np.ndarray, size: int) -> np.ndarray:
    """Pixels within about size/2 of a change of label: outlines of parts (and of the object, label 0).
    The one-pixel boundary is widened by a blur and a threshold (Pillow's rank filters are 10x slower)."""
    boundary = np.zeros(labels.shape, np.float32)
    boundary[:, 1:] += labels[:, 1:] != labels[:, :-1]
    boundary[1:, :] += labels[1:, :] != labels[:-1, :]
    sigma = max(0.5, size / 2.9)
    # A blurred one-pixel line peaks at 1 / (sqrt(2 pi) sigma); 0.35 of that is about size wide.
    return blur(np.minimum(boundary, 1.0), sigma) > 0.35 / (math.sqrt(2 * math.pi) * sigma)


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx) pixels, zero where it moved away from."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    src = mask[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def hatch(height: int, width: int, spacing: float, direction: int = 1, thickness: float = 0.34) -> np.ndarray:
    """Parallel diagonal lines (direction 1: /, -1: \\) `spacing` pixels apart."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return ((x + direction * y) / spacing) % 1.0 < thickness


def rgb(name: str | None) -> np.ndarray:
    return np.array(PALETTE[name] if name in PALETTE else (0, 0, 0), dtype=np.float32)  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------


def _wood(rng: np.random.Generator, h: int, w: int, short: float) -> tuple[np.ndarray, np.ndarray]:
    """Grain in [0, 1] and plank seams (bool) of a wooden table top."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = short / rng.uniform(10, 14)
    warp = 1.2 * period * smooth_noise(rng, h, w, 2, 3)
    phase = (y + rng.uniform(-0.08, 0.08) * x + warp) / period
    grain = (0.5 + 0.5 * np.sin(2 * math.pi * phase)) ** 3
    plank = short / 3.0
    seams = ((y + rng.uniform(0, plank)) % plank) < max(1.0, short * 0.012)
    return grain.astype(np.float32), seams


def _rug(h: int, w: int, short: float, offset: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Diamond pattern (True: the light diamonds) and the lines between diamonds of a rug."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    p = short / 4.0
    a = ((x + y + offset[0]) / p) % 1.0
    b = ((x - y + offset[1]) / p) % 1.0
    d = np.abs(a - 0.5) + np.abs(b - 0.5)
    return d < 0.42, np.abs(d - 0.42) < 0.06


def background(spec: Spec, rng: np.random.Generator, h: int, w: int, short: float) -> np.ndarray:
    """The background (H, W, 3) in 0-255, drawn in the spec's style (pixel art is drawn in `_pixel`)."""
    name, style = spec.background, spec.style
    if style == "sketch":
        page = np.empty((h, w, 3), np.float32)
        page[:] = PAPER
        page += rng.normal(0, 2.0, size=(h, w, 1)).astype(np.float32)
        lines = np.zeros((h, w), bool)
        if name == "wooden table":
            grain, seams = _wood(rng, h, w, short)
            lines = (grain > 0.9) | seams
        elif name == "grass":
            blades = rng.random((h, w)) < 0.035
            lines = blades
            for k in range(1, max(2, int(short * 0.04))):
                lines = lines | shift(blades, -k, 0)
        elif name == "sand":
            lines = rng.random((h, w)) < 0.04
        elif name == "rug":
            _, lines = _rug(h, w, short, tuple(rng.uniform(0, 1, 2)))
        page[lines] = page[lines] * 0.45 + np.array(GRAPHITE, np.float32) * 0.55
        return page
    if name in COLORS:
        base = np.empty((h, w, 3), np.float32)
        base[:] = rgb(name)
        if style == "photo":
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            angle = rng.uniform(0, 2 * math.pi)
            ramp = ((x - w / 2) * math.cos(angle) + (y - h / 2) * math.sin(angle)) / max(h, w)
            shade = 1.0 + 0.5 * (0.22 * ramp + 0.05 * smooth_noise(rng, h, w, 3, 3))
            base = base * shade[..., None]
        return base
    base = np.empty((h, w, 3), np.float32)
    base[:] = SURFACE_RGB[name]
    photo = style == "photo"
    if name == "wooden table":
        grain, seams = _wood(rng, h, w, short)
        if photo:
            base = base * (1.0 - 0.22 * grain)[..., None] * (1 - 0.35 * seams)[..., None]
        else:
            base[grain > 0.85] = (126, 84, 48)
            base[seams] = (92, 60, 34)
    elif name == "grass":
        if photo:
            streaks = smooth_noise(rng, h, w, short / 8, short / 2.5)
            base = (
                base
                * (1.0 + 0.3 * streaks)[..., None]
                * (1.0 + 0.1 * smooth_noise(rng, h, w, 3, 3))[..., None]
            )
        else:
            blades = rng.random((h, w)) < 0.03
            tufts = blades.copy()
            for k in range(1, max(2, int(short * 0.05))):
                tufts |= shift(blades, -k, 0)
            base[tufts] = (40, 100, 34)
    elif name == "sand":
        if photo:
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            ripple = np.sin(2 * math.pi * (y / (short / 9) + 0.8 * smooth_noise(rng, h, w, 2, 2)))
            fine = rng.normal(0, 1, size=(h, w)).astype(np.float32)
            base = base * (1.0 + 0.045 * ripple + 0.025 * fine)[..., None]
        else:
            base[rng.random((h, w)) < 0.03] = (170, 140, 92)
    else:  # rug
        light, lines = _rug(h, w, short, tuple(rng.uniform(0, 1, 2)))
        base[light] = RUG_LIGHT
        base[lines] = RUG_LINE
        if photo:
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            pitch = max(2.0, short / 40)
            weave = np.sin(2 * math.pi * x / pitch) * np.sin(2 * math.pi * y / pitch)
            base = base * (1.0 + 0.05 * weave + 0.06 * smooth_noise(rng, h, w, 3, 3))[..., None]
    return base


# ---------------------------------------------------------------------------------------------
# The object, per style
# ---------------------------------------------------------------------------------------------


def _object(spec: Spec, lay: Layout, h: int, w: int, scale: float) -> geo.Geometry:
    """The object's geometry on an h x w canvas that is `scale` times the output size."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    X = ((x + 0.5) / scale - lay.cx) / lay.side
    Y = ((y + 0.5) / scale - lay.cy) / lay.side
    return geo.build(spec.cls, X, Y, lay.pose, spec.pattern)


def _albedo(spec: Spec, g: geo.Geometry) -> np.ndarray:
    out = np.zeros((*g.mask.shape, 3), np.float32)
    body = rgb(spec.color)
    out[g.region == geo.BODY] = body
    out[g.region == geo.INSIDE] = body * 0.55
    out[g.region == geo.SKIN] = SKIN
    out[g.region == geo.TROUSERS] = TROUSERS
    if spec.hair:
        out[g.region == geo.HAIR] = rgb(spec.hair)
    if spec.color2:
        out[g.pattern & (g.region == geo.BODY)] = rgb(spec.color2)
    return out


def _lambert(g: geo.Geometry, light: tuple[float, float, float]) -> np.ndarray:
    return np.maximum(0.0, np.tensordot(np.array(light, np.float32), g.normal, axes=1))


def _photo(
    spec: Spec, lay: Layout, rng: np.random.Generator, width: int, height: int, ss: int
) -> Image.Image:
    h, w, short = height * ss, width * ss, min(width, height) * ss
    ground = background(spec, rng, h, w, short)
    ground = blur(ground, short * 0.006)  # the background is out of focus
    g = _object(spec, lay, h, w, ss)
    mask = g.mask.astype(np.float32)
    lambert = _lambert(g, lay.light)
    half = np.array([lay.light[0], lay.light[1], lay.light[2] + 1.0], np.float32)
    specular = np.maximum(0.0, np.tensordot(half / np.linalg.norm(half), g.normal, axes=1)) ** 40
    shade = np.where(g.region == geo.INSIDE, 0.55, 0.42 + 0.62 * lambert)
    colour = _albedo(spec, g) * shade[..., None] + 255.0 * g.gloss * specular[..., None]
    side = lay.side * ss
    footprint = shift(
        mask, round(-lay.light[1] * side * 0.08 + side * 0.04), round(-lay.light[0] * side * 0.1)
    )
    cast = blur(footprint, max(1.0, side * 0.06))
    contact = blur(mask, max(1.0, side * 0.02))
    ground = ground * (1.0 - float(rng.uniform(0.35, 0.5)) * cast - 0.2 * contact)[..., None]
    scene = ground * (1.0 - mask[..., None]) + colour * mask[..., None]
    image = Image.fromarray(np.clip(np.rint(scene), 0, 255).astype(np.uint8), mode="RGB")
    image = image.resize((width, height), Image.Resampling.BOX)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.25, 0.5)) * min(width, height) / 64))
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.97, 1.03, size=3).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r2 = ((x - width / 2) / width) ** 2 + ((y - height / 2) / height) ** 2
    pixels = pixels * (1.0 - 0.3 * r2)[..., None]
    grain = float(rng.uniform(2.0, 4.0))
    pixels = pixels + rng.normal(0.0, grain, size=(height, width, 1)).astype(np.float32)
    pixels = pixels + rng.normal(0.0, grain * 0.35, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def _drawing(
    spec: Spec, lay: Layout, rng: np.random.Generator, width: int, height: int, ss: int
) -> Image.Image:
    h, w, short = height * ss, width * ss, min(width, height) * ss
    scene = background(spec, rng, h, w, short)
    g = _object(spec, lay, h, w, ss)
    tone = np.where(_lambert(g, lay.light) >= 0.35, 1.0, 0.78)
    colour = _albedo(spec, g) * tone[..., None]
    scene[g.mask] = colour[g.mask]
    thin = 0.6 if spec.cls == "person" else 1.0  # a person's limbs are thin: so are their outlines
    outer = edges(g.mask.astype(np.int8), round(lay.side * ss * 0.06 * thin))
    inner = edges(g.face, round(lay.side * ss * 0.03)) & g.mask
    scene[outer | inner] = INK
    image = Image.fromarray(np.clip(np.rint(scene), 0, 255).astype(np.uint8), mode="RGB")
    return image.resize((width, height), Image.Resampling.BOX)


def _sketch(
    spec: Spec, lay: Layout, rng: np.random.Generator, width: int, height: int, ss: int
) -> Image.Image:
    h, w, short = height * ss, width * ss, min(width, height) * ss
    scene = background(spec, rng, h, w, short)
    g = _object(spec, lay, h, w, ss)
    side = lay.side * ss
    spacing = max(3.0, short * 0.05)
    single, cross = hatch(h, w, spacing, 1), hatch(h, w, spacing, -1)
    dense = hatch(h, w, spacing * 0.5, 1)
    shadow = _lambert(g, lay.light) < 0.5
    dark = (shadow & single) | (g.pattern & (single | cross)) | ((g.region == geo.INSIDE) & dense)
    page = np.array(PAPER, np.float32)
    scene[g.mask] = page
    shaded = (g.region == geo.HAIR) | (g.region == geo.TROUSERS)  # pencil rubbed in: mid grey
    scene[shaded] = page * 0.45 + np.array(GRAPHITE, np.float32) * 0.55
    ground_shadow = blur(shift(g.mask.astype(np.float32), round(side * 0.05), 0), side * 0.03) > 0.5
    lines = (ground_shadow & ~g.mask & cross) | (g.mask & dark)
    scene[lines] = scene[lines] * 0.5 + np.array(GRAPHITE, np.float32) * 0.5
    pattern_edges = edges(g.pattern.astype(np.int8) + 2 * g.face, round(side * 0.025)) & g.mask
    outline = edges(g.mask.astype(np.int8), round(side * 0.045))
    scene[outline | pattern_edges] = GRAPHITE
    image = Image.fromarray(np.clip(np.rint(scene), 0, 255).astype(np.uint8), mode="RGB")
    return image.resize((width, height), Image.Resampling.BOX)


def _pixel(spec: Spec, lay: Layout, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    short = min(width, height)
    cell = short / PIXEL_CELLS
    gw, gh = max(1, round(width / cell)), max(1, round(height / cell))
    grid_lay = Layout(lay.cx / cell, lay.cy / cell, lay.side / cell, lay.pose, lay.light)
    scene = background(spec, rng, gh, gw, PIXEL_CELLS)
    g = _object(spec, grid_lay, gh, gw, 1.0)
    lambert = _lambert(g, lay.light)
    tone = np.where(lambert < 0.3, 0.72, np.where((lambert > 0.9) & (g.gloss > 0.2), 1.18, 1.0))
    colour = np.clip(_albedo(spec, g) * tone[..., None], 0, 255)
    scene[g.mask] = colour[g.mask]
    m = g.mask
    border = m & ~(shift(m, 1, 0) & shift(m, -1, 0) & shift(m, 0, 1) & shift(m, 0, -1))
    scene[border] = np.minimum(colour[border] * 0.4, 60)
    image = Image.fromarray(np.clip(np.rint(scene), 0, 255).astype(np.uint8), mode="RGB")
    return image.resize((width, height), Image.Resampling.NEAREST)


def supersample(width: int, height: int) -> int:
    """Drawing scale: about 192 px on the short side, so edges are antialiased (3x at 64 px)."""
    return max(1, math.ceil(192 / min(width, height)))


def render(spec: Spec, rng: np.random.Generator, width: int = 64, height: int = 64) -> Image.Image:
    """The picture of `spec` (an RGB PIL image); everything random comes from `rng`."""
    if min(width, height) < 16:
        raise ValueError(f"width and height must be >= 16; got {width}x{height}")
    lay = layout(spec, rng, width, height)
    if spec.style == "pixel":
        return _pixel(spec, lay, rng, width, height)
    ss = supersample(width, height)
    draw = {"photo": _photo, "drawing": _drawing, "sketch": _sketch}[spec.style]
    return draw(spec, lay, rng, width, height, ss)


def object_mask(spec: Spec, rng: np.random.Generator, width: int = 64, height: int = 64) -> np.ndarray:
    """Where the object of `render(spec, rng, ...)` is (bool, H x W), for an `rng` in the same state."""
    lay = layout(spec, rng, width, height)
    return _object(spec, lay, height, width, 1.0).mask
