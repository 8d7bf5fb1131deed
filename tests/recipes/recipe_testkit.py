"""Helpers the recipe tests share (a plain module: pytest puts tests/recipes/ on sys.path)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from tune.personalize import loading as photo_loading
from tune.runs import RunDir, read_metrics, read_run
from tune.world.render import render
from tune.world.subjects import SUBJECTS


def losses(run_path: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run appends the steps it repeats; the last row wins)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_path / "metrics.jsonl") if "loss" in m}


def make_concept(root: Path, count: int = 4) -> Path:
    """A concept folder: `count` small photos of the example toy (world renders) and a concept.toml."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(count):
        spec = SUBJECTS["sks-toy"].spec(("wooden table", "grey", "sand", "blue")[i % 4])
        image = render(spec, np.random.default_rng(i), 64 + 16 * (i % 2), 64)
        image.save(photos / f"toy_{i}.jpg", quality=90)
    (root / "concept.toml").write_text('token = "sks"\nclass_word = "toy"\n')
    return root


def loss_module(recipe: ModuleType) -> ModuleType:
    """The module whose `diffusion_step` a recipe's loss calls: the recipe's own (unet), or
    tune.personalize's PhotoLoss for the personalization recipes."""
    return recipe if hasattr(recipe, "diffusion_step") else photo_loading


def crash_then_resume(
    recipe: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., Any],
    run_dir: Path,
    crash_at: int = 3,
) -> tuple[list[int], RunDir]:
    """Run `recipe` until its `crash_at`-th diffusion step raises, then run it again with resume=latest.

    Returns the complete checkpoint steps the crash left behind and the resumed run.
    """
    where = loss_module(recipe)
    calls = []
    real_step = where.diffusion_step

    def crashing_step(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(where, "diffusion_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        recipe.main(make_config(run_dir))
    gc.collect()  # drop the crashed run's frames, which hold its run-directory lock
    monkeypatch.setattr(where, "diffusion_step", real_step)
    left = read_run(run_dir).checkpoint_steps
    return left, recipe.main(make_config(run_dir, "resume=latest"))


def check_exact_resume(
    recipe: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., Any],
    root: Path,
    *extra: str,
) -> tuple[RunDir, RunDir]:
    """Run `recipe` whole and crashed-then-resumed with the overrides `extra`; assert equal losses and
    bit-identical final checkpoints (every file of tensors in it). Returns both runs."""
    from safetensors.torch import load_file

    whole = recipe.main(make_config(root / "whole", *extra))
    left, resumed = crash_then_resume(
        recipe, monkeypatch, lambda out, *more: make_config(out, *extra, *more), root / "resumed"
    )
    assert left == [2] and losses(resumed.path) == losses(whole.path)
    final = whole.path / "checkpoints" / "step_000004"
    files = sorted(f.name for f in final.glob("*.safetensors"))
    assert files
    for name in files:
        a, b = load_file(str(final / name)), load_file(str(resumed.path / "checkpoints/step_000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    return whole, resumed


def sigkill_after_checkpoint(
    argv: list[str], out: Path, step: int, log: Path, timeout_s: float = 180.0
) -> None:
    """`tune <argv>` in a subprocess (one thread), held right after its step-`step` checkpoint is complete and
    killed there with SIGKILL; the run directory `out` is left as the kernel leaves it (status crashed)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tune import PROJECT_ROOT
    from tune.runs import COMPLETE_MARKER
    from tune.training import PAUSE_AFTER_CHECKPOINT_ENV

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", PAUSE_AFTER_CHECKPOINT_ENV: str(step)}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tune.cli", *argv], cwd=PROJECT_ROOT, env=env, stdout=stderr, stderr=stderr
        )
    try:
        marker = out / "checkpoints" / f"step_{step:06d}" / COMPLETE_MARKER
        deadline = time.monotonic() + timeout_s
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists() and proc.poll() is None, log.read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
