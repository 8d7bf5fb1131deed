"""VAE round-trip measures (tune.world.reconstruction) and caption/spec matching (tune.world.retrieval)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tune.world.captions import caption
from tune.world.judge import HEADS
from tune.world.reconstruction import MAX_PSNR_DB, pixels_of, psnr_db, to_images
from tune.world.retrieval import describes, fits, text_labels
from tune.world.scoring import fresh_renders


def test_pixels_and_images_round_trip_exactly() -> None:
    images, _ = fresh_renders(3, seed=5, resolution=32)
    pixels = pixels_of(images)
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    back = to_images(pixels)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, back, strict=True))


def test_psnr_is_capped_for_exact_copies_and_falls_with_error() -> None:
    image = Image.new("RGB", (8, 8), (10, 200, 30))
    off = to_images(pixels_of([image]) + 0.1)[0]
    assert psnr_db([image], [image]) == [MAX_PSNR_DB]
    (value,) = psnr_db([image], [off])
    assert 10 < value < MAX_PSNR_DB


def test_captions_describe_their_specs_and_toy_fits_any_toy() -> None:
    _, specs = fresh_renders(8, seed=1)
    assert all(describes(caption(spec), spec) for spec in specs)
    assert fits({"cls": "toy"}, {"cls": "ball"}) and not fits({"cls": "toy"}, {"cls": "person"})
    assert not fits({"color": "red"}, {"cls": "ball", "color": "blue"})
    labels = text_labels("a photo of a red ball")
    assert len(labels) == len(HEADS) and labels[0] == HEADS["cls"].index("ball")


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_to_images_clamps(shift: float) -> None:
    pixels = torch.full((1, 3, 4, 4), 2.0 + shift)
    assert np.asarray(to_images(pixels)[0]).min() == 255
