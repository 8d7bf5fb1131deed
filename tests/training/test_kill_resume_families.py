"""Every personalization recipe on an SDXL and an SD2 base, as `tune run` in a subprocess killed with SIGKILL
right after its step-2 checkpoint, then resumed with resume=latest: the same losses and bit-identical
checkpoint files as an uninterrupted run (issue 20; the SD1 case is tests/training/test_kill_resume.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tune import cli
from tune.models import build_pipeline
from tune.runs import read_run

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
from recipe_testkit import losses, make_concept, sigkill_after_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

PRESETS = {"sdxl": ("tiny-sdxl-shallow", "resolution=64"), "sd2": ("tiny-sd2", "resolution=32")}
RECIPE_ARGS = {
    "lora": ["lora.targets=['attn2', 'text_encoder']"],  # SDXL: adapters on both text encoders too
    "dreambooth": ["prior.enabled=false", "export_single_file=false"],
    "textual_inversion": [],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kill-families")
    folders = {"concept": str(make_concept(root / "concept")), "cache": str(root / "cache")}
    for family, (preset, _) in PRESETS.items():
        build_pipeline(preset, seed=0).save_pretrained(root / family)
        folders[family] = str(root / family)
    return folders


def args(setup: dict[str, str], recipe: str, family: str, out: Path) -> list[str]:
    return [
        "run",
        recipe,
        "--config",
        "tiny",
        f"base_model={setup[family]}",
        f"concept={setup['concept']}",
        f"data.cache_dir={setup['cache']}",
        f"output_dir={out}",
        PRESETS[family][1],
        "max_steps=4",
        "checkpoint_every=2",
        "sample_every=0",
        *RECIPE_ARGS[recipe],
    ]


def checkpoint(run: Path) -> dict[str, dict]:
    folder = run / "checkpoints" / "step_000004"
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("family", sorted(PRESETS))
@pytest.mark.parametrize("recipe", sorted(RECIPE_ARGS))
def test_sigkill_then_resume_is_bit_identical(
    setup: dict[str, str], recipe: str, family: str, tmp_path: Path
):
    reference = tmp_path / "reference"
    assert cli.main(args(setup, recipe, family, reference)) == 0
    out = tmp_path / "killed"
    sigkill_after_checkpoint(args(setup, recipe, family, out), out, 2, tmp_path / "stderr.txt")
    assert read_run(out).status == "crashed" and read_run(out).checkpoint_steps == [2]

    assert cli.main([*args(setup, recipe, family, out), "resume=latest"]) == 0
    assert read_run(out).status == "done"
    assert losses(out) == losses(reference) and sorted(losses(out)) == [1, 2, 3, 4]
    ours, theirs = checkpoint(out), checkpoint(reference)
    assert ours.keys() == theirs.keys() and ours
    for name, tensors in theirs.items():
        assert tensors.keys() == ours[name].keys()
        assert all(tensors[k].equal(ours[name][k]) for k in tensors), name
