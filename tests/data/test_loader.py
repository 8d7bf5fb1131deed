"""The loader: sources, buckets, captions, batches, determinism, resume, sharding."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from tune.data.buckets import candidate_buckets, choose_bucket, crop_box
from tune.data.captions import transform_caption
from tune.data.config import DataConfig
from tune.data.loader import Batch, BucketBatchSampler, ItemKey, build_dataloader, build_dataset
from tune.errors import ConfigError, DataError

from data_testkit import BAD_FILES, save_photo, tree_hashes

SMALL = DataConfig(resolution=64, bucket_step=8)


# ------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize(
    ("resolution", "step", "tolerance"),
    [(512, 64, 0.1), (768, 64, 0.1), (1024, 64, 0.1), (1024, 64, 0.05), (64, 8, 0.1)],
)
def test_buckets_keep_aspect_within_tolerance(resolution: int, step: int, tolerance: float) -> None:
    for i in range(-200, 201):
        aspect = 4 ** (i / 200)  # 1:4 .. 4:1
        w, h = choose_bucket(
            round(1000 * aspect), 1000, resolution=resolution, step=step, tolerance=tolerance
        )
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution**2
        assert abs(math.log((w / h) / (round(1000 * aspect) / 1000))) <= math.log1p(tolerance) + 1e-9


def test_buckets_prefer_the_largest_area_and_square_for_square() -> None:
    assert choose_bucket(1000, 1000, resolution=512) == (512, 512)
    assert choose_bucket(3000, 2000, resolution=1024) == (1216, 832)
    assert choose_bucket(8000, 100, resolution=512) == (1024, 256)  # beyond 4:1 clamps to the widest
    assert all(w * h >= 512**2 / 4 for w, h in candidate_buckets(512, 64, 4.0))


def test_crop_box_fills_the_bucket_with_the_right_aspect() -> None:
    box = crop_box(800, 100, (1024, 256))
    assert box == (200.0, 0.0, 600.0, 100.0)
    rng = random.Random(0)
    boxes = {crop_box(800, 100, (1024, 256), mode="random", rng=rng)[0] for _ in range(20)}
    assert len(boxes) > 1 and all(0 <= left <= 400 for left in boxes)


# ------------------------------------------------------------------------------------------ captions


def test_caption_shuffle_keeps_first_tokens_and_all_tags() -> None:
    caption = "sks dog, grass, sunny, ball, tree"
    rng = random.Random(0)
    outs = [transform_caption(caption, rng, shuffle=True, keep_tokens=1) for _ in range(50)]
    assert all(o.startswith("sks dog, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in outs)
    assert len(set(outs)) > 5
    kept2 = [transform_caption(caption, rng, shuffle=True, keep_tokens=2) for _ in range(20)]
    assert all(o.startswith("sks dog, grass, ") for o in kept2)
    assert transform_caption(caption, rng) == caption


def test_caption_dropout_rate() -> None:
    rng = random.Random(0)
    dropped = sum(transform_caption("a, b", rng, dropout=0.3) == "" for _ in range(4000))
    assert 0.27 < dropped / 4000 < 0.33
    assert transform_caption("a, b", rng, dropout=1.0) == ""
    assert all(transform_caption("a, b", rng, dropout=0.0) == "a, b" for _ in range(100))


# ------------------------------------------------------------------------------------------ sources


def test_instance_prompt_wins_over_sidecars(photos: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tune.data.dataset"):
        ds = build_dataset(photos, SMALL, instance_prompt="a photo of sks dog")
    assert {r.caption for r in ds.records} == {"a photo of sks dog"}
    assert "2 caption sidecars ignored" in caplog.text
    ds = build_dataset(photos, SMALL)
    captions = {r.name: r.caption for r in ds.records}
    assert captions["p0.jpg"] == "sks dog, grass, sunny" and captions["p2.jpg"] == "sks dog, sofa"
    assert captions["p1.jpg"] == ""


def test_a_sidecar_that_extends_the_instance_prompt_is_the_caption(
    photos: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (photos / "p0.txt").write_text("A photo of  SKS dog on a sofa\n")  # case and spacing aside
    with caplog.at_level(logging.INFO, logger="tune.data.dataset"):
        ds = build_dataset(photos, SMALL, instance_prompt="a photo of sks dog")
    captions = {r.name: (r.caption, r.has_caption) for r in ds.records}
    assert captions["p0.jpg"] == ("A photo of SKS dog on a sofa", True)
    assert captions["p1.jpg"] == captions["p2.jpg"] == ("a photo of sks dog", False)  # none; "sks dog, sofa"
    assert "1 caption sidecars ignored" in caplog.text


def test_one_summary_line_and_min_images(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tune.data"):
        ds = build_dataset(corpus, SMALL)
    assert len(ds) == 7
    lines = [r for r in caplog.records if r.name.startswith("tune.data")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "7 usable photos" in lines[0].message and "skipped 5 files" in lines[0].message
    with pytest.raises(DataError) as e:
        build_dataset(corpus, DataConfig(resolution=64, bucket_step=8, min_images=8))
    msg = str(e.value)
    assert str(corpus) in msg and "7 usable images, need at least 8" in msg
    assert "2 not an image" in msg and "1 truncated" in msg and "1 empty file" in msg and "\n" not in msg


def test_only_bad_files_is_a_data_error(tmp_path: Path, corpus: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in BAD_FILES:
        (bad / name).write_bytes((corpus / name).read_bytes())
    with pytest.raises(DataError, match="0 usable images"):
        build_dataset(bad, SMALL)
    with pytest.raises(DataError, match="no such folder"):
        build_dataset(tmp_path / "missing", SMALL)


def test_metadata_jsonl_folder_via_datasets(tmp_path: Path) -> None:
    root = tmp_path / "meta"
    rows = [("a.jpg", "a red thing"), ("sub/b.png", "a blue thing"), ("bad.jpg", "broken")]
    save_photo(root / "a.jpg", 64, 64, seed=1)
    save_photo(root / "sub" / "b.png", 96, 64, seed=2)
    (root / "bad.jpg").write_text("not a photo")
    with open(root / "metadata.jsonl", "w") as f:
        for name, text in rows:
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    before = tree_hashes(root)
    ds = build_dataset(root, SMALL)
    assert sorted((r.name, r.caption) for r in ds.records) == [
        ("a.jpg", "a red thing"),
        ("sub/b.png", "a blue thing"),
    ]
    assert [(s.name, s.reason) for s in ds.skipped] == [("bad.jpg", "not an image")]
    assert tree_hashes(root) == before  # datasets' Arrow cache went elsewhere


def test_saved_dataset_with_custom_columns(tmp_path: Path) -> None:
    import datasets

    paths = [save_photo(tmp_path / f"{i}.png", 64, 80, seed=i) for i in range(3)]
    table = datasets.Dataset.from_dict(
        {"picture": [str(p) for p in paths], "prompt": ["one", "two", "three"]}
    ).cast_column("picture", datasets.Image())
    saved = tmp_path / "saved"
    table.save_to_disk(str(saved))
    for p in paths:
        p.unlink()  # the bytes must come from the saved table
    cfg = DataConfig(resolution=64, bucket_step=8, image_column="picture", caption_column="prompt")
    ds = build_dataset(saved, cfg)
    assert sorted(r.caption for r in ds.records) == ["one", "three", "two"]
    batch = next(iter(build_dataloader(ds, batch_size=3)))
    assert batch.pixel_values is not None and batch.pixel_values.shape == (3, 3, 72, 56)
    assert all(r.table is not None and r.path is None for r in ds.records)
    with pytest.raises(DataError, match="no caption column 'text'"):
        build_dataset(saved, DataConfig(resolution=64, bucket_step=8, image_column="picture"))
    with pytest.raises(DataError, match="no image column 'image'"):
        build_dataset(saved, SMALL)
    in_memory = build_dataset(datasets.load_from_disk(str(saved)), cfg)
    assert len(in_memory) == 3


def test_cache_dir_inside_photo_folder_is_refused(photos: Path) -> None:
    with pytest.raises(DataError, match="only ever read"):
        build_dataset(photos, SMALL, cache_dir=photos / ".cache")


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="data.caption_dropout must be in"):
        DataConfig(caption_dropout=1.5)
    with pytest.raises(ConfigError, match="cache_latents needs data.crop = 'center'"):
        DataConfig(cache_latents=True, crop="random")


# ------------------------------------------------------------------------------------------ batches


def all_batches(loader) -> list[Batch]:
    return list(loader)


def test_batches_are_same_bucket_and_cover_every_photo(photos: Path, tokenizer) -> None:
    ds = build_dataset(photos, DataConfig(resolution=64, bucket_step=8, repeats=2), seed=3)
    loader = build_dataloader(ds, batch_size=2, tokenizer=tokenizer)
    batches = all_batches(loader)
    assert len(batches) == len(loader)
    seen: Counter[str] = Counter()
    for b in batches:
        assert b.pixel_values is not None and b.pixel_values.dtype == torch.float32
        h, w = b.target_size
        assert b.pixel_values.shape[1:] == (3, h, w)
        assert -1.0 <= b.pixel_values.min() and b.pixel_values.max() <= 1.0
        assert b.input_ids is not None and b.input_ids.shape == (len(b), tokenizer.model_max_length)
        assert b.original_sizes.shape == (len(b), 2) and not b.is_prior.any()
        seen.update(b.captions)
    assert sum(seen.values()) == 12  # 6 photos x 2 repeats
    assert {(b.target_size, len(b)) for b in batches} >= {((48, 72), 2), ((72, 48), 2), ((64, 64), 2)}


def test_same_seed_same_batches_other_seed_other_order(photos: Path) -> None:
    cfg = DataConfig(resolution=64, bucket_step=8, flip=True, shuffle_captions=True, repeats=3)

    def run(seed: int) -> list[tuple[list[str], torch.Tensor]]:
        ds = build_dataset(photos, cfg, seed=seed)
        return [(b.captions, b.pixel_values) for b in build_dataloader(ds, batch_size=2)]

    a, b, c = run(7), run(7), run(8)
    assert [x[0] for x in a] == [x[0] for x in b]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert [x[0] for x in a] != [x[0] for x in c] or not all(
        torch.equal(x[1], y[1]) for x, y in zip(a, c, strict=True)
    )


def test_workers_do_not_change_the_batches(photos: Path) -> None:
    cfg = DataConfig(resolution=64, bucket_step=8, flip=True)
    ds = build_dataset(photos, cfg, seed=1)
    plain = [b.pixel_values for b in build_dataloader(ds, batch_size=2)]
    ds2 = build_dataset(photos, DataConfig(resolution=64, bucket_step=8, flip=True, num_workers=2), seed=1)
    workers = [b.pixel_values for b in build_dataloader(ds2, batch_size=2)]
    assert all(torch.equal(x, y) for x, y in zip(plain, workers, strict=True))


def test_resume_from_state_dict_continues_exactly(photos: Path) -> None:
    cfg = DataConfig(resolution=64, bucket_step=8, flip=True, caption_dropout=0.3, repeats=2)
    ds = build_dataset(photos, cfg, seed=5)
    reference = build_dataloader(ds, batch_size=2)
    epochs = [[(b.captions, b.pixel_values) for b in reference] for _ in range(2)]
    flat = epochs[0] + epochs[1]
    assert [x[0] for x in epochs[0]] != [x[0] for x in epochs[1]]  # a new order each epoch

    first = build_dataloader(ds, batch_size=2)
    got = []
    for i, b in enumerate(first):
        got.append((b.captions, b.pixel_values))
        if i == 2:
            break
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 3, "seed": 5}
    resumed = build_dataloader(build_dataset(photos, cfg, seed=5), batch_size=2)
    resumed.load_state_dict(state)
    for _ in range(2):
        got.extend((b.captions, b.pixel_values) for b in resumed)
    assert [x[0] for x in got] == [x[0] for x in flat]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(got, flat, strict=True))
    with pytest.raises(DataError, match="same seed"):
        resumed.load_state_dict({"epoch": 0, "position": 0, "seed": 6})


def test_processes_share_the_batches_one_process_with_their_whole_batch_draws() -> None:
    buckets = [(64, 64)] * 7 + [(72, 48)] * 3
    prior = [False] * 10
    whole = BucketBatchSampler(buckets, prior, batch_size=6, seed=0).epoch_batches(0)
    shards = [
        BucketBatchSampler(buckets, prior, batch_size=2, seed=0, num_processes=3, process_index=p)
        for p in range(3)
    ]
    parts = [s.epoch_batches(0) for s in shards]
    assert [len(p) for p in parts] == [len(whole)] * 3 == [len(s) for s in shards]  # the same steps
    for step, batch in enumerate(whole):
        shares = [p[step] for p in parts]
        assert all(len({k.bucket for k in share}) == 1 for share in shares)
        if len(batch) == 6:  # a full batch: process i takes the i-th pair
            assert [k for share in shares for k in share] == batch
        else:  # a bucket's short last batch (3 photos, or 1): split as evenly as it goes, a photo repeated
            assert {k for share in shares for k in share} == set(batch)
            assert all(len(share) == 1 for share in shares)
    # With class images: 2 processes x batch 1 draw 1 process x batch 2's photos and class images.
    flags = [False] * 10 + [True] * 4
    both = BucketBatchSampler([(64, 64)] * 14, flags, batch_size=2, seed=3).epoch_batches(1)
    ones = [
        BucketBatchSampler([(64, 64)] * 14, flags, batch_size=1, seed=3, num_processes=2, process_index=p)
        for p in range(2)
    ]
    for step, (a, b) in enumerate(zip(*(s.epoch_batches(1) for s in ones), strict=True)):
        assert both[step] == [a[0], b[0], a[1], b[1]]  # photos, then their class images


def test_sharding_reads_the_accelerator() -> None:
    class FakeAccelerator:
        num_processes = 2
        process_index = 1

    buckets = [(64, 64)] * 8

    class DS:
        records = [type("R", (), {"bucket": b, "is_prior": False})() for b in buckets]
        seed = 0
        cfg = DataConfig()

    loader = build_dataloader(DS(), batch_size=2, accelerator=FakeAccelerator())  # type: ignore[arg-type]
    assert (loader.sampler.num_processes, loader.sampler.process_index) == (2, 1)
    assert len(loader) == 2


def test_a_resume_with_another_process_count_counts_the_same_photos() -> None:
    class DS:
        records = [type("R", (), {"bucket": (64, 64), "is_prior": False})() for _ in range(12)]
        seed = 0
        cfg = DataConfig()

    two = build_dataloader(DS(), batch_size=1, num_processes=2, process_index=0)  # type: ignore[arg-type]
    two.position = 3  # 3 steps of 2 processes x 1 photo
    state = two.state_dict()
    assert state == {"epoch": 0, "position": 3, "seed": 0, "num_processes": 2, "batch_size": 1}
    one = build_dataloader(DS(), batch_size=2)  # type: ignore[arg-type]
    one.load_state_dict(state)  # the same global batch: the same step, and the same batches from there
    assert one.position == 3
    rest = one.sampler.epoch_batches(0)[3:]
    shards = [
        BucketBatchSampler([(64, 64)] * 12, [False] * 12, batch_size=1, num_processes=2, process_index=p)
        for p in range(2)
    ]
    assert rest == [a + b for a, b in zip(*(s.epoch_batches(0)[3:] for s in shards), strict=True)]
    single = build_dataloader(DS(), batch_size=1)  # type: ignore[arg-type]
    single.load_state_dict(state)  # 6 photos seen: 6 steps of 1
    assert single.position == 6
    single.load_state_dict(
        {"epoch": 1, "position": 2, "seed": 0, "num_processes": 2}
    )  # saved before batch_size
    assert (single.epoch, single.position) == (1, 4)  # was read as this run's batch size


def test_flip_mirrors_the_pixels(photos: Path) -> None:
    ds = build_dataset(photos, DataConfig(resolution=64, bucket_step=8, flip=True), seed=0)
    plain = build_dataset(photos, SMALL, seed=0)
    flipped = 0
    for epoch in range(4):
        key = ItemKey(0, epoch, 0, ds.records[0].bucket)
        a = ds[key]["pixel_values"]
        b = plain[key]["pixel_values"]
        if torch.equal(a, b):
            continue
        assert torch.equal(a, b.flip(-1))
        flipped += 1
    assert 0 < flipped < 4


def test_caption_dropout_and_shuffle_through_the_loader(photos: Path) -> None:
    dropped = build_dataset(photos, DataConfig(resolution=64, bucket_step=8, caption_dropout=1.0))
    assert {c for b in build_dataloader(dropped, batch_size=3) for c in b.captions} == {""}
    shuffled = build_dataset(
        photos, DataConfig(resolution=64, bucket_step=8, shuffle_captions=True, keep_tokens=1, repeats=20)
    )
    p0 = [c for b in build_dataloader(shuffled, batch_size=6) for c in b.captions if "grass" in c]
    assert len(p0) == 20 and all(c.startswith("sks dog, ") for c in p0) and len(set(p0)) > 1


def test_square_mode_and_random_crop(photos: Path) -> None:
    ds = build_dataset(photos, DataConfig(resolution=64, bucketing=False, crop="random"), seed=0)
    batches = list(build_dataloader(ds, batch_size=3))
    assert all(b.target_size == (64, 64) for b in batches)
    lefts = {ds[ItemKey(0, e, 0, (64, 64))]["crop_top_left"] for e in range(8)}
    assert len(lefts) > 1  # the 96x64 photo is cropped at different places


def test_batch_to_casts_only_floats() -> None:
    b = Batch(
        captions=["a"],
        is_prior=torch.tensor([True]),
        original_sizes=torch.tensor([[10, 20]]),
        crop_top_lefts=torch.tensor([[0, 0]]),
        target_size=(8, 8),
        latents=torch.zeros(1, 4, 1, 1),
        input_ids=torch.tensor([[1, 2]]),
    )
    moved = b.to("cpu", dtype=torch.float16)
    assert moved.latents is not None and moved.latents.dtype == torch.float16
    assert moved.input_ids is not None and moved.input_ids.dtype == torch.long
    assert moved.is_prior.dtype == torch.bool and moved.pixel_values is None
    assert b.latents is not None and b.latents.dtype == torch.float32  # a copy, the original is unchanged


def test_iterating_the_loader_leaves_the_global_rng_alone(photos):
    from tune.data.config import DataConfig
    from tune.data.loader import build_dataloader, build_dataset

    dataset = build_dataset(photos, DataConfig(resolution=64, bucketing=False), instance_prompt="a photo")
    loader = build_dataloader(dataset, batch_size=2, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for _ in loader:
        break
    assert torch.equal(torch.rand(3), expected)
