"""Subject masks (`-masklabel.png` beside a photo): found, checked, cropped with their photo, weighed in the loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune.data.batches import collate
from tune.data.check import check_data, format_report
from tune.data.config import DataConfig
from tune.data.loader import ItemKey, build_dataset
from tune.diffusion import denoising_loss
from tune.errors import DataError
from tune.world.subjects import SUBJECTS, render_photo, write_photos

from data_testkit import save_photo, tree_hashes

MASKED = DataConfig(resolution=64, bucketing=False, mask_background_weight=0.25)


def left_half_mask(path: Path, width: int, height: int) -> Path:
    """A mask, white on the left half of a width x height photo."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    Image.fromarray(mask).save(path)
    return path


def test_a_mask_is_found_beside_its_photo_and_is_never_a_photo(tmp_path: Path) -> None:
    save_photo(tmp_path / "a.jpg", 64, 64)
    save_photo(tmp_path / "b.png", 64, 64, seed=1)
    left_half_mask(tmp_path / "a-masklabel.png", 64, 64)
    ds = build_dataset(tmp_path, MASKED, instance_prompt="a photo of sks dog")
    assert sorted(r.name for r in ds.records) == ["a.jpg", "b.png"]
    masks = {r.name: r.mask for r in ds.records}
    assert masks == {"a.jpg": str(tmp_path / "a-masklabel.png"), "b.png": None}
    report = format_report(check_data(tmp_path, MASKED))
    assert "2 usable images" in report and "subject masks (-masklabel.png): 1 of 2" in report


def test_a_mask_of_another_size_is_a_one_line_error_and_nothing_is_written(tmp_path: Path) -> None:
    save_photo(tmp_path / "a.jpg", 96, 64)
    left_half_mask(tmp_path / "a-masklabel.png", 64, 64)
    before = tree_hashes(tmp_path)
    with pytest.raises(DataError, match=r"a-masklabel.png is 64x64 but its photo is 96x64") as info:
        build_dataset(tmp_path, MASKED, instance_prompt="a photo of sks dog")
    assert "\n" not in str(info.value)
    (tmp_path / "a-masklabel.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a readable mask image"):
        build_dataset(tmp_path, MASKED, instance_prompt="a photo of sks dog")
    assert set(tree_hashes(tmp_path)) == set(before)


def test_the_mask_is_cropped_and_flipped_with_its_photo(tmp_path: Path) -> None:
    # A 128x64 photo, centre-cropped to its middle 64x64 square and halved to 32 px: its mask's white left
    # half (x < 64) covers the square's left half, and the flip mirrors it.
    save_photo(tmp_path / "a.jpg", 128, 64)
    left_half_mask(tmp_path / "a-masklabel.png", 128, 64)
    cfg = DataConfig(resolution=32, bucketing=False, mask_background_weight=0.25, flip=True)
    ds = build_dataset(tmp_path, cfg, instance_prompt="a photo of sks dog", seed=0)
    unflipped = build_dataset(tmp_path, DataConfig(resolution=32, bucketing=False), instance_prompt="sks")
    seen = set()
    for epoch in range(6):
        item = ds[ItemKey(0, epoch, 0, (32, 32))]
        weights = item["loss_weight"]
        assert weights.shape == (1, 32, 32)
        left, right = weights[0, :, :14], weights[0, :, 18:]
        plain = unflipped[ItemKey(0, epoch, 0, (32, 32))]["pixel_values"]
        flipped = not torch.equal(item["pixel_values"], plain)
        subject, rest = (right, left) if flipped else (left, right)
        assert torch.allclose(subject, torch.ones_like(subject), atol=0.01)
        assert torch.allclose(rest, torch.full_like(rest, 0.25), atol=0.01)
        seen.add(flipped)
    assert seen == {True, False}


def test_weight_one_ignores_the_masks_and_class_images_weigh_every_pixel(tmp_path: Path) -> None:
    save_photo(tmp_path / "a.jpg", 64, 64)
    left_half_mask(tmp_path / "a-masklabel.png", 64, 64)
    save_photo(tmp_path / "b.jpg", 64, 64, seed=1)
    plain = build_dataset(tmp_path, DataConfig(resolution=64, bucketing=False), instance_prompt="sks")
    assert all("loss_weight" not in plain[i] for i in range(2))
    ds = build_dataset(tmp_path, MASKED, instance_prompt="sks")
    batch = collate([ds[0], ds[1]])
    assert batch.loss_weight is not None and batch.loss_weight.shape == (2, 1, 64, 64)
    assert torch.equal(batch.loss_weight[1], torch.ones(1, 64, 64))  # b.jpg has no mask
    assert collate([ds[1]]).loss_weight is None


def test_batches_carry_the_masks_themselves_when_the_loader_keeps_them(tmp_path: Path) -> None:
    save_photo(tmp_path / "a.jpg", 64, 64)
    left_half_mask(tmp_path / "a-masklabel.png", 64, 64)
    save_photo(tmp_path / "b.jpg", 64, 64, seed=1)
    keep = DataConfig(resolution=32, bucketing=False, keep_masks=True)  # for the trigger-attention loss
    kept = build_dataset(tmp_path, keep, instance_prompt="a photo of sks dog")
    batch = collate([kept[0], kept[1]])
    assert batch.loss_weight is None  # weight 1: the denoising loss ignores the masks
    assert batch.subject_mask is not None and batch.subject_mask.shape == (2, 1, 32, 32)
    assert batch.has_mask.tolist() == [True, False]
    subject, rest = batch.subject_mask[0, 0, :, :14], batch.subject_mask[0, 0, :, 18:]
    assert float(subject.min()) > 0.99 and float(rest.max()) < 0.01
    assert float(batch.subject_mask[1].abs().sum()) == 0.0
    plain = build_dataset(
        tmp_path, DataConfig(resolution=32, bucketing=False), instance_prompt="a photo of sks dog"
    )
    assert collate([plain[0], plain[1]]).subject_mask is None


def test_the_loss_weighs_the_subject_and_keeps_its_scale() -> None:
    target = torch.zeros(2, 4, 8, 8)
    pred = torch.zeros(2, 4, 8, 8)
    pred[:, :, :, 4:] = 1.0  # wrong only on the right half of each latent
    ones = torch.ones(2)
    plain = denoising_loss(pred, target, ones)
    weights = torch.ones(2, 1, 32, 32)
    assert torch.allclose(denoising_loss(pred, target, ones, pixel_weights=weights), plain)
    weights[:, :, :, 16:] = 0.0  # the subject is the left half: its error is 0
    assert float(denoising_loss(pred, target, ones, pixel_weights=weights)) == 0.0
    weights[:, :, :, 16:] = 0.1
    assert float(denoising_loss(pred, target, ones, pixel_weights=weights)) == pytest.approx(0.1 / 1.1)


def test_the_world_subjects_photos_come_with_their_masks(tmp_path: Path) -> None:
    subject = SUBJECTS["w-person"]
    paths = write_photos(subject, tmp_path, count=2)
    for index, path in enumerate(paths):
        mask = np.asarray(Image.open(path.with_name(path.stem + "-masklabel.png")))
        photo = np.asarray(render_photo(subject, index), dtype=np.float64)
        assert mask.shape == photo.shape[:2] and 0.02 < (mask > 127).mean() < 0.5
        # The subject's shirt colour (yellow) is in the mask, the surface around it is not.
        yellow = (photo[..., 0] > 150) & (photo[..., 1] > 130) & (photo[..., 2] < 90)
        assert yellow.sum() > 20 and (mask[yellow] > 127).mean() > 0.9
    with pytest.raises(DataError, match="already exist"):
        write_photos(subject, tmp_path, count=2)
