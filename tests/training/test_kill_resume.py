"""Crash safety, end to end: a tiny lora run killed with SIGKILL, then resumed with resume=latest, ends with
the same weights as an uninterrupted run (issue 10).

- The real command line (`tune run lora` in a subprocess) is killed after its 2nd checkpoint; while it is
  still alive, a second `tune run` into its folder is refused with one line and exit code 2.
- A run is killed at 5 seeded random moments in a row (mid-step, during a checkpoint write, at a random
  time), resuming after each kill; forked children stand in for the subprocesses there, because they start
  in a fraction of a second (a SIGKILL ends a forked child exactly as it ends a `tune run`: the kernel drops
  its lock and its unflushed nothing; the page cache keeps what it wrote).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes import lora as recipe
from tune import PROJECT_ROOT, cli
from tune.config import load_config
from tune.runs import COMPLETE_MARKER, read_metrics, read_run
from tune.training import PAUSE_AFTER_CHECKPOINT_ENV, PAUSE_IN_CHECKPOINT_ENV

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
from recipe_testkit import losses, make_concept  # noqa: E402

# Slow: each test trains the run several times over in killed processes (~10 s each with the reference).
pytestmark = pytest.mark.slow

CONFIG = PROJECT_ROOT / "recipes" / "configs" / "lora" / "tiny.toml"
MAX_STEPS = 8
# 8 steps, a checkpoint every 2 (the 2 newest kept, so kills also land in pruning); fp32 exports, so the
# comparison sees every bit the training produced.
RUN = [f"max_steps={MAX_STEPS}", "checkpoint_every=2", "sample_every=0", "export_dtype=fp32"]
COMPARED = (
    "export/pytorch_lora_weights.safetensors",
    f"checkpoints/step_{MAX_STEPS:06d}/trainable_0.safetensors",
)
TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kill")
    concept = make_concept(root / "concept")
    return {"base": tiny_pipeline_dir, "concept": str(concept), "cache": str(root / "cache")}


def overrides(setup: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"data.cache_dir={setup['cache']}",
        f"output_dir={out}",
        *RUN,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(setup: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return recipe.main(load_config(recipe.Config, CONFIG, overrides(setup, out))).path


def max_abs_diff(run: Path, reference: Path) -> float:
    """The largest difference between the run's final weights and the reference's (exported adapter and
    final checkpoint)."""
    worst = 0.0
    for rel in COMPARED:
        got, want = load_file(str(run / rel)), load_file(str(reference / rel))
        assert got.keys() == want.keys(), rel
        worst = max(worst, *((got[k].float() - want[k].float()).abs().max().item() for k in want))
    return worst


def checkpoint_files(run: Path, step: int) -> set[str]:
    return {p.name for p in (run / "checkpoints" / f"step_{step:06d}").iterdir()}


def assert_complete_checkpoints_are_whole(run: Path, reference: Path) -> list[int]:
    """Every checkpoint with a COMPLETE marker holds all the files the reference's checkpoints hold."""
    steps = read_run(run).checkpoint_steps
    for step in steps:
        assert checkpoint_files(run, step) == checkpoint_files(reference, MAX_STEPS), step
    return steps


def wait_for(condition: Callable[[], bool], alive: Callable[[], bool], what: str) -> bool:
    """Poll until `condition`; False when the process ended first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if not alive():
            return condition()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------------------------------------------
# The command line, killed after its 2nd checkpoint
# ---------------------------------------------------------------------------------------------------


def test_sigkill_after_second_checkpoint_then_resume_matches(
    setup: dict[str, str], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["run", "lora", "--config", "tiny", *overrides(setup, out)]
    # Holds the process right after its step-4 checkpoint is complete, so the kill lands there every time.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", PAUSE_AFTER_CHECKPOINT_ENV: "4"}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tune.cli", *args], cwd=PROJECT_ROOT, env=env, stdout=stderr, stderr=stderr
        )
    try:
        marker = out / "checkpoints" / "step_000004" / COMPLETE_MARKER
        reached = wait_for(marker.exists, lambda: proc.poll() is None, "the step-4 checkpoint")
        assert reached and proc.poll() is None, log.read_text()[-2000:]
        assert read_run(out).status == "running"

        # A second writer while the first is alive: one line, exit code 2, the run untouched.
        for extra in ([], ["resume=latest"]):
            capsys.readouterr()
            assert cli.main([*args, *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("tune: error: run directory") and "is in use by pid" in err, err
            assert "Traceback" not in err and len(err.splitlines()) == 1, err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    run = read_run(out)
    assert run.status == "crashed"  # the kernel dropped the dead writer's lock
    assert assert_complete_checkpoints_are_whole(out, reference) == [2, 4]
    assert not (out / "export" / "pytorch_lora_weights.safetensors").exists()

    assert cli.main([*args, "resume=latest"]) == 0  # takes over the stale lock
    assert read_run(out).status == "done"
    assert max_abs_diff(out, reference) <= 1e-6
    assert losses(out) == losses(reference)


# ---------------------------------------------------------------------------------------------------
# Kills at random moments
# ---------------------------------------------------------------------------------------------------


def _train(cfg: recipe.Config, env: dict[str, str]) -> None:  # the forked child
    os.environ.update(env)
    recipe.main(cfg)


def test_kills_at_five_random_moments_then_resume_matches(
    setup: dict[str, str], reference: Path, tmp_path: Path
) -> None:
    rng = random.Random(10)
    moments = ["in_checkpoint", "after_step", "time", "after_step", "in_checkpoint"]
    rng.shuffle(moments)  # which moment comes when, the steps and the delays: seeded random
    out = tmp_path / "run"
    cfg = load_config(recipe.Config, CONFIG, overrides(setup, out, "resume=latest"))
    fork = multiprocessing.get_context("fork")
    record = []
    for moment in moments:
        done = read_run(out).checkpoint_steps if out.exists() else []
        last = done[-1] if done else 0
        rows_before = len(read_metrics(out / "metrics.jsonl"))
        # Each kill lands within 4 steps of the last one (a backstop pause after that checkpoint keeps a fast
        # child from finishing first), so the 5 kills spread over the whole run.
        limit = min(last + 4, MAX_STEPS)
        env = {PAUSE_AFTER_CHECKPOINT_ENV: str(limit)}
        target = rng.choice(range(last + 2, limit + 1, 2)) if last < MAX_STEPS else MAX_STEPS
        if moment == "in_checkpoint":
            env[PAUSE_IN_CHECKPOINT_ENV] = str(target)  # stops between its files and its COMPLETE marker
        child = fork.Process(target=_train, args=(cfg, env))
        started = time.time_ns()
        child.start()
        alive = child.is_alive
        if moment == "in_checkpoint":
            wanted = checkpoint_files(reference, MAX_STEPS) - {COMPLETE_MARKER}
            folder = out / "checkpoints" / f"step_{target:06d}"

            def written(folder: Path = folder, wanted: set[str] = wanted, since: int = started) -> bool:
                try:  # by this child, not by an earlier one killed at the same step
                    return all((folder / name).stat().st_mtime_ns >= since for name in wanted)
                except FileNotFoundError:
                    return False

            wait_for(written, alive, f"the step {target} checkpoint's files")
            time.sleep(rng.uniform(0.0, 0.05))
            detail = f"step {target}"
        elif moment == "after_step":
            step = rng.randint(min(last + 1, limit), limit)

            def logged(step: int = step, skip: int = rows_before) -> bool:
                rows = read_metrics(out / "metrics.jsonl")[skip:]
                return any(r.get("step", 0) >= step for r in rows)

            wait_for(logged, alive, f"step {step}")
            delay = rng.uniform(0.0, 0.1)
            time.sleep(delay)
            detail = f"{delay:.3f} s after step {step} was logged"
        else:
            delay = rng.uniform(0.3, 3.0)
            child.join(delay)
            detail = f"{delay:.2f} s after start"
        assert child.exitcode is None, f"the child ended by itself ({child.exitcode}) at {moment}"
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        if moment == "in_checkpoint" and target > last:
            assert not (out / "checkpoints" / f"step_{target:06d}" / COMPLETE_MARKER).exists()
        steps = assert_complete_checkpoints_are_whole(out, reference) if out.exists() else []
        record.append(f"{moment} ({detail}): killed, complete checkpoints {steps}")

    run = recipe.main(cfg).path  # the last resume runs to the end
    print("\n".join(record))
    assert read_run(run).status == "done"
    assert "in_checkpoint (step" in "".join(record)
    assert max_abs_diff(run, reference) <= 1e-6
    assert losses(run) == losses(reference)
    got, want = (load_file(str(r / COMPARED[1])) for r in (run, reference))
    assert all(torch.equal(got[k], want[k]) for k in want)  # bit-identical on CPU
