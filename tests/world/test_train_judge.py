"""scripts/train_judge.py's training sets: one style rendered on its own, several caches mixed."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
import train_judge  # noqa: E402


def test_a_cache_of_one_style_and_a_mixture_that_must_exist(tmp_path: Path) -> None:
    pixel = tmp_path / "pixel.npz"
    args = ["--render-only", "--count", "6", "--workers", "1", "--seed", "3"]
    assert train_judge.main([*args, "--style", "pixel", "--cache", str(pixel)]) == 0
    data = np.load(pixel, allow_pickle=True)
    assert data["pixels"].shape == (6, 64, 64, 3)
    assert {spec.style for spec in data["specs"]} == {"pixel"}

    mixed = train_judge.main([*args, "--cache", str(tmp_path / "any.npz")])  # any style
    assert (
        mixed == 0 and len({s.style for s in np.load(tmp_path / "any.npz", allow_pickle=True)["specs"]}) > 1
    )

    missing = tmp_path / "missing.npz"
    with pytest.raises(SystemExit) as exit_info:
        train_judge.main(["--steps", "1", "--cache", str(pixel), str(missing)])
    assert exit_info.value.code == 2
    assert not missing.exists()  # only read, never rendered


@pytest.mark.slow  # trains and measures a judge twice (about 20 s)
def test_measure_only_measures_a_judge_again_without_training(tmp_path: Path) -> None:
    out, cache = tmp_path / "judge", tmp_path / "train.npz"
    small = ["--workers", "1", "--eval-per-style", "3", "--subject-photos", "2", "--out", str(out)]
    args = ["--count", "8", "--steps", "1", "--batch-size", "4", "--width", "32", "--cache", str(cache)]
    assert train_judge.main([*args, *small]) == 0
    weights = (out / "model.safetensors").read_bytes()
    report = json.loads((out / "report.json").read_text())
    kept = {k: v for k, v in report.items() if k not in ("clean", "blur_1px", "subjects")}
    (out / "report.json").write_text(json.dumps(kept))  # figures gone: measuring must bring them back
    (out / "MODEL_CARD.md").unlink()

    assert train_judge.main(["--measure-only", "--seed", "9", *small]) == 0
    assert (out / "model.safetensors").read_bytes() == weights  # not trained
    again = json.loads((out / "report.json").read_text())
    assert again["command"] == report["command"]
    assert set(again["clean"]) == set(again["blur_1px"]) == {"photo", "drawing", "sketch", "pixel"}
    assert set(again["subjects"]) >= {"sks-toy", "w-person"}
    assert "## Accuracy on fresh renders" in (out / "MODEL_CARD.md").read_text()
