"""How well a VAE round-trips images: reconstructions, PSNR, and the world judge's reading of them.

The `vae` recipe validates with `reconstruct` / `psnr_db` on held-out renders and ends with
`evaluate_reconstructions` (its `eval/vae.json`): PSNR per style, the share of reconstructions the judge
reads exactly as the originals (also after a blur), and the example subjects' photos round-tripped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from tune import PROJECT_ROOT
from tune.world.scoring import agreement, fresh_renders, per_style, try_load_judge
from tune.world.spec import STYLES

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from tune.world.judge import Judge

CONCEPTS = PROJECT_ROOT / "concepts"
MAX_PSNR_DB = 100.0
"""PSNR of a pixel-exact reconstruction (its MSE is 0), so that means stay finite."""


@torch.no_grad()  # without it 1,000 reconstructions kept their graphs: 23 GB, killed by the OOM killer
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decode the posterior mode of each image (what an encode/decode round trip gives), in [-1, 1]."""
    device = next(vae.parameters()).device
    outs = [
        vae.decode(vae.encode(chunk.to(device)).latent_dist.mode()).sample.clamp(-1, 1).cpu()
        for chunk in pixels.split(batch_size)
    ]
    return torch.cat(outs)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] BCHW tensors -> 8-bit RGB images (what a user would save and see)."""
    arrays = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]


def pixels_of(images: list[Image.Image]) -> torch.Tensor:
    """8-bit RGB images -> a BCHW float tensor in [-1, 1], as the data loader gives them."""
    array = np.stack([np.asarray(img, dtype=np.float32) for img in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def psnr_db(originals: list[Image.Image], recons: list[Image.Image]) -> list[float]:
    """Per-image PSNR of 8-bit images, capped at MAX_PSNR_DB."""
    out = []
    for a, b in zip(originals, recons, strict=True):
        mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)) / 255.0**2
        out.append(min(MAX_PSNR_DB, 10 * math.log10(1 / mse)) if mse > 0 else MAX_PSNR_DB)
    return out


def save_recon_grid(originals: list[Image.Image], recons: list[Image.Image], path: Path) -> None:
    """Originals on the top row, their reconstructions below."""
    side = originals[0].width
    grid = Image.new("RGB", (side * len(originals), side * 2), "white")
    for i, (a, b) in enumerate(zip(originals, recons, strict=True)):
        grid.paste(a, (i * side, 0))
        grid.paste(b, (i * side, side))
    grid.save(path)


def subject_round_trip(vae: AutoencoderKL, resolution: int, judge: Judge | None) -> dict[str, float]:
    """Each example subject's photos (centre square, `resolution` px, as the photo loader crops) through
    the VAE: mean PSNR, and how many reconstructions (and originals) the judge finds the subject in."""
    from tune.data.buckets import crop_box, square_bucket
    from tune.data.images import crop_and_resize
    from tune.world.subjects import SUBJECTS

    square = square_bucket(resolution)
    out: dict[str, float] = {}
    for name in ("sks-toy", "w-person"):
        paths = sorted((CONCEPTS / name / "photos").glob("*.jpg"))
        if not paths:
            continue
        photos = []
        for path in paths:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                photos.append(crop_and_resize(rgb, crop_box(rgb.width, rgb.height, square), rgb.size, square))
        with torch.no_grad():
            recons = to_images(reconstruct(vae, pixels_of(photos)))
        out[f"{name}_psnr_db"] = float(np.mean(psnr_db(photos, recons)))
        out[f"{name}_photos"] = len(photos)
        if judge is not None:
            subject = SUBJECTS[name]
            out[f"{name}_found"] = sum(subject.found(v) for v in judge.read(recons))
            out[f"{name}_found_originals"] = sum(subject.found(v) for v in judge.read(photos))
    return out


def evaluate_reconstructions(vae: AutoencoderKL, count: int, seed: int, resolution: int) -> dict[str, Any]:
    """`count` fresh renders of every style (from `seed`) and the example subjects' photos through the
    VAE: mean PSNR and PSNR per style, and, when this checkout has a judge, its agreement with itself on
    originals and reconstructions (plain and blurred), its per-style reading of the reconstructions and
    the subject round trip's counts."""
    originals, specs = fresh_renders(count, seed, resolution=resolution)
    recons = to_images(reconstruct(vae, pixels_of(originals)))
    psnr = psnr_db(originals, recons)
    by_style = {
        style: float(np.mean([p for p, spec in zip(psnr, specs, strict=True) if spec.style == style]))
        for style in STYLES
    }
    judge = try_load_judge()
    judged: dict[str, Any] = {}
    if judge is not None:
        blurred = [r.filter(ImageFilter.GaussianBlur(1.0)) for r in recons]
        judged = {
            "judge_agreement": agreement(judge, originals, recons),
            "judge_agreement_blurred": agreement(judge, originals, blurred),
            "judge_on_recons": per_style(judge.read(recons), specs),
        }
    return {
        "psnr_db": float(np.mean(psnr)),
        "psnr_db_by_style": by_style,
        **judged,
        **subject_round_trip(vae, resolution, judge),
    }
