"""Opening messy photos: bad-file reasons, orientation, modes, decompression bombs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from tune.data.config import DataConfig
from tune.data.images import BadImage, decode_image, probe_image, read_bytes, to_rgb, to_tensor
from tune.data.sources import scan_folder

from data_testkit import BAD_FILES, GOOD_FILES, png_header_only, rotated_jpeg, save_photo

MAX = DataConfig().max_pixels


def decode(path: Path) -> Image.Image:
    return decode_image(read_bytes(path), max_pixels=MAX)


def test_each_bad_file_is_skipped_with_its_reason(corpus: Path) -> None:
    scan = scan_folder(corpus, DataConfig())
    assert {s.name: s.reason for s in scan.skipped} == BAD_FILES
    assert {r.name for r in scan.records} == GOOD_FILES
    # Detected truncation must not come from a global switch someone flipped.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    save_photo(tmp_path / "a.jpg", 80, 80)
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / ".thumbs").mkdir()
    save_photo(tmp_path / ".thumbs" / "t.jpg", 80, 80)
    (tmp_path / "readme.md").write_text("hi")
    scan = scan_folder(tmp_path, DataConfig())
    assert [r.name for r in scan.records] == ["a.jpg"] and scan.skipped == []


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    rotated_jpeg(path)
    assert Image.open(path).size == (120, 80)  # as stored
    info = probe_image(read_bytes(path), min_side=1, max_pixels=MAX)
    assert (info.width, info.height) == (80, 120)
    img = decode(path)
    assert img.size == (80, 120)
    # Orientation 6 shows the stored top-left corner at the top-right.
    r, g, b = img.getpixel((75, 5))
    assert r > 200 and g < 60 and b < 60
    assert max(img.getpixel((5, 5))) < 80


def test_alpha_and_palette_transparency_become_white(corpus: Path) -> None:
    rgba = decode(corpus / "rgba.png")
    assert rgba.mode == "RGB" and rgba.getpixel((5, 5)) == (255, 255, 255)
    assert rgba.getpixel((80, 5)) != (255, 255, 255)  # the opaque half keeps its colour
    palette = decode(corpus / "palette.png")
    assert Image.open(corpus / "palette.png").mode == "P"
    assert palette.mode == "RGB" and palette.getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_and_grayscale_become_rgb(corpus: Path, tmp_path: Path) -> None:
    assert Image.open(corpus / "cmyk.jpg").mode == "CMYK"
    cmyk = decode(corpus / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.size == (96, 80)
    Image.new("L", (70, 70), 90).save(tmp_path / "l.png")
    assert decode(tmp_path / "l.png").getpixel((1, 1)) == (90, 90, 90)
    Image.new("1", (70, 70), 1).save(tmp_path / "bw.png")
    assert decode(tmp_path / "bw.png").getpixel((1, 1)) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped(corpus: Path) -> None:
    stored = np.asarray(Image.open(corpus / "gray16.png")).astype(np.int64)
    assert Image.open(corpus / "gray16.png").mode.startswith("I")
    assert stored.max() > 255  # the test needs values that clipping would flatten
    img = decode(corpus / "gray16.png")
    got = np.asarray(img)[..., 0].astype(np.int64)
    np.testing.assert_array_equal(got, np.rint(stored / 257))
    # Full scale maps to full scale.
    full = to_rgb(Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)))
    assert [full.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_32_bit_mode_i_with_16_bit_values_is_scaled() -> None:
    img = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.int32))
    assert img.mode == "I"
    assert [to_rgb(img).getpixel((i, 0))[0] for i in range(3)] == [0, 100, 255]


def test_decompression_bombs_are_refused(tmp_path: Path) -> None:
    # PIL's own hard limit: a header claiming 50000 x 50000 pixels, no data needed.
    with pytest.raises(BadImage) as e:
        probe_image(png_header_only(50_000, 50_000), min_side=1, max_pixels=MAX)
    assert e.value.reason == "too many pixels"
    # Our configurable limit, checked on the header before decoding.
    data = read_bytes(save_photo(tmp_path / "big.png", 200, 200))
    with pytest.raises(BadImage) as e:
        probe_image(data, min_side=1, max_pixels=10_000)
    assert e.value.reason == "too many pixels" and "200x200" in e.value.detail
    assert probe_image(data, min_side=1, max_pixels=40_000).width == 200
    scan = scan_folder(tmp_path, DataConfig(max_pixels=10_000))
    assert [(s.name, s.reason) for s in scan.skipped] == [("big.png", "too many pixels")]


def test_min_side_is_configurable(corpus: Path) -> None:
    scan = scan_folder(corpus, DataConfig(min_side=90))
    small = {s.name for s in scan.skipped if s.reason == "too small"}
    # wide.png is 800x100, rgba 88x72, cmyk 96x80, palette 80x80, rotated 80x120.
    assert small == {"tiny.png", "rgba.png", "cmyk.jpg", "palette.png", "rotated.jpg"}


def test_truncated_jpeg_fails_even_in_reduced_decoding() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    data = buf.getvalue()[:-2000]
    with pytest.raises(BadImage) as e:
        probe_image(data, min_side=1, max_pixels=MAX)
    assert e.value.reason == "truncated"
    with pytest.raises(BadImage):
        decode_image(data, max_pixels=MAX, min_size=(50, 50))


def test_to_tensor_is_chw_float_in_minus_one_one() -> None:
    img = Image.fromarray(np.array([[[0, 255, 128]]], np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert t.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
