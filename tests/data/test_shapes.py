"""The built-in shapes dataset: specs, splits, captions, rendering, files and CLI."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tune.data import shapes
from tune.data.shapes import (
    COLORS,
    HELDOUT_PAIRS,
    PALETTE,
    POSITION_CENTER,
    SHAPES,
    ShapeSpec,
    build_sample,
    caption,
    enumerate_specs,
    make_eval_prompts,
    paraphrases,
    render,
    sample_spec,
    stream_shapes,
    training_captions,
    write_imagefolder,
)
from tune.errors import ConfigError, DataError, TuneError

CANONICAL = re.compile(
    r"^a (small|large) (\w+) (circle|square|triangle|star) on a (\w+) background"
    r"( in the (center|top left|top right|bottom left|bottom right))?$"
)


def object_mask(image, spec: ShapeSpec) -> np.ndarray:
    """Pixels closer to the object colour than to the background colour."""
    pixels = np.asarray(image, dtype=np.float64)
    to_object = np.linalg.norm(pixels - PALETTE[spec.color], axis=-1)
    to_bg = np.linalg.norm(pixels - PALETTE[spec.bg], axis=-1)
    return to_object < to_bg


# ---------------------------------------------------------------------------------------------
# Specs and splits
# ---------------------------------------------------------------------------------------------


def test_enumeration_counts_and_validity():
    every = enumerate_specs("all")
    train, heldout = enumerate_specs("train"), enumerate_specs("heldout")
    # 8 colours x 4 shapes x 7 backgrounds x (5 small positions + 1 large).
    assert len(every) == len(set(every)) == 8 * 4 * 7 * 6
    assert set(train) | set(heldout) == set(every)
    assert not set(train) & set(heldout)
    assert all(s.color != s.bg for s in every)
    assert all(s.position == "center" for s in every if s.size == "large")


def test_heldout_pairs_are_spread_and_never_in_train():
    assert len(HELDOUT_PAIRS) >= 4
    assert {c for c, _ in HELDOUT_PAIRS} == set(COLORS)
    assert {s for _, s in HELDOUT_PAIRS} == set(SHAPES)
    # Every colour and every shape is still seen in training, with several partners.
    train_pairs = {(s.color, s.shape) for s in enumerate_specs("train")}
    assert all(sum(c == color for c, _ in train_pairs) >= 3 for color in COLORS)
    assert all(sum(s == shape for _, s in train_pairs) >= 3 for shape in SHAPES)
    assert not train_pairs & set(HELDOUT_PAIRS)
    assert {(s.color, s.shape) for s in enumerate_specs("heldout")} == set(HELDOUT_PAIRS)


def test_sampled_splits_respect_heldout_pairs():
    rng = np.random.default_rng(0)
    train = [sample_spec("train", rng) for _ in range(3000)]
    heldout = [sample_spec("heldout", rng) for _ in range(500)]
    mixed = [sample_spec("all", rng) for _ in range(1000)]
    assert not any(s.heldout for s in train)
    assert all(s.heldout for s in heldout)
    assert 0.1 < sum(s.heldout for s in mixed) / len(mixed) < 0.4  # 8 of 32 pairs
    assert all(s.color != s.bg for s in train + heldout + mixed)
    # Sizes are balanced rather than 1 large in 6.
    assert 0.4 < sum(s.size == "large" for s in train) / len(train) < 0.6


def test_streamed_train_split_has_no_heldout_pair():
    assert not any(s.spec.heldout for s in stream_shapes("train", count=300, resolution=16, seed=3))


def test_spec_rejects_invalid_values():
    with pytest.raises(ValueError, match="differ"):
        ShapeSpec("circle", "red", "red", "small", "center")
    with pytest.raises(ValueError, match="centred"):
        ShapeSpec("circle", "red", "blue", "large", "top left")
    with pytest.raises(ValueError, match="did you mean 'purple'"):
        ShapeSpec("circle", "purpel", "blue", "small", "center")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="split"):
        sample_spec("test", np.random.default_rng(0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def test_canonical_caption_examples():
    small = ShapeSpec("circle", "red", "blue", "small", "top left")
    large = ShapeSpec("star", "white", "black", "large")
    assert caption(small) == "a small red circle on a blue background in the top left"
    assert caption(large) == "a large white star on a black background"


def test_every_caption_names_every_attribute():
    for spec in enumerate_specs("all"):
        canonical = caption(spec)
        match = CANONICAL.match(canonical)
        assert match, canonical
        assert match.group(1, 2, 3, 4) == (spec.size, spec.color, spec.shape, spec.bg)
        assert match.group(6) == (spec.position if spec.size == "small" else None)
        alternatives = paraphrases(spec)
        assert len(set(alternatives)) == len(alternatives) >= 3
        assert canonical not in alternatives
        assert training_captions(spec) == (canonical, *alternatives)
        for text in alternatives:
            for word in (spec.size, spec.color, spec.shape, spec.bg):
                assert re.search(rf"\b{word}\b", text), (word, text)
            assert (spec.position in text) == (spec.size == "small"), text


def test_paraphrase_prob_switches_captions():
    canonical = [build_sample(i, seed=1, resolution=16) for i in range(20)]
    varied = [build_sample(i, seed=1, resolution=16, paraphrase_prob=1.0) for i in range(20)]
    assert all(s.caption == caption(s.spec) for s in canonical)
    assert all(s.caption in paraphrases(s.spec) for s in varied)
    assert [s.spec for s in canonical] == [s.spec for s in varied]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", list(POSITION_CENTER))
@pytest.mark.parametrize("shape", SHAPES)
def test_small_objects_sit_at_their_position(shape, position):
    spec = ShapeSpec(shape, "green", "white", "small", position)
    expected = np.array(POSITION_CENTER[position])
    rng = np.random.default_rng(0)
    for image in [render(spec, 64)] + [render(spec, 64, rng) for _ in range(5)]:
        ys, xs = np.nonzero(object_mask(image, spec))
        box_center = np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / 2 / 64
        assert np.abs(box_center - expected).max() <= shapes.POSITION_JITTER + 1 / 64
        extent = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 64
        assert 0.3 * 0.9 - 2 / 64 <= extent <= 0.3 * 1.1 + 2 / 64
        # The object stays inside the frame with a margin, so the border is all background.
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63


@pytest.mark.parametrize("shape", SHAPES)
def test_large_objects_are_centred_and_about_60_percent(shape):
    spec = ShapeSpec(shape, "orange", "purple", "large")
    ys, xs = np.nonzero(object_mask(render(spec, 64), spec))
    assert (xs.min() + xs.max() + 1) / 2 == pytest.approx(32, abs=1)
    assert (ys.min() + ys.max() + 1) / 2 == pytest.approx(32, abs=1)
    assert max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == pytest.approx(0.6 * 64, abs=1.5)


def test_object_and_background_colours_and_antialiasing():
    spec = ShapeSpec("star", "yellow", "blue", "large")
    pixels = np.asarray(render(spec, 64), dtype=np.float64)
    assert tuple(pixels[0, 0]) == PALETTE["blue"]
    assert tuple(pixels[34, 32]) == PALETTE["yellow"]  # the star's middle
    # Box-filtered edges: every pixel is a mix of the two colours, and some are strictly between.
    bg, obj = np.array(PALETTE["blue"]), np.array(PALETTE["yellow"])
    t = (pixels - bg) @ (obj - bg) / ((obj - bg) @ (obj - bg))
    off_line = np.linalg.norm(pixels - (bg + t[..., None] * (obj - bg)), axis=-1)
    assert off_line.max() < 2.0
    assert ((t > 0.1) & (t < 0.9)).sum() > 20


def test_render_resolution_and_noise():
    spec = ShapeSpec("square", "black", "white", "small", "bottom right")
    assert render(spec, 100).size == (100, 100)
    clean = np.asarray(render(spec, 64, np.random.default_rng(5)), dtype=np.float64)
    noisy = np.asarray(render(spec, 64, np.random.default_rng(5), noise_std=8.0), dtype=np.float64)
    assert 5 < np.std(noisy - clean) < 11
    with pytest.raises(ValueError, match="rng"):
        render(spec, 64, noise_std=8.0)
    with pytest.raises(ValueError, match="resolution"):
        render(spec, 8)


def test_same_seed_same_bytes_and_prefixes_agree():
    a = [s.image.tobytes() for s in stream_shapes("all", count=6, seed=7, noise_std=4.0)]
    b = [s.image.tobytes() for s in stream_shapes("all", count=10, seed=7, noise_std=4.0)]
    c = [s.image.tobytes() for s in stream_shapes("all", count=6, seed=8, noise_std=4.0)]
    assert a == b[:6]
    assert a != c
    assert build_sample(4, split="all", seed=7, noise_std=4.0).image.tobytes() == a[4]


# ---------------------------------------------------------------------------------------------
# Files, eval prompts, CLI
# ---------------------------------------------------------------------------------------------


def test_write_imagefolder_is_deterministic(tmp_path):
    first = write_imagefolder(tmp_path / "a", count=8, split="train", resolution=32, seed=3)
    second = write_imagefolder(tmp_path / "b", count=8, split="train", resolution=32, seed=3)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert len(names) == 9  # 8 PNGs + metadata.jsonl
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_imagefolder_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = write_imagefolder(tmp_path / "shapes", count=12, split="all", resolution=32, seed=0)
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert len(ds) == 12
    expected = {"image", "text", "shape", "color", "bg", "size", "position", "heldout", "paraphrases"}
    assert set(ds.column_names) == expected
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    for example in ds:
        spec = ShapeSpec(*(example[k] for k in ("shape", "color", "bg", "size", "position")))
        assert example["text"] == caption(spec)
        assert example["heldout"] == spec.heldout
        assert example["paraphrases"] == list(paraphrases(spec))
        assert example["image"].size == (32, 32) and example["image"].mode == "RGB"
    assert sorted(ds["text"]) == sorted(r["text"] for r in rows)


def test_write_imagefolder_never_overwrites(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_imagefolder(out, count=2)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        write_imagefolder(tmp_path / "file", count=2)
    with pytest.raises(ConfigError, match="count"):
        write_imagefolder(tmp_path / "new", count=0)
    assert not (tmp_path / "new").exists()


def test_eval_prompts_are_heldout_canonical_and_balanced():
    prompts = make_eval_prompts(200)
    assert len(prompts) == 200
    assert prompts == make_eval_prompts(200)
    assert len({p.spec for p in prompts}) == 200
    assert all(p.spec.heldout and p.prompt == caption(p.spec) for p in prompts)
    per_pair = Counter((p.spec.color, p.spec.shape) for p in prompts)
    assert set(per_pair) == set(HELDOUT_PAIRS) and set(per_pair.values()) == {25}
    assert Counter(p.spec.size for p in prompts)["large"] >= 50
    # Past the split's 336 specs, prompts repeat in the same order.
    many = make_eval_prompts(400)
    assert many[336:] == many[: 400 - 336]
    assert not any(p.spec.heldout for p in make_eval_prompts(50, split="train"))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tune data shapes")
    shapes.configure_cli(parser)
    return shapes.run_cli(parser.parse_args(argv))


def test_cli_writes_and_refuses_non_empty(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [str(out), "--count", "5", "--split", "heldout", "--resolution", "32", "--seed", "2"]
    assert run_cli(argv) == 0
    assert "wrote 5 heldout images" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["heldout"] for r in rows)
    assert all(Path(out / r["file_name"]).is_file() for r in rows)
    with pytest.raises(TuneError):
        run_cli(argv)
    with pytest.raises(TuneError, match="count"):
        run_cli([str(tmp_path / "other"), "--count", "-1"])
    with pytest.raises(SystemExit):
        run_cli([str(tmp_path / "other"), "--split", "test"])
