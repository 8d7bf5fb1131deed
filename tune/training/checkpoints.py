"""Checkpoints: save (atomically complete), prune, resume; what they hold; the sizes disk-space checks use.

Checkpoints are accelerate's `save_state` folders (models, optimizers, schedules, RNG states, and
the data loader's position through `register_for_checkpointing`), each valid only once its
COMPLETE marker exists: the marker is written (atomically) after every other file is fsync'ed, so a
kill at any moment leaves the newest complete checkpoint intact and `resume=latest` skips the rest.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.durable import check_disk_space, fsync_tree
from tune.errors import TuneError
from tune.runs import COMPLETE_MARKER, RunDir, read_run
from tune.training.weights import evaluation_weights, use_training_weights

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Test-only hooks (tests/training/test_kill_resume.py): pause a checkpoint save of step N so a test can kill the
# process at a known moment. Unset in real use; each value is a step number.
PAUSE_IN_CHECKPOINT_ENV = "TUNE_TEST_PAUSE_IN_CHECKPOINT"
"""Pause after the checkpoint's files are written, before its COMPLETE marker."""
PAUSE_AFTER_CHECKPOINT_ENV = "TUNE_TEST_PAUSE_AFTER_CHECKPOINT"
"""Pause right after the checkpoint is complete (and old ones pruned)."""
_TEST_PAUSE_S = 120.0


def checkpoint_bytes(accelerator: Any, run: RunDir) -> int:
    """About how many bytes the next checkpoint takes: the newest one's size, else the optimized
    parameters three times over (weights and two Adam moments)."""
    steps = read_run(run.path).checkpoint_steps
    if steps:
        folder = run.checkpoint_dir(steps[-1])
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    params = {
        id(q): q
        for opt in getattr(accelerator, "_optimizers", [])
        for g in opt.param_groups
        for q in g["params"]
    }
    return 3 * sum(q.numel() * q.element_size() for q in params.values())


def save_checkpoint(accelerator, run: RunDir, step: int, keep: int = 0) -> Path:
    """Save models, optimizers, schedules, RNG and registered objects; mark complete; prune old ones.

    The COMPLETE marker is written last, after every file is on disk: a checkpoint without it (a kill
    mid-save) is ignored by `resume=latest` and replaced by the next save at that step. The free space
    is checked first. With a schedule-free optimizer it holds the evaluation weights (and the optimizer's
    flag saying so): `resume_from_checkpoint` moves back to the training weights with the same arithmetic.
    """
    path = run.checkpoint_dir(step)
    if accelerator.is_main_process:
        check_disk_space(
            run.checkpoints_dir, checkpoint_bytes(accelerator, run), f"the step {step} checkpoint"
        )
        if path.exists():  # an incomplete leftover of a crash at this very step
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    with evaluation_weights(accelerator):  # a checkpoint's adapter is what sampling it should use
        accelerator.save_state(str(path))
    if accelerator.is_main_process:
        fsync_tree(path)
        _test_pause(PAUSE_IN_CHECKPOINT_ENV, step)
        run.mark_checkpoint_complete(step)
        if keep > 0:
            for old in read_run(run.path).checkpoint_steps[:-keep]:
                old_path = run.checkpoint_dir(old)
                # Unmark first: a kill mid-delete must not leave a "complete" checkpoint missing files.
                (old_path / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(old_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("checkpoint saved: %s", path)
    if accelerator.is_main_process:
        _test_pause(PAUSE_AFTER_CHECKPOINT_ENV, step)
    return path


def _test_pause(env: str, step: int) -> None:
    if os.environ.get(env, "") == str(step):
        log.warning("%s=%d: pausing %.0f s (test hook) in %s", env, step, _TEST_PAUSE_S, "checkpoint")
        time.sleep(_TEST_PAUSE_S)


def resume_from_checkpoint(accelerator, run: RunDir, resume: str) -> int:
    """Load the newest complete checkpoint (`resume="latest"`) or a given one; return its step."""
    if not resume:
        return 0
    if resume == "latest":
        steps = read_run(run.path).checkpoint_steps
        if not steps:
            log.info("resume=latest: no complete checkpoint in %s; starting from step 0", run.path)
            return 0
        path = run.checkpoint_dir(steps[-1])
    else:
        path = Path(resume)
        if not path.name.startswith("step_") or not (path / "COMPLETE").exists():
            raise TuneError(
                f"{path} is not a complete checkpoint folder (checkpoints/step_XXXXXX with COMPLETE)"
            )
    try:
        accelerator.load_state(str(path))
    except TuneError:
        raise
    # A damaged file inside a complete checkpoint (disk error, hand edits) is the user's to fix.
    except Exception as err:
        log.debug("loading %s failed", path, exc_info=True)
        first = (str(err).strip().splitlines() or [""])[0]
        raise TuneError(
            f"cannot resume from {path} ({type(err).__name__}: {first}); resume from an earlier checkpoint "
            "with resume=<its folder>, or delete this one"
        ) from err
    use_training_weights(accelerator)  # a schedule-free optimizer's checkpoint holds its evaluation weights
    step = int(path.name.removeprefix("step_"))
    log.info("resumed from %s (step %d)", path, step)
    return step


def module_bytes(*objects: Any) -> int:
    """Bytes of the parameters and buffers of the torch modules among `objects` (an export's size)."""
    import torch

    total = 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def checkpoint_trainable_only(accelerator: Any) -> None:
    """Make accelerate checkpoints hold each prepared model's trainable parameters only.

    accelerate saves whole models; for a LoRA or a few embedding rows that is the frozen base model over
    and over. Its save hook writes `trainable_<i>.safetensors` instead, and its load hook restores them
    (and checks that the checkpoint was made with the same trainable set).
    """
    import torch
    from safetensors.torch import load_file, save_file

    def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        inner = accelerator.unwrap_model(model)
        return {n: p for n, p in inner.named_parameters() if p.requires_grad}

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                state = {n: p.detach().to("cpu").contiguous() for n, p in trainable(model).items()}
                save_file(state, str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()  # accelerate then writes no whole-model files

    def load_hook(models: list[Any], input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / f"trainable_{i}.safetensors"
            if not path.is_file():
                raise TuneError(f"{input_dir} has no {path.name}; it was not written by this recipe")
            saved, params = load_file(str(path)), trainable(model)
            if set(saved) != set(params):
                diff = sorted(set(saved) ^ set(params))
                raise TuneError(
                    f"checkpoint {input_dir} trained other weights than this run (e.g. {diff[0]}); resume with "
                    "the settings it was made with (lora.targets, lora.rank, ...)"
                )
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
        models.clear()  # loaded here; accelerate must not look for whole-model files

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def on_checkpoint(accelerator: Any, write: Callable[[Path, int], None]) -> None:
    """Call `write(checkpoint_dir, step)` inside every checkpoint save, before its COMPLETE marker (for the
    files other tools read from a checkpoint: LoRA adapters, learned embeddings)."""

    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            path = Path(output_dir)
            write(path, int(path.name.removeprefix("step_")))

    accelerator.register_save_state_pre_hook(hook)
