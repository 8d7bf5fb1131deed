"""The shipped world judge (models/world-judge) reads fresh renders, finds the example subjects in their
photos and not in look-alikes. `scripts/train_judge.py` measures it on 2,000 renders per style; these
are fast samples of the same checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune import PROJECT_ROOT
from tune.world.judge import HEADS, attribute_accuracy, labels, load_judge
from tune.world.render import render
from tune.world.scoring import fresh_renders
from tune.world.spec import STYLES, Spec
from tune.world.subjects import SUBJECTS, look_alikes


@pytest.fixture(scope="module")
def judge():
    return load_judge()


# Floors for a fast sample (about 60 renders per style) under the accuracy measured on 2,000 renders per
# style (models/world-judge/report.json): 0.997-1.0 for class, background, size, position and hair,
# 0.987-1.0 for colour, pattern and style, 0.988-0.996 for the second colour. A broken judge falls far
# below them.
FLOORS = {"color2": 0.75, "hair": 0.85, "color": 0.88, "pattern": 0.88, "style": 0.88}


def test_judge_reads_fresh_renders_of_every_style(judge) -> None:
    images, specs = fresh_renders(240, seed=424242)
    verdicts = judge.read(images)
    for style in STYLES:
        chosen = [(v, s) for v, s in zip(verdicts, specs, strict=True) if s.style == style]
        accuracy = attribute_accuracy(*zip(*chosen, strict=True))
        for attribute, value in accuracy.items():
            if attribute != "all":
                assert value >= FLOORS.get(attribute, 0.95), (style, attribute, accuracy)


def test_colours_are_not_read_in_a_sketch(judge) -> None:
    spec = Spec(cls="ball", color="red", background="blue", style="sketch")
    verdict = judge.read([render(spec, np.random.default_rng(0))])[0]
    assert verdict.style == "sketch" and verdict.color is None and verdict.color2 is None
    assert labels(spec)["color"] == labels(spec)["background"] == -100  # not shown, not trained
    assert set(labels(spec)) == set(HEADS)


@pytest.mark.parametrize("name", ["sks-toy", "w-person"])
def test_subject_is_found_in_its_photos(judge, name: str) -> None:
    paths = sorted((PROJECT_ROOT / "concepts" / name / "photos").glob("*.jpg"))
    photos = [Image.open(p).convert("RGB") for p in paths]
    assert len(photos) == 10
    assert sum(SUBJECTS[name].found(v) for v in judge.read(photos)) >= 9


@pytest.mark.parametrize("name", ["sks-toy", "w-person"])
def test_look_alikes_are_not_the_subject(judge, name: str) -> None:
    subject = SUBJECTS[name]
    specs = look_alikes(subject)
    images = [render(s, np.random.default_rng([i, j, 5])) for i, s in enumerate(specs) for j in range(2)]
    images += [
        render(s, np.random.default_rng([i, j, 6]), 96, 96) for i, s in enumerate(specs) for j in range(2)
    ]
    false = sum(subject.found(v) for v in judge.read(images))
    assert len(images) >= 60 and false <= 0.02 * len(images), false


def test_missing_judge_is_a_clear_error(tmp_path: Path) -> None:
    from tune.errors import ModelError

    with pytest.raises(ModelError, match="no world judge .*train_judge.py"):
        load_judge(tmp_path)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_a_saved_judge_loads_with_its_pooling(tmp_path: Path, pooling: str) -> None:
    import json

    import torch
    from safetensors.torch import save_file

    from tune.world.judge import JudgeNet

    torch.manual_seed(0)
    net = JudgeNet(width=8, pooling=pooling).eval()
    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"width": 8, "pooling": pooling}))
    loaded = load_judge(tmp_path).net
    assert loaded.pooling == pooling and hasattr(loaded, "attend") == (pooling == "attention")
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(x).values(), loaded(x).values(), strict=True))
    with pytest.raises(ValueError, match="pooling must be"):
        JudgeNet(width=8, pooling="max")
