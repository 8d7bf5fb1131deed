"""The toy world: specs and splits, the renderer, captions and their parser, the imagefolder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune import PROJECT_ROOT
from tune.cli import main as tune_main
from tune.data.check import check_data, format_report
from tune.data.config import DataConfig
from tune.data.loader import build_dataset
from tune.errors import DataError
from tune.world.captions import (
    RESERVED_WORDS,
    caption,
    madeup_words,
    parse,
    spec_attributes,
    training_captions,
    vocabulary,
)
from tune.world.dataset import make_eval_prompts, sample, write_imagefolder
from tune.world.render import object_mask, render
from tune.world.spec import (
    CLASSES,
    COLORS,
    HELDOUT_LOOKS,
    HELDOUT_PAIRS,
    PALETTE,
    STYLES,
    Spec,
    allowed,
    in_split,
    is_heldout_pair,
    sample_spec,
)


def specs(n: int, split: str = "all", seed: int = 0) -> list[Spec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, split) for _ in range(n)]  # type: ignore[arg-type]


def test_issue_palette_and_vocabulary() -> None:
    assert PALETTE["pink"] == (235, 80, 170) and PALETTE["teal"] == (30, 195, 195)
    assert len(PALETTE) == 12 and set(CLASSES) == {"ball", "ring", "block", "cup", "cone", "person"}
    assert len(HELDOUT_PAIRS) >= 10


def test_splits_keep_the_held_out_combinations_apart() -> None:
    train = specs(3000, "train")
    assert not any(is_heldout_pair(s) for s in train)
    assert not any(s.look in HELDOUT_LOOKS for s in train + specs(3000, "all", 1))
    held = specs(200, "heldout")
    assert all(is_heldout_pair(s) and s.pattern == "plain" for s in held)
    assert all(allowed(s) for s in train + held)
    # Every pink-and-teal striped ring (the example toy's look) is held out, in either colour order.
    toy = Spec(cls="ring", color="pink", pattern="striped", color2="teal", background="grey")
    assert not in_split(toy, "train") and not in_split(toy, "all")
    assert not in_split(
        Spec(cls="ring", color="teal", pattern="striped", color2="pink", background="red"), "all"
    )


def test_specs_refuse_impossible_combinations() -> None:
    with pytest.raises(ValueError, match="color2"):
        Spec(cls="ball", color="red", pattern="striped", background="blue")
    with pytest.raises(ValueError, match="hair"):
        Spec(cls="ball", color="red", background="blue", hair="green")
    with pytest.raises(ValueError, match="centred"):
        Spec(cls="cup", color="red", background="blue", size="large", position="top left")


def test_renderer_is_deterministic_and_draws_every_style() -> None:
    for i, spec in enumerate(specs(12, seed=3)):
        for style in STYLES:
            s = Spec(**{**spec.__dict__, "style": style})
            a = render(s, np.random.default_rng([i, 1]), 64, 64)
            b = render(s, np.random.default_rng([i, 1]), 64, 64)
            assert a.size == (64, 64) and a.mode == "RGB"
            assert np.array_equal(np.asarray(a), np.asarray(b))
    other = render(specs(1)[0], np.random.default_rng(99), 64, 64)
    assert not np.array_equal(
        np.asarray(other), np.asarray(render(specs(1)[0], np.random.default_rng(98), 64, 64))
    )


def test_objects_sit_where_and_as_large_as_the_spec_says() -> None:
    for position in ("top left", "bottom right"):
        spec = Spec(cls="ball", color="red", background="blue", size="small", position=position)
        mask = object_mask(spec, np.random.default_rng(0))
        ys, xs = np.nonzero(mask)
        assert (xs.mean() < 32) == ("left" in position) and (ys.mean() < 32) == ("top" in position)
    small = object_mask(
        Spec(cls="ball", color="red", background="blue", size="small"), np.random.default_rng(1)
    )
    large = object_mask(Spec(cls="ball", color="red", background="blue"), np.random.default_rng(1))
    assert 1.8 < large.sum() / small.sum() < 3.2


def test_colours_show_except_in_a_sketch() -> None:
    red = Spec(cls="block", color="red", background="white", style="drawing")
    pixels = np.asarray(render(red, np.random.default_rng(0)), dtype=np.float32)
    mask = object_mask(red, np.random.default_rng(0))
    assert np.abs(pixels[mask] - PALETTE["red"]).sum(axis=1).min() < 10  # the flat fill is the palette's red
    sketch = np.asarray(
        render(Spec(**{**red.__dict__, "style": "sketch"}), np.random.default_rng(0)), np.float32
    )
    assert np.abs(sketch - sketch.mean(axis=2, keepdims=True)).max() < 20  # grey on paper, no colour


def test_ring_has_a_clear_hole() -> None:
    spec = Spec(cls="ring", color="pink", background="blue")
    mask = object_mask(spec, np.random.default_rng(0))
    ys, xs = np.nonzero(mask)
    cy, cx = round(ys.mean()), round(xs.mean())
    assert not mask[cy, cx] and mask.sum() > 300


def test_canonical_captions_parse_back_to_their_attributes() -> None:
    for spec in specs(2000, seed=5):
        assert parse(caption(spec)) == spec_attributes(spec), caption(spec)
    toy = Spec(cls="ring", color="pink", pattern="striped", color2="teal", background="sand", size="small")
    assert caption(toy) == "a photo of a small pink and teal striped ring on sand in the center"
    person = Spec(
        cls="person", color="blue", pattern="striped", color2="white", hair="red", background="grass"
    )
    assert (
        caption(person)
        == "a photo of a large person with red hair in a blue and white striped shirt on grass"
    )


def test_training_captions_name_only_true_attributes() -> None:
    words = madeup_words(200)
    rng = np.random.default_rng(0)
    seen_word = seen_toy = 0
    for spec in specs(300, seed=6):
        truth = spec_attributes(spec)
        for text in training_captions(spec, rng, words):
            for key, value in parse(text).items():
                assert truth.get(key) == value or (key, value) == ("cls", "toy"), (text, key, value)
            seen_word += any(w in text.split() for w in words)
            seen_toy += " toy" in text
    assert seen_word > 300 and seen_toy > 100
    assert parse("a photo of zwx toy on a red background") == {
        "style": "photo",
        "cls": "toy",
        "background": "red",
    }
    assert parse("a red ball") == {"color": "red", "cls": "ball", "pattern": "plain"}


def test_madeup_words_are_unknown_and_reserved_words_are_never_drawn() -> None:
    words = madeup_words()
    assert len(words) == len(set(words)) == 4000
    assert not (set(words) & (RESERVED_WORDS | set(vocabulary())))


def test_imagefolder_is_deterministic_and_refuses_a_full_folder(tmp_path) -> None:
    out = write_imagefolder(tmp_path / "w", 6, seed=2)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["captions"]) == 8 and r["text"] == r["captions"][0] for r in rows)
    first = sample(3, "train", 2)
    assert np.array_equal(np.asarray(Image.open(out / rows[3]["file_name"])), np.asarray(first.image))
    assert rows[3]["cls"] == first.spec.cls and rows[3]["text"] == caption(first.spec)
    with pytest.raises(DataError, match="not empty"):
        write_imagefolder(out, 2)


def test_world_masks_cover_the_object_and_the_loader_reads_them(tmp_path) -> None:
    out = write_imagefolder(tmp_path / "w", 8, seed=2, masks=True)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["mask_file_name"] for r in rows] == [f"masks/{r['file_name']}" for r in rows]
    for i, row in enumerate(rows):
        item = sample(i, "train", 2)
        mask = np.asarray(Image.open(out / row["mask_file_name"])) > 127
        assert np.array_equal(mask, object_mask(item.spec, rng_before_render(i, 2)))
        assert mask.any() and not mask.all()
        if (
            item.spec.style == "photo" and item.spec.background in COLORS
        ):  # plain ground: the object stands out
            pixels = np.asarray(item.image, np.float64)
            ground = np.median(pixels[~mask], axis=0)
            far = np.linalg.norm(pixels - ground, axis=-1) > 40
            assert far[mask].mean() > 0.6 and far[~mask].mean() < 0.1
    keep = DataConfig(resolution=64, bucketing=False, caption_column="captions", keep_masks=True)
    assert "subject masks (the 'mask' column): 8 of 8" in format_report(check_data(out, keep))
    dataset = build_dataset(out, keep)
    for i, record in enumerate(dataset.records):
        kept = dataset[i]["subject_mask"][0].numpy() > 0.5
        assert record.mask is not None and np.array_equal(kept, np.asarray(Image.open(record.mask)) > 127)
    plain = build_dataset(
        write_imagefolder(tmp_path / "p", 2, seed=2), DataConfig(resolution=64, keep_masks=True)
    )
    assert "subject_mask" not in plain[0]


def rng_before_render(index: int, seed: int) -> np.random.Generator:
    """The generator of sample `index` in the state `render` receives it (after the spec's draws)."""
    rng = np.random.default_rng([seed, index, 0])
    sample_spec(rng, "train")
    return rng


def test_cli_writes_a_world_folder(tmp_path, capsys) -> None:
    assert tune_main(["data", "world", str(tmp_path / "w"), "--count", "3", "--workers", "1"]) == 0
    assert len(list((tmp_path / "w").glob("*.png"))) == 3
    assert "wrote 3 train images" in capsys.readouterr().out


def test_eval_prompts_balance_styles_and_keep_to_their_split() -> None:
    prompts = make_eval_prompts(40, "heldout")
    assert [p.spec.style for p in prompts[:4]] == list(STYLES)
    assert all(is_heldout_pair(p.spec) and parse(p.prompt) == spec_attributes(p.spec) for p in prompts)
    seen = make_eval_prompts(48, "train")
    assert {p.spec.cls for p in seen} == set(CLASSES) and not any(is_heldout_pair(p.spec) for p in seen)


@pytest.mark.parametrize("name", ["sks-toy", "w-person"])
def test_the_shipped_subject_photos_and_their_captions_are_write_photos_output(
    name: str, tmp_path: Path
) -> None:
    from tune.data.concepts import load_concept
    from tune.data.sources import scan_folder
    from tune.world.subjects import SUBJECTS, photo_spec, write_photos

    shipped = PROJECT_ROOT / "concepts" / name / "photos"
    written = write_photos(SUBJECTS[name], tmp_path, count=10)
    for path in written:
        assert path.read_bytes() == (shipped / path.name).read_bytes()
        caption = path.with_suffix(".txt")
        assert caption.read_text() == (shipped / caption.name).read_text()
    # The loader captions each photo by its sidecar, which names the photo's surface after the prompt.
    concept = load_concept(PROJECT_ROOT / "concepts" / name)
    scan = scan_folder(shipped, DataConfig(resolution=64), instance_prompt=concept.instance_caption)
    for index, record in enumerate(sorted(scan.records, key=lambda r: r.name)):
        background = photo_spec(SUBJECTS[name], index)[2].background
        assert record.has_caption and record.caption.startswith(concept.instance_caption + " on ")
        assert background in record.caption
    assert scan.sidecars_ignored == 0


def test_attention_targets_are_the_object_noun_and_the_background_words(tiny_pipe) -> None:  # noqa: ANN001
    from tune.attention import prompt_tokens
    from tune.world.attention_loss import world_targets

    tokenizer = tiny_pipe.tokenizer

    def words(caption: str) -> list[tuple[list[str], bool]]:
        """Each target's words (BPE pieces joined back) and its side of the mask."""
        tokens = prompt_tokens(caption, tokenizer)
        return [
            ("".join(tokens[p] for p in positions).replace("</w>", " ").split(), on)
            for positions, on in world_targets(caption, tokenizer)
        ]

    assert words("a photo of a large red ball on a blue background") == [
        (["ball"], True),
        (["blue", "background"], False),
    ]
    assert words("a red ball on a red background") == [(["ball"], True), (["red", "background"], False)]
    assert words("pixel art of a small person with green hair in a pink shirt on a wooden table") == [
        (["person"], True),
        (["wooden", "table"], False),
    ]
    assert words("a photo of qlv toy on grass") == [(["toy"], True), (["grass"], False)]
    assert words("a drawing of a cone") == [(["cone"], True)]
    assert words("") == [] and words("a photo") == []


def test_a_mask_column_that_holds_no_mask_files_is_not_read_as_masks(tmp_path, caplog) -> None:
    """A table's "mask" column of image bytes or labels (a segmentation dataset's, say) trains as before,
    without masks, and says so."""
    import io

    import datasets

    def png(mode: str, colour) -> dict:  # noqa: ANN001
        buffer = io.BytesIO()
        Image.new(mode, (64, 64), colour).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    images = [png("RGB", (200, 0, 0)), png("RGB", (0, 200, 0))]
    cfg = DataConfig(resolution=64, bucketing=False, keep_masks=True)
    for name, masks in (("bytes", [png("L", 255)] * 2), ("labels", ["cat", "dog"])):
        table = datasets.Dataset.from_dict({"image": images, "text": ["a", "b"], "mask": masks})
        table = table.cast_column("image", datasets.Image())
        if name == "bytes":
            table = table.cast_column("mask", datasets.Image())
        table.save_to_disk(tmp_path / name)
        with caplog.at_level("WARNING"):
            dataset = build_dataset(tmp_path / name, cfg)
        assert len(dataset) == 2 and all(r.mask is None for r in dataset.records)
        assert "subject_mask" not in dataset[0] and "without masks" in caplog.text
        caplog.clear()
