"""Helpers and fixtures for the data tests: a corpus of odd and bad photos, tiny models, a stand-in tokenizer.

A plain module (pytest puts tests/data/ on sys.path), imported by the tests and by conftest.py.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Outcomes the corpus must produce: file -> skip reason (bad files) or None (usable).
BAD_FILES = {
    "truncated.jpg": "truncated",
    "empty.png": "empty file",
    "notes.jpg": "not an image",
    "noise.webp": "not an image",
    "tiny.png": "too small",
}
GOOD_FILES = {
    "cmyk.jpg",
    "gray16.png",
    "rgba.png",
    "palette.png",
    "rotated.jpg",
    "wide.png",
    "nested/street.jpg",
}
SIDECARS = {"nested/street.txt": "a red car, street, night, rain", "wide.caption": "a panorama, mountains"}


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 array with gradients and noise: compresses like a photo, so truncation bites."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1), (x + y) % 256], axis=-1)
    noise = rng.normal(0, 25, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save_photo(path: Path, width: int, height: int, seed: int = 0, **save_kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_like(width, height, seed)).save(path, **save_kwargs)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` but holds no pixels: a cheap decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rotated_jpeg(path: Path) -> None:
    """Stored 120x80 with a red block top-left and EXIF orientation 6 (display rotated 90 deg clockwise)."""
    arr = np.full((80, 120, 3), 40, np.uint8)
    arr[:20, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, quality=95, exif=exif.tobytes())


def build_corpus(root: Path) -> Path:
    """7 odd-but-valid photos and 5 bad files (see BAD_FILES / GOOD_FILES)."""
    root.mkdir(parents=True, exist_ok=True)
    # Bad files.
    buf = io.BytesIO()
    Image.fromarray(photo_like(200, 160, seed=1)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    (root / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("these are my notes, not a photo\n")
    (root / "noise.webp").write_bytes(np.random.default_rng(2).bytes(3000))
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "tiny.png")
    # Odd but valid.
    Image.fromarray(photo_like(96, 80, seed=3)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    gradient = (np.arange(96 * 96).reshape(96, 96) * 7).astype(np.uint16)
    Image.fromarray(gradient).save(root / "gray16.png")
    rgba = np.zeros((72, 88, 4), np.uint8)
    rgba[..., :3] = photo_like(88, 72, seed=4)
    rgba[:, 44:, 3] = 255  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    quantized = Image.fromarray(photo_like(80, 80, seed=5)).quantize(16)
    px = np.array(quantized)
    px[:10, :10] = 15  # palette index 15 is the transparent one
    palette = Image.fromarray(px, "P")
    palette.putpalette(quantized.getpalette())
    palette.save(root / "palette.png", transparency=15)
    rotated_jpeg(root / "rotated.jpg")
    save_photo(root / "wide.png", 800, 100, seed=6)
    save_photo(root / "nested" / "street.jpg", 128, 96, seed=7, quality=90)
    for name, text in SIDECARS.items():
        (root / name).write_text(text + "\n")
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, plus the set of folders: to prove a folder was only read."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch ~/.cache/tune from tests."""
    cache = tmp_path_factory.mktemp("tune-cache")
    monkeypatch.setenv("TUNE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return build_corpus(tmp_path / "photos")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Six plain photos of three shapes, two with caption sidecars."""
    root = tmp_path / "plain"
    sizes = [(96, 64), (96, 64), (64, 96), (64, 64), (64, 64), (64, 64)]
    for i, (w, h) in enumerate(sizes):
        save_photo(root / f"p{i}.jpg", w, h, seed=10 + i, quality=92)
    (root / "p0.txt").write_text("sks dog, grass, sunny")
    (root / "p2.caption").write_text("sks dog, sofa")
    return root


class TinyTokenizer:
    """Stand-in for a CLIP tokenizer with the HF call signature: words -> stable ids."""

    model_max_length = 8

    def __call__(self, texts, padding="max_length", max_length=None, truncation=True, return_tensors="pt"):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        length = max_length or self.model_max_length
        rows = []
        for text in texts:
            ids = [1] + [2 + zlib.crc32(w.encode()) % 90 for w in text.replace(",", " ").split()] + [0]
            ids = ids[:length] + [0] * max(0, length - len(ids))
            rows.append(ids)
        return {"input_ids": torch.tensor(rows, dtype=torch.long)}


@pytest.fixture
def tokenizer() -> TinyTokenizer:
    return TinyTokenizer()


def make_tiny_vae(seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def make_tiny_text_encoder(seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()
