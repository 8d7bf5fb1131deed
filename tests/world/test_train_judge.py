"""scripts/train_judge.py's training sets: one style rendered on its own, several caches mixed."""

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
