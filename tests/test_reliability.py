"""Reliability pieces of issue 10: non-finite losses skipped then stopping the run, disk-space checks,
the run lock taken over from a dead process, torn metrics lines, atomic folders."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from recipes import lora as recipe
from tune import PROJECT_ROOT, durable
from tune.config import load_config
from tune.durable import atomic_folder, write_atomic
from tune.errors import TrainingError, TuneError
from tune.personalize import loading as photo_loading
from tune.runs import RunDir, read_metrics, read_run

sys.path.insert(0, str(Path(__file__).parent / "recipes"))
from recipe_testkit import make_concept  # noqa: E402

TINY = PROJECT_ROOT / "recipes" / "configs" / "lora" / "tiny.toml"
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reliability")
    return {
        "base": tiny_pipeline_dir,
        "concept": str(make_concept(root / "concept")),
        "cache": str(root / "cache"),
    }


def config(setup: dict[str, str], out: Path, *extra: str) -> recipe.Config:
    overrides = [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"data.cache_dir={setup['cache']}",
        f"output_dir={out}",
        "sample_every=0",
        "checkpoint_every=1",
        "checkpoints_keep=0",
        *extra,
    ]
    return load_config(recipe.Config, TINY, overrides)


def nan_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """Make the lora recipe's loss NaN at these (1-based) steps; its gradients are NaN too."""
    real = photo_loading.diffusion_step  # what the recipe's PhotoLoss calls
    calls = []

    def step(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) in steps else loss

    monkeypatch.setattr(photo_loading, "diffusion_step", step)


def trained(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "trainable_0.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------


def test_nonfinite_step_is_skipped_and_logged(
    setup: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_at(monkeypatch, {2, 3})
    run = recipe.main(config(setup, tmp_path / "r")).path
    rows = {m["step"]: m for m in read_metrics(run / "metrics.jsonl")}
    assert "loss" in rows[1] and "loss" in rows[4]
    assert rows[2]["skipped"].startswith("non-finite loss") and rows[3]["nonfinite_in_a_row"] == 2
    # No update at the skipped steps: the weights after steps 1, 2 and 3 are the same...
    assert all(torch.equal(trained(run, 1)[k], trained(run, 3)[k]) for k in trained(run, 1))
    # ...and the NaN gradients were dropped, not carried into step 4.
    after = trained(run, 4)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(after[k], trained(run, 3)[k]) for k in after)
    assert read_run(run).status == "done"


def test_too_many_nonfinite_steps_stop_the_run(
    setup: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_at(monkeypatch, {3, 4, 5, 6})
    out = tmp_path / "r"
    cfg = config(setup, out, "max_steps=6", "max_nonfinite_steps=2", "checkpoint_every=2")
    with pytest.raises(TrainingError, match=r"not finite for 2 steps in a row \(steps 3-4\).*step_000002"):
        recipe.main(cfg)
    assert read_run(out).checkpoint_steps == [2]  # the last good checkpoint, intact
    assert all(torch.isfinite(t).all() for t in trained(out, 2).values())
    assert max(m["step"] for m in read_metrics(out / "metrics.jsonl")) == 4


def test_max_nonfinite_steps_is_a_checked_config_key() -> None:
    assert recipe.Config().max_nonfinite_steps == 5
    with pytest.raises(TuneError, match="max_nonfinite_steps must be >= 1"):
        load_config(recipe.Config, None, ["max_nonfinite_steps=0"])


# ---------------------------------------------------------------------------------------------------
# Disk space
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> int:
    free = 5 * 2**20
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - free, free))
    return free


def test_disk_space_error_names_folder_free_and_needed(tmp_path: Path, full_disk: int) -> None:
    with pytest.raises(TuneError) as err:
        durable.check_disk_space(tmp_path / "not" / "yet", 3 * 2**30, "the export")
    message = str(err.value)
    assert (
        str(tmp_path / "not" / "yet") in message and "5.0 MiB free" in message and "3.0 GiB needed" in message
    )
    with pytest.raises(TuneError, match="not enough disk space for a.txt"):
        write_atomic(tmp_path / "a.txt", "x")
    with (
        pytest.raises(TuneError, match="not enough disk space for pipeline/"),
        atomic_folder(tmp_path / "pipeline", 2**30),
    ):
        pass
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cache_checkpoint_and_export_check_the_space(
    setup: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.data.cache import save_entry

    with monkeypatch.context() as m:
        m.setattr(durable.shutil, "disk_usage", lambda path: Usage(2**40, 2**40, 2**20))
        with pytest.raises(TuneError, match="not enough disk space for the cache"):
            save_entry(tmp_path / "c" / "x.safetensors", {"mean": torch.zeros(4)})
    # A run whose disk fills up after its first checkpoint: the next checkpoint is refused, cleanly.
    real = durable.check_disk_space
    seen: list[str] = []

    def filling(folder: Any, needed: int, what: str) -> None:
        seen.append(what)
        if what == "the step 2 checkpoint":
            raise TuneError(f"not enough disk space for {what} in {folder}: 0 B free, {needed} B needed")
        real(folder, needed, what)

    monkeypatch.setattr("tune.training.checkpoints.check_disk_space", filling)
    out = tmp_path / "r"
    with pytest.raises(TuneError, match="the step 2 checkpoint"):
        recipe.main(config(setup, out, "max_steps=2"))
    assert read_run(out).checkpoint_steps == [1] and not (out / "checkpoints" / "step_000002").exists()
    assert "the step 1 checkpoint" in seen


# ---------------------------------------------------------------------------------------------------
# The run lock, metrics, atomic folders
# ---------------------------------------------------------------------------------------------------


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    code = (
        "import time; from tune.runs import RunDir; "
        f"run = RunDir.create({str(tmp_path / 'r')!r}, 'lora', ''); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(TuneError, match=r"in use by pid \d+ on .*another tune run is writing it"):
            RunDir.create(tmp_path / "r", "lora", "", resume=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "pid" in (tmp_path / "r" / "LOCK").read_text()  # the dead writer's note is still there...
    run = RunDir.create(tmp_path / "r", "lora", "", resume=True)  # ...but its flock died with it
    assert read_run(tmp_path / "r").status == "running"
    run.close()


def test_resume_cuts_a_torn_metrics_line(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", "lora", "")
    run.log_metrics(1, loss=1.0)
    run.close()
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    run = RunDir.create(tmp_path / "r", "lora", "", resume=True)
    run.log_metrics(2, loss=0.5)
    run.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "r" / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 0.5),
    ]
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_atomic_folder_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pipeline"
    with atomic_folder(target) as folder:
        (folder / "a.json").write_text("1")
    assert (target / "a.json").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_folder(target) as folder:
        (folder / "a.json").write_text("2")
        raise RuntimeError("killed mid-export")
    assert (target / "a.json").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    with atomic_folder(target) as folder:
        (folder / "b.json").write_text("3")
    assert [p.name for p in target.iterdir()] == ["b.json"] and [p.name for p in tmp_path.iterdir()] == [
        "pipeline"
    ]


def test_loss_of_finished_steps_stays_finite_in_json(tmp_path: Path) -> None:
    # A skipped step's row carries no loss value, so metrics.jsonl stays strict JSON for other readers.
    run = RunDir.create(tmp_path / "r", "lora", "")
    run.log_metrics(1, skipped="non-finite loss (nan)", nonfinite_in_a_row=1)
    run.close()
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text(), parse_constant=lambda c: math.nan)
    assert "loss" not in row and row["nonfinite_in_a_row"] == 1
