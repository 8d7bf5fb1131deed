"""Benchmark the latent cache: encode 100 synthetic 512 px photos with a tiny VAE on CPU, then rerun.

    python bench/data_cache.py [--images 100] [--size 512] [--batch-size 8]

Prints the first run's encode time and the second run's hit rate (expected: 100%, no encoding).
Everything (photos, cache) lives in a temporary folder that is removed afterwards. The VAE has SD's
topology (4 blocks, factor 8) at tiny widths, randomly initialised: this measures the loader and
cache machinery plus a small encoder, not SD's real VAE.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tune.data.config import DataConfig
from tune.data.loader import build_dataset, cache_latents


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour fields plus noise and a few shapes: JPEG-compresses like a photo."""
    y, x = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(3 * x + a), np.cos(2 * y + b), np.sin(2 * (x + y) + c)], axis=-1)
    img = (base * 0.5 + 0.5) * 255 + rng.normal(0, 12, (size, size, 3))
    for _ in range(5):
        cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 20, size // 5))]
        mask = (np.mgrid[0:size, 0:size][1] - cx) ** 2 + (np.mgrid[0:size, 0:size][0] - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        photos, cache = Path(tmp) / "photos", Path(tmp) / "cache"
        photos.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            photo_like(rng, args.size).save(photos / f"photo_{i:03d}.jpg", quality=90)
        cfg = DataConfig(resolution=args.size, cache_latents=True)
        vae = tiny_vae()
        torch.set_grad_enabled(False)

        t0 = time.perf_counter()
        dataset = build_dataset(photos, cfg, cache_dir=cache)
        scan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = cache_latents(dataset, vae, batch_size=args.batch_size)
        encode_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        dataset = build_dataset(photos, cfg, cache_dir=cache)
        second = cache_latents(dataset, tiny_vae(), batch_size=args.batch_size)
        second_s = time.perf_counter() - t0

    print(f"images: {args.images} at {args.size}x{args.size}, CPU threads: {torch.get_num_threads()}")
    print(f"scan (decode + check): {scan_s:.2f} s")
    print(
        f"first run encode: {encode_s:.2f} s for {first.encoded} latents "
        f"({first.encoded / encode_s:.1f} img/s)"
    )
    print(
        f"second run: {second.loaded} loaded, {second.encoded} encoded, hit rate {100 * second.hit_rate:.0f}% "
        f"(scan + cache check {second_s:.2f} s)"
    )


if __name__ == "__main__":
    main()
