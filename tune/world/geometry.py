"""The world's objects as 2.5D geometry: for each pixel, coverage, surface normal, part and pattern.

Every class is drawn in object units: the object's box is [-0.5, 0.5] x [-0.5, 0.5], x right, y down,
z towards the camera. `build(cls, X, Y, pose, pattern)` evaluates one class on a grid of such
coordinates and returns a `Geometry`; the styles in `tune.world.render` turn it into pixels (shaded for
a photo, flat with outlines for a drawing, hatched for a sketch, blocky for pixel art). Hand-written
because no library draws these toys: numpy arrays in, numpy arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Region codes: what colour a pixel of the object takes.
BODY, SKIN, HAIR, TROUSERS, INSIDE = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Pose:
    """Per-image jitter of one object (everything random about it but its place and size)."""

    roll: float = 0.0
    """Rotation of balls and rings in the picture plane (radians)."""
    tilt: float = 0.85
    """A ring's minor over major axis: cos of the camera's angle from straight above."""
    phase: float = 0.0
    """Where a ring's stripes and spots start around it (radians)."""
    mirror: bool = False
    """Draw mirrored: the block's depth goes left, the cup's handle is on the left."""
    arms: float = 0.0
    """How far a person's arms are raised from hanging (radians)."""


@dataclass
class Geometry:
    """Per-pixel fields of one object on a grid (all arrays have the grid's shape)."""

    mask: np.ndarray
    """bool: the object covers this pixel."""
    region: np.ndarray
    """int8: BODY (object colour, takes the pattern), SKIN, HAIR, TROUSERS, INSIDE (a cup's inside)."""
    face: np.ndarray
    """int8: parts drawn with an outline between them (a block's faces, a person's limbs); 0 outside."""
    normal: np.ndarray
    """float32 (3, H, W): unit surface normal, for shading and hatching."""
    pattern: np.ndarray
    """bool: the pattern's second colour (stripes or spots) is here."""
    gloss: float
    """Share of specular highlight in a photo: plastic toys shine, people do not."""


def _unit(nx: np.ndarray, ny: np.ndarray, nz: np.ndarray) -> np.ndarray:
    n = np.stack([nx, ny, nz]).astype(np.float32)
    return n / np.maximum(np.linalg.norm(n, axis=0, keepdims=True), 1e-6)


def _bands(t: np.ndarray, count: int) -> np.ndarray:
    """Odd bands of `count` equal bands over t in [0, 1]: the stripes."""
    return (np.floor(np.clip(t, 0.0, 0.999) * count).astype(np.int32) % 2) == 1


def _spots(a: np.ndarray, b: np.ndarray, spacing: float, radius: float) -> np.ndarray:
    """Dots on a staggered lattice over surface coordinates (a, b)."""
    row = np.floor(b / spacing + 0.5)
    shifted = a / spacing + 0.5 * (row % 2)
    da = (shifted - np.round(shifted)) * spacing
    db = b - row * spacing
    return da * da + db * db <= radius * radius


def _segment(X: np.ndarray, Y: np.ndarray, p: tuple[float, float], q: tuple[float, float]):  # noqa: ANN202
    """Distance from each point to segment pq, and the point's position t along it (0 at p, 1 at q)."""
    vx, vy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((X - p[0]) * vx + (Y - p[1]) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    return np.hypot(X - (p[0] + t * vx), Y - (p[1] + t * vy)), t


def _tube_normal(dist: np.ndarray, half: float, across: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Normal of a round tube of radius `half` seen from the side; `across` is the unit direction away
    from its axis in the picture."""
    s = np.clip(dist / half, 0.0, 1.0)
    return _unit(across[0] * s, across[1] * s, np.sqrt(np.maximum(0.0, 1.0 - s * s)))


# ---------------------------------------------------------------------------------------------
# The classes
# ---------------------------------------------------------------------------------------------


def ball(X: np.ndarray, Y: np.ndarray, pose: Pose, pattern: str) -> Geometry:
    r = 0.5
    mask = X * X + Y * Y <= r * r
    nx, ny = np.clip(X / r, -1, 1), np.clip(Y / r, -1, 1)
    nz = np.sqrt(np.maximum(0.0, 1.0 - nx * nx - ny * ny))
    c, s = math.cos(pose.roll), math.sin(pose.roll)
    nu, nv = nx * c + ny * s, -nx * s + ny * c
    lat = np.arcsin(np.clip(nv, -1, 1))
    if pattern == "striped":
        marks = _bands(lat / math.pi + 0.5, 7)
    else:
        lon = np.arctan2(nu, np.maximum(nz, 1e-3))
        marks = _spots(lon * np.cos(lat), lat, 0.78, 0.2)
    return Geometry(mask, mask.astype(np.int8) * BODY, mask.astype(np.int8), _unit(nx, ny, nz), marks, 0.45)


RING_INNER = 0.42
"""A ring's hole radius over its outer radius: a clear hole, as the example subject has."""


def ring(X: np.ndarray, Y: np.ndarray, pose: Pose, pattern: str) -> Geometry:
    c, s = math.cos(pose.roll), math.sin(pose.roll)
    u = X * c + Y * s
    v = (-X * s + Y * c) / pose.tilt  # undo the tilt's foreshortening: coordinates in the ring's plane
    d = np.hypot(u, v)
    outer, inner = 0.5, 0.5 * RING_INNER
    mid, tube = (outer + inner) / 2, (outer - inner) / 2
    mask = (d <= outer) & (d >= inner)
    t = np.clip((d - mid) / tube, -1.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ur, vr = np.where(d > 0, u / d, 0.0), np.where(d > 0, v / d, 0.0)
    nz = np.sqrt(np.maximum(0.0, 1.0 - t * t))
    nx, ny = t * ur, t * vr
    # Into the camera's frame: the ring's plane is tilted (near side at the bottom), then rolled.
    angle = math.acos(pose.tilt)
    cam_y = ny * math.cos(angle) - nz * math.sin(angle)
    cam_z = ny * math.sin(angle) + nz * math.cos(angle)
    normal = _unit(nx * c - cam_y * s, nx * s + cam_y * c, cam_z)
    around = np.arctan2(v, u) + pose.phase
    if pattern == "striped":
        period = 2 * math.pi / 4
        marks = (around % period) < 0.3 * period  # narrower than the gaps: the ring's colour dominates
    else:
        k = np.round(around / (2 * math.pi / 8))
        centre = k * (2 * math.pi / 8)
        marks = np.hypot(u - mid * np.cos(centre - pose.phase), v - mid * np.sin(centre - pose.phase)) < 0.085
    return Geometry(mask, mask.astype(np.int8) * BODY, mask.astype(np.int8), normal, marks & mask, 0.45)


def block(X: np.ndarray, Y: np.ndarray, pose: Pose, pattern: str) -> Geometry:
    """A cube in oblique view: the front face, the top, and one side (right, or left when mirrored)."""
    x = -X if pose.mirror else X
    a, d = 0.74, 0.26
    x0, top = -0.5, -0.5 + d  # front face: x in [x0, x0 + a], y in [top, top + a]
    front = (x >= x0) & (x <= x0 + a) & (Y >= top) & (Y <= top + a)
    rise = top - Y  # how far above the front's top edge (0..d on the top face)
    over = x - (x0 + a)  # how far right of the front's right edge (0..d on the side)
    top_face = (Y >= -0.5) & (Y < top) & (x - rise >= x0) & (x - rise <= x0 + a)
    side = (over > 0) & (over <= d) & (Y + over >= top) & (Y + over <= top + a) & ~top_face
    mask = front | top_face | side
    face = (front * 1 + top_face * 2 + side * 3).astype(np.int8)
    sx = -0.8 if pose.mirror else 0.8
    normal = np.zeros((3, *X.shape), dtype=np.float32)
    for where, n in ((front, (0.0, 0.0, 1.0)), (top_face, (0.0, -0.8, 0.6)), (side, (sx, 0.0, 0.6))):
        normal[:, where] = np.array(n, dtype=np.float32)[:, None]
    # Face coordinates in [0, 1]: p across, q down (the top face's q runs back to front).
    p = np.where(front, (x - x0) / a, np.where(top_face, (x - rise - x0) / a, over / d))
    q = np.where(top_face, (Y + 0.5) / d, (Y + np.where(side, over, 0.0) - top) / a)
    if pattern == "striped":
        marks = _bands(q, 5) & ~top_face
    else:
        # spots as large as a person's (the same blur at 16x16 latents on the smaller radius 0.075)
        marks = _spots(p * a, q * np.where(top_face, d, a), 0.36, 0.105)
    return Geometry(mask, mask.astype(np.int8) * BODY, face, normal, marks & mask, 0.35)


def cup(X: np.ndarray, Y: np.ndarray, pose: Pose, pattern: str) -> Geometry:
    """A cylinder standing up, open at the top (its inside shows), with a handle on one side."""
    x = -X if pose.mirror else X
    xc, w, y_top, y_bot, ry = -0.08, 0.34, -0.36, 0.38, 0.1
    nx = (x - xc) / w
    inside_w = np.abs(nx) <= 1
    curve = ry * np.sqrt(np.clip(1 - nx * nx, 0, 1))
    rim = inside_w & (((x - xc) / w) ** 2 + ((Y - y_top) / ry) ** 2 <= 1)
    opening = ((x - xc) / (0.86 * w)) ** 2 + ((Y - y_top + 0.01) / (0.8 * ry)) ** 2 <= 1
    side = inside_w & (Y >= y_top) & (Y <= y_bot + curve) & ~rim
    hx, hy = xc + w, 0.0
    ellipse = ((x - hx) / 0.2) ** 2 + ((Y - hy) / 0.25) ** 2
    handle = (ellipse <= 1) & (ellipse >= 0.42) & (x > hx - 0.01) & ~side & ~rim
    mask = rim | side | handle
    region = np.where(rim & opening, INSIDE, BODY) * mask
    face = (side * 1 + rim * 2 + handle * 3).astype(np.int8)
    nz_side = np.sqrt(np.clip(1 - nx * nx, 0, 1))
    sign = -1.0 if pose.mirror else 1.0
    hs = np.clip((np.sqrt(ellipse) - 0.82) / 0.18, -1, 1)
    normal = _unit(
        np.where(side, sign * nx, np.where(handle, sign * hs * np.sign(x - hx), 0.0)),
        np.where(rim, -0.8, 0.0),
        np.where(side, nz_side, np.where(rim, 0.6, np.sqrt(np.clip(1 - hs * hs, 0, 1)))),
    )
    if pattern == "striped":
        marks = _bands((Y - curve - y_top) / (y_bot - y_top), 5) & side
    else:
        marks = _spots(np.arcsin(np.clip(nx, -1, 1)) * w, Y, 0.32, 0.1) & side
    return Geometry(mask, region.astype(np.int8), face, normal, marks, 0.4)


def cone(X: np.ndarray, Y: np.ndarray, pose: Pose, pattern: str) -> Geometry:
    apex, base, rx, ry = -0.5, 0.38, 0.42, 0.12
    h = base - apex
    frac = np.clip((Y - apex) / h, 0, 1)
    half = np.maximum(rx * frac, 1e-4)
    nx = np.clip(X / half, -1, 1)
    body = (Y >= apex) & (Y <= base) & (np.abs(X) <= rx * frac)
    bottom = (Y > base) & ((X / rx) ** 2 + ((Y - base) / ry) ** 2 <= 1)
    mask = body | bottom
    nx = np.where(bottom, np.clip(X / rx, -1, 1), nx)
    normal = _unit(nx * 0.92, np.full_like(X, -0.38), np.sqrt(np.clip(1 - nx * nx, 0, 1)))
    t = (Y - apex - ry * frac * np.sqrt(np.clip(1 - nx * nx, 0, 1))) / h
    if pattern == "striped":
        marks = _bands(t, 5)
    else:
        marks = _spots(np.arcsin(nx) * half, Y, 0.32, 0.1) & (frac > 0.25)
    return Geometry(mask, mask.astype(np.int8) * BODY, mask.astype(np.int8), normal, marks & mask, 0.4)


def person(X: np.ndarray, Y: np.ndarray, pose: Pose, pattern: str) -> Geometry:
    """A figure: round head with hair, a shirt (body and sleeves, which take the pattern), hands,
    trousers. The box is 1 tall and about 0.65 wide."""
    hy, hr = -0.34, 0.15
    dh = np.hypot(X, Y - hy)
    head = dh <= hr
    hair = head & ((Y < hy - 0.01) | ((np.abs(X) > 0.095) & (Y < hy + 0.08)))
    bx, by0, by1, corner = 0.16, -0.2, 0.18, 0.06
    qx, qy = (
        np.maximum(np.abs(X) - (bx - corner), 0),
        np.maximum(np.abs(Y - (by0 + by1) / 2) - ((by1 - by0) / 2 - corner), 0),
    )
    body = np.hypot(qx, qy) <= corner
    arm_half, masks, limbs = 0.037, [], []
    for side in (-1.0, 1.0):
        shoulder = (side * 0.135, -0.16)
        angle = 0.35 + pose.arms
        hand = (side * (0.135 + 0.3 * math.sin(angle)), -0.16 + 0.3 * math.cos(angle))
        dist, _ = _segment(X, Y, shoulder, hand)
        sleeve = (dist <= arm_half) & ~body
        palm = np.hypot(X - hand[0], Y - hand[1]) <= 0.042
        masks.append((sleeve, palm))
        length = math.hypot(hand[0] - shoulder[0], hand[1] - shoulder[1])
        ax, ay = (hand[1] - shoulder[1]) / length, -(hand[0] - shoulder[0]) / length
        sign = np.sign((X - shoulder[0]) * ax + (Y - shoulder[1]) * ay)
        limbs.append(_tube_normal(dist, arm_half, (sign * ax, sign * ay)))
    legs, leg_normal = np.zeros_like(head), np.zeros((3, *X.shape), dtype=np.float32)
    for side in (-1.0, 1.0):
        dist, _ = _segment(X, Y, (side * 0.075, 0.18), (side * 0.085, 0.45))
        leg = dist <= 0.055
        legs |= leg
        leg_normal[:, leg] = _tube_normal(dist, 0.055, (np.sign(X - side * 0.08), np.zeros_like(X)))[:, leg]
    legs &= ~body
    sleeves = masks[0][0] | masks[1][0]
    hands = (masks[0][1] | masks[1][1]) & ~sleeves & ~body
    shirt = (body | sleeves) & ~head
    mask = head | shirt | hands | legs
    region = np.zeros(X.shape, dtype=np.int8)
    region[legs] = TROUSERS
    region[shirt] = BODY
    region[hands] = SKIN
    region[head] = SKIN
    region[hair] = HAIR
    face = np.zeros(X.shape, dtype=np.int8)
    for code, where in ((6, legs), (1, body & ~head), (4, masks[0][0] & ~body), (5, masks[1][0] & ~body)):
        face[where] = code
    face[hands] = 7
    face[head] = 2
    nbx = np.clip(X / bx, -1, 1)
    normal = _unit(nbx * 0.8, np.zeros_like(X), np.sqrt(np.clip(1 - 0.64 * nbx * nbx, 0, 1)))
    normal[:, legs] = leg_normal[:, legs]
    for (sleeve, _palm), limb in zip(masks, limbs, strict=True):
        normal[:, sleeve & ~body] = limb[:, sleeve & ~body]
    sph = _unit(X / hr, (Y - hy) / hr, np.sqrt(np.clip(1 - (dh / hr) ** 2, 0, 1)))
    normal[:, head | hands] = sph[:, head | hands]
    if pattern == "striped":  # two stripes between three bands of the shirt's colour, which dominates
        marks = _bands((Y - by0) / (by1 - by0), 5)
    else:  # few, large spots (radius about 3.5 px on a small person): at 0.06 / 0.17 the judge read a small
        # person's spot colour right in 52-60% of photos and pixel art; at 0.075 / 0.21 the base model's
        # 16x16 latents blurred them into the shirt (a LoRA of w-person found it in 0-5% of backgrounds)
        marks = _spots(X, Y - by0, 0.30, 0.11)
    return Geometry(mask, region, face, normal, marks & shirt, 0.08)


BUILDERS = {"ball": ball, "ring": ring, "block": block, "cup": cup, "cone": cone, "person": person}


def build(cls: str, X: np.ndarray, Y: np.ndarray, pose: Pose, pattern: str) -> Geometry:
    """The geometry of class `cls` over object coordinates (X, Y); `pattern` is plain, striped or spotted."""
    geometry = BUILDERS[cls](X, Y, pose, pattern)
    if pattern == "plain":
        geometry.pattern = np.zeros_like(geometry.mask)
    return geometry
