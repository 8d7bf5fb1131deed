"""The lora recipe with DoRA, LoHa and LoKr adapters (on attention, resnet convs and the text encoder), as
`tune run` in a subprocess killed with SIGKILL right after its step-2 checkpoint, then resumed with
resume=latest: the same losses and bit-identical checkpoint files as an uninterrupted run (issue 21; plain
LoRA is tests/training/test_kill_resume.py). The LoKr run also drops ranks and modules at random, so the
resumed run must draw the same dropout masks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tune import cli
from tune.lora import final_adapter_path
from tune.runs import read_run

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
from recipe_testkit import losses, make_concept, sigkill_after_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

TYPE_ARGS = {
    "dora": [],
    "loha": [],
    "lokr": ["lora.rank_dropout=0.2", "lora.module_dropout=0.2", "lora.decompose_both=true"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kill-types")
    return {
        "base": tiny_pipeline_dir,
        "concept": str(make_concept(root / "concept")),
        "cache": str(root / "c"),
    }


def args(setup: dict[str, str], type: str, out: Path) -> list[str]:
    return [
        "run",
        "lora",
        "--config",
        "tiny",
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"data.cache_dir={setup['cache']}",
        f"output_dir={out}",
        "max_steps=4",
        "checkpoint_every=2",
        "sample_every=0",
        "export_dtype=fp32",
        f"lora.type={type}",
        "lora.targets=['attn2', 'resnets', 'text_encoder']",
        *TYPE_ARGS[type],
    ]


def run_cli(argv: list[str], out: Path) -> None:
    """`tune run ...` in this process, to the end: exit code 0 and the run done."""
    assert cli.main(argv) == 0
    assert read_run(out).status == "done"


def checkpoint(run: Path) -> dict[str, dict]:
    folder = run / "checkpoints" / "step_000004"
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("type", sorted(TYPE_ARGS))
def test_sigkill_then_resume_is_bit_identical(setup: dict[str, str], type: str, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    run_cli(args(setup, type, reference), reference)
    out = tmp_path / "killed"
    sigkill_after_checkpoint(args(setup, type, out), out, 2, tmp_path / "stderr.txt")
    assert read_run(out).status == "crashed" and read_run(out).checkpoint_steps == [2]

    run_cli([*args(setup, type, out), "resume=latest"], out)
    assert losses(out) == losses(reference) and sorted(losses(out)) == [1, 2, 3, 4]
    ours, theirs = checkpoint(out), checkpoint(reference)
    assert set(ours) == {"lora.safetensors", "trainable_0.safetensors", "trainable_1.safetensors"}
    assert ours.keys() == theirs.keys()
    for name, tensors in theirs.items():
        assert tensors.keys() == ours[name].keys()
        assert all(tensors[k].equal(ours[name][k]) for k in tensors), name
    final, want = (load_file(str(final_adapter_path(r))) for r in (out, reference))
    assert final.keys() == want.keys() and all(final[k].equal(want[k]) for k in want)
    kohya = [run / "export" / f"{run.name}.safetensors" for run in (out, reference)]
    assert all(path.is_file() for path in kohya)  # the LyCORIS-keyed export of both runs
