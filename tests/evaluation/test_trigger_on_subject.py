"""trigger_on_subject: the subject mask on a synthetic image, the exact share of a word's attention mass
on it, and the figure in a tiny run's report (the same images as drawn without recording)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tune import sampling
from tune.attention import AttentionMaps, prompt_tokens, share_on_subject, subject_mask
from tune.models import load_pipeline
from tune.world.render import object_mask, render
from tune.world.spec import Spec

BACKGROUND, SUBJECT = (20, 180, 40), (240, 30, 200)


def picture() -> Image.Image:
    """32 x 32 on a green background; the subject fills rows 8-15 of columns 0-15 and one pixel more."""
    pixels = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    pixels[8:16, 0:16] = SUBJECT
    pixels[24, 24] = SUBJECT
    pixels[28, 4] = (30, 190, 50)  # a little noise on the background stays background
    return Image.fromarray(pixels)


def test_subject_mask_is_each_cells_share_of_pixels_unlike_the_border() -> None:
    mask = subject_mask(picture(), (4, 4))
    expected = torch.zeros(4, 4)
    expected[1, 0] = expected[1, 1] = 1.0  # 8 x 8 cells: two of them all subject
    expected[3, 3] = 1 / 64  # one pixel of 64
    assert torch.equal(mask, expected)
    assert subject_mask(picture(), (32, 32)).sum() == 8 * 16 + 1


def test_a_subject_close_to_its_background_in_colour_is_found_by_the_images_own_split() -> None:
    pixels = np.full((32, 32, 3), (200, 30, 30), dtype=np.uint8)  # red
    pixels[8:24, 8:24] = (140, 70, 40)  # a brown block: 73 of 255 from the red, under the fixed 80
    block = Image.fromarray(pixels)
    assert float(subject_mask(block, (32, 32), far=80.0).sum()) == 0.0  # the rule before: nothing
    assert float(subject_mask(block, (32, 32)).sum()) == 16 * 16
    assert float(subject_mask(block, (4, 4))[1:3, 1:3].min()) == 1.0


def test_a_picture_without_a_subject_is_not_split_in_its_noise() -> None:
    noise = np.random.default_rng(0).integers(-15, 16, size=(32, 32, 3))
    pixels = np.clip(np.array((20, 180, 40)) + noise, 0, 255).astype(np.uint8)
    assert float(subject_mask(Image.fromarray(pixels), (32, 32)).sum()) == 0.0


def test_the_mask_matches_the_renderers_object_on_a_low_contrast_world_photo() -> None:
    spec = Spec(cls="ring", color="orange", background="red")  # the fixed 80 finds 0.59-0.69 of it
    for seed in range(3):
        image = render(spec, np.random.default_rng(seed), 64, 64)
        truth = torch.from_numpy(object_mask(spec, np.random.default_rng(seed), 64, 64)).bool()

        def overlap(mask: torch.Tensor, truth: torch.Tensor = truth) -> float:
            found = mask > 0.5
            return float((found & truth).sum() / (found | truth).sum())

        adaptive, fixed = (
            overlap(subject_mask(image, (64, 64))),
            overlap(subject_mask(image, (64, 64), far=80.0)),
        )
        assert adaptive > 0.85 and adaptive > fixed + 0.15


def test_share_on_subject_is_the_words_final_mass_on_the_mask(tiny_pipeline_dir: str) -> None:
    tokenizer = load_pipeline(tiny_pipeline_dir).tokenizer
    tokens = prompt_tokens("a photo of sks toy", tokenizer)
    sks = tokens.index("sks</w>")
    maps = torch.full((2, 77, 4, 4), 1 / 77)  # step 0: uniform; only the last step counts
    last = torch.zeros(77, 4, 4)
    last[sks] = 1.0  # 16 cells of mass 1 ...
    last[sks, 1, 0] = 7.0  # ... of which the two subject cells carry 7 + 3
    last[sks, 1, 1] = 3.0
    maps[1] = last
    share = share_on_subject(AttentionMaps(maps, tokens), "sks", picture(), tokenizer)
    assert share == pytest.approx((10 + 1 / 64) / (10 + 14))  # the one-pixel cell: 1/64 of its mass


def test_recording_for_the_figure_leaves_the_suite_images_unchanged(tiny_pipeline_dir: str, tmp_path) -> None:
    pipe = load_pipeline(tiny_pipeline_dir)
    args = (pipe, ["a photo of sks toy", "a photo of toy"], [0, 1])
    plain = sampling.sample_grid(*args, tmp_path / "plain", steps=2, progress=False)
    recorded = sampling.sample_grid(*args, tmp_path / "recorded", steps=2, progress=False, attention=True)
    for a, b in zip(plain, recorded, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and b.attention is not None
    for name in ("grid.png", "prompts.json", "p01_s1.png"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "recorded" / name).read_bytes()
