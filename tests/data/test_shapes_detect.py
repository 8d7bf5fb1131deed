"""The shapes attribute detector: accuracy on generator images, robustness, API contract."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tune.data.shapes import PALETTE, SHAPES, ShapeSpec, build_sample, render
from tune.data.shapes_detect import ATTRIBUTES, detect, nearest_color, score, shape_features


def samples(count: int, seed: int, **options):
    return [build_sample(i, split="all", seed=seed, **options) for i in range(count)]


@pytest.mark.parametrize("noise_std", [0.0, 8.0], ids=["clean", "noise"])
def test_accuracy_on_generator_images(noise_std):
    batch = samples(500, seed=2024, noise_std=noise_std)
    result = score([s.image for s in batch], [s.spec for s in batch])
    assert result.count == 500
    failing = {k: v for k, v in result.accuracy.items() if v < 0.98}
    assert not failing, result
    assert result.all_correct >= 0.98
    assert result.found == 1.0


@pytest.mark.parametrize("resolution", [32, 128])
def test_accuracy_at_other_resolutions(resolution):
    batch = samples(100, seed=7, resolution=resolution)
    result = score([s.image for s in batch], [s.spec for s in batch])
    assert min(result.accuracy.values()) >= 0.98, result


def test_robust_to_blur_noise_and_colour_cast():
    # What a decoded model sample looks like: soft edges, grain and a slight colour cast.
    rng = np.random.default_rng(0)
    images, specs = [], []
    for sample in samples(200, seed=11, noise_std=8.0):
        blurred = np.asarray(sample.image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        cast = np.clip(blurred + rng.uniform(-15, 15, size=3), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(cast))
        specs.append(sample.spec)
    result = score(images, specs)
    assert min(result.accuracy.values()) >= 0.95, result


def test_finds_each_shape_with_high_confidence():
    for shape in SHAPES:
        for size, position in (("large", "center"), ("small", "bottom left")):
            spec = ShapeSpec(shape, "purple", "yellow", size, position)
            detection = detect(render(spec, 64))
            assert detection.matches(spec) == dict.fromkeys(ATTRIBUTES, True), (spec, detection)
            assert set(detection.confidence) == set(ATTRIBUTES)
            assert all(0.5 < c <= 1.0 for c in detection.confidence.values()), detection


def test_shape_features_pick_out_each_shapes_harmonic():
    harmonic = {"triangle": "h3", "square": "h4", "star": "h5"}
    for shape in SHAPES:
        spec = ShapeSpec(shape, "white", "black", "large")
        red = np.asarray(render(spec, 64), dtype=np.float64)[..., 0]
        coverage = (red - PALETTE["black"][0]) / (PALETTE["white"][0] - PALETTE["black"][0])
        features = shape_features(coverage)
        for name, value in features.items():
            assert (value > 0.1) == (harmonic.get(shape) == name), (shape, features)


def test_blank_image_is_unknown():
    for image in (Image.new("RGB", (64, 64), PALETTE["green"]), render_noise_only()):
        detection = detect(image)
        assert not detection.found
        assert detection.bg == "green"
        assert (detection.color, detection.shape, detection.size, detection.position) == ("unknown",) * 4
        assert detection.confidence["shape"] == 0.0


def render_noise_only() -> Image.Image:
    rng = np.random.default_rng(1)
    pixels = np.array(PALETTE["green"], dtype=np.float64) + rng.normal(0, 8, size=(64, 64, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def test_accepts_arrays_and_large_images():
    spec = ShapeSpec("triangle", "orange", "red", "small", "top right")
    image = render(spec, 64, np.random.default_rng(3))
    expected = detect(image)
    as_uint8 = detect(np.asarray(image))
    as_float = detect(np.asarray(image, dtype=np.float32) / 255.0)
    with_alpha = detect(np.asarray(image.convert("RGBA")))
    assert expected.matches(spec) == dict.fromkeys(ATTRIBUTES, True)
    for other in (as_uint8, as_float, with_alpha):
        assert (other.bg, other.color, other.shape, other.size, other.position) == (
            expected.bg,
            expected.color,
            expected.shape,
            expected.size,
            expected.position,
        )
    assert detect(render(spec, 512)).matches(spec) == dict.fromkeys(ATTRIBUTES, True)
    with pytest.raises(ValueError, match="at least 32px"):
        detect(render(spec, 16))


@pytest.mark.parametrize(
    ("rgb", "expected"),
    [
        ((225, 228, 215), "white"),  # greyish white is not yellow
        ((235, 215, 110), "yellow"),  # washed-out yellow is not white
        ((235, 150, 50), "orange"),
        ((225, 70, 45), "red"),
        ((250, 190, 45), "yellow"),
        ((60, 60, 60), "black"),
        ((120, 70, 170), "purple"),
        ((60, 100, 200), "blue"),
        ((70, 160, 80), "green"),
    ],
)
def test_nearest_color_under_drift(rgb, expected):
    color, confidence = nearest_color(rgb)
    assert color == expected
    assert 0.0 < confidence <= 1.0
    assert nearest_color(PALETTE[expected])[1] == pytest.approx(1.0)


def test_score_counts_mistakes():
    batch = samples(4, seed=5)
    specs = [s.spec for s in batch]
    wrong = specs[0]
    other_color = next(c for c in PALETTE if c not in (wrong.color, wrong.bg))
    specs[0] = ShapeSpec(wrong.shape, other_color, wrong.bg, wrong.size, wrong.position)
    result = score([s.image for s in batch], specs)
    assert result.accuracy["color"] == 0.75
    assert result.accuracy["shape"] == 1.0
    assert result.all_correct == 0.75
    assert result.to_dict()["count"] == 4
    with pytest.raises(ValueError):
        score([s.image for s in batch], specs[:3])
