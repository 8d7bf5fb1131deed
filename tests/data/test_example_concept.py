"""The example concept: the toy renderer, the shipped concepts/sks-toy folder, and the toy detector."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from tune import PROJECT_ROOT
from tune.data.concepts import load_concept
from tune.data.config import DataConfig
from tune.data.example_concept import (
    CONCEPT_PHOTOS,
    PHOTO_JPEG_QUALITY,
    TOY,
    ToyDesign,
    concept_photo_names,
    render_concept_photo,
    render_photo,
    write_concept_photos,
)
from tune.data.example_concept_detect import concept_measurements, detect_concept, score_samples
from tune.data.loader import build_dataset
from tune.data.shapes import COLORS, PALETTE, Color, stream_shapes
from tune.errors import DataError

CONCEPT_DIR = PROJECT_ROOT / "concepts" / "sks-toy"
PER_COLOR = 12


def as_sample(
    image: Image.Image, rng: np.random.Generator, blur: float = 1.0, noise: float = 6.0
) -> Image.Image:
    """What a model sample might look like: the picture blurred, with Gaussian pixel noise."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    pixels = pixels + rng.normal(0.0, noise, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def toy_samples(
    design: ToyDesign = TOY, per_color: int = PER_COLOR, seed: int = 0
) -> tuple[list[Image.Image], list[Color]]:
    """64x64 sample-like pictures of `design` on each palette colour in turn."""
    images, bgs = [], []
    for i in range(per_color * len(COLORS)):
        rng = np.random.default_rng([seed, i])
        bg = COLORS[i % len(COLORS)]
        images.append(as_sample(render_photo(rng, 64, 64, bg, design=design), rng))
        bgs.append(bg)
    return images, bgs


@pytest.fixture(scope="module")
def toys() -> tuple[list[Image.Image], list[Color]]:
    return toy_samples()


# ---------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------


def test_render_photo_is_deterministic_in_its_generator() -> None:
    def pixels(seed: int, bg: str | None = None) -> np.ndarray:
        return np.asarray(render_photo(np.random.default_rng(seed), 120, 90, bg))

    a = pixels(3)
    assert a.shape == (90, 120, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pixels(3))
    assert not np.array_equal(a, pixels(4))
    assert np.array_equal(pixels(3, "blue"), pixels(3, "blue"))


def test_render_photo_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="palette colour"):
        render_photo(rng, 64, 64, "pinkish")
    with pytest.raises(ValueError, match=">= 32"):
        render_photo(rng, 16, 64)
    with pytest.raises(ValueError, match="scale"):
        render_photo(rng, 64, 64, scale=1.5)


def test_render_photo_on_a_palette_colour_keeps_that_backdrop() -> None:
    for bg in COLORS:
        image = np.asarray(render_photo(np.random.default_rng(1), 64, 64, bg), dtype=np.float32)
        corner = image[:6, :6].reshape(-1, 3).mean(axis=0)
        assert np.abs(corner - PALETTE[bg]).max() < 40, (bg, corner)


def test_write_concept_photos_is_deterministic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    first = write_concept_photos(tmp_path / "a", count=1, seed=5)
    second = write_concept_photos(tmp_path / "b", count=1, seed=5)
    assert [p.name for p in first] == concept_photo_names(1) == ["sks_toy_00.jpg"]
    assert first[0].read_bytes() == second[0].read_bytes()
    with Image.open(first[0]) as image:
        assert image.format == "JPEG" and image.size == CONCEPT_PHOTOS[0][:2]
    assert concept_photo_names(10)[-1] == "sks_toy_09.jpg"

    before = first[0].read_bytes()
    with pytest.raises(DataError, match="already exist"):
        write_concept_photos(tmp_path / "a", count=1, seed=6)
    assert first[0].read_bytes() == before
    write_concept_photos(tmp_path / "a", count=1, seed=6, overwrite=True)
    assert first[0].read_bytes() != before


def test_make_example_concept_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_example_concept", PROJECT_ROOT / "scripts" / "make_example_concept.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "photos"
    args = ["--out", str(out), "--count", "1", "--seed", "0"]
    assert script.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == concept_photo_names(1)
    assert script.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert script.main([*args, "--force", "--sheet", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").is_file()


# ---------------------------------------------------------------------------------------------
# The shipped concept
# ---------------------------------------------------------------------------------------------


def test_shipped_concept_loads() -> None:
    concept = load_concept(CONCEPT_DIR)
    assert (concept.name, concept.token, concept.class_word) == ("sks-toy", "sks", "toy")
    assert concept.instance_caption == "a photo of sks toy"
    assert concept.class_caption == "a photo of toy"
    assert concept.instance_dir == (CONCEPT_DIR / "photos").resolve()
    captions = concept.validation_captions
    assert "a photo of sks toy" in captions
    for color in COLORS:
        assert f"a photo of sks toy on a {color} background" in captions
    assert concept.prior_preservation.enabled


def test_shipped_photos_are_varied_small_and_load_as_a_dataset() -> None:
    concept = load_concept(CONCEPT_DIR)
    paths = sorted(concept.instance_dir.glob("*.jpg"))
    assert [p.name for p in paths] == concept_photo_names(len(CONCEPT_PHOTOS))
    assert 8 <= len(paths) <= 10
    assert sum(p.stat().st_size for p in paths) < 300 * 1024
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)
    assert min(min(s) for s in sizes) <= 128 and max(max(s) for s in sizes) >= 512
    dataset = build_dataset(concept, DataConfig(resolution=64, bucket_step=8), seed=0)
    assert len(dataset.instance_indices) == len(paths)


def test_shipped_photos_are_what_the_renderer_makes_and_show_the_toy() -> None:
    # The README's regeneration command must reproduce them: byte for byte with this Pillow's
    # libjpeg; within rounding with another JPEG codec.
    for index, path in enumerate(sorted((CONCEPT_DIR / "photos").glob("*.jpg"))):
        with Image.open(path) as image:
            shipped = image.convert("RGB")
        buffer = io.BytesIO()
        render_concept_photo(index, seed=0).save(buffer, "JPEG", quality=PHOTO_JPEG_QUALITY)
        with Image.open(buffer) as image:
            rendered = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert np.abs(np.asarray(shipped, dtype=np.float32) - rendered).mean() < 1.0, path.name
        # Seen as the model sees it: centre square crop at 64x64.
        assert detect_concept(ImageOps.fit(shipped, (64, 64), Image.Resampling.BOX))[0], path.name


# ---------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------


def test_detector_finds_the_toy_in_blurred_noisy_64px_pictures(
    toys: tuple[list[Image.Image], list[Color]],
) -> None:
    images, _ = toys
    found = [detect_concept(image)[0] for image in images]
    assert np.mean(found) >= 0.95
    for color in COLORS:  # on every backdrop, not just on average
        assert np.mean([f for f, bg in zip(found, toys[1], strict=True) if bg == color]) >= 0.85, color


def test_detector_reads_the_background_under_the_toy(toys: tuple[list[Image.Image], list[Color]]) -> None:
    images, bgs = toys
    scores = score_samples(images, bgs)
    assert scores["count"] == len(images)
    assert scores["present"] >= 0.95 and scores["bg_correct"] >= 0.98 and scores["both"] >= 0.95
    assert 0.5 <= scores["mean_score"] <= 1.0
    # Asking for another backdrop than the one drawn is wrong every time.
    some = slice(0, 4 * len(COLORS))
    shifted = [COLORS[(COLORS.index(bg) + 1) % len(COLORS)] for bg in bgs[some]]
    wrong = score_samples(images[some], shifted)
    assert wrong["bg_correct"] == 0.0 and wrong["both"] == 0.0 and wrong["present"] >= 0.95
    # No background asked for: any background is right.
    assert score_samples(images[:8], [None] * 8)["bg_correct"] == 1.0


def test_detector_ignores_the_shapes_dataset() -> None:
    samples = list(stream_shapes("all", count=500, seed=0, noise_std=3.0))
    assert {s.spec.color for s in samples} == set(COLORS) and len({s.spec.shape for s in samples}) == 4
    found = [detect_concept(s.image)[0] for s in samples]
    assert np.mean(found) <= 0.01


def test_detector_ignores_noise() -> None:
    rng = np.random.default_rng(0)
    uniform = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(10)]
    smooth = [
        np.asarray(
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).resize(
                (64, 64), Image.Resampling.BICUBIC
            )
        )
        for _ in range(10)
    ]
    assert not any(detect_concept(a)[0] for a in uniform + smooth)
    assert detect_concept(np.full((64, 64, 3), 128, np.uint8)) == (False, 0.0)


@pytest.mark.parametrize(
    "design",
    [
        pytest.param(dataclasses.replace(TOY, inner_ratio=0.0), id="pink-disc-no-hole"),
        pytest.param(dataclasses.replace(TOY, bands=0), id="plain-pink-ring"),
        pytest.param(
            dataclasses.replace(TOY, body_rgb=PALETTE["red"], band_rgb=PALETTE["blue"]), id="palette-ring"
        ),
        pytest.param(dataclasses.replace(TOY, band_rgb=PALETTE["green"]), id="pink-ring-green-stripes"),
    ],
)
def test_detector_rejects_look_alikes(design: ToyDesign) -> None:
    images, _ = toy_samples(design, per_color=3, seed=1)
    assert sum(detect_concept(image)[0] for image in images) <= 1


def test_detector_inputs() -> None:
    image = render_photo(np.random.default_rng(2), 128, 96, "white")
    found, score = detect_concept(image)
    assert found and 0.5 <= score <= 1.0
    as_float = np.asarray(image, dtype=np.float32) / 255.0
    assert detect_concept(as_float) == detect_concept(np.asarray(image))
    measured = concept_measurements(image)
    assert set(measured) == {"area", "hole", "pink", "teal", "offset", "clutter", "score"}
    with pytest.raises(ValueError, match="at least 32px"):
        detect_concept(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        score_samples([], [])
