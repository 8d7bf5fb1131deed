"""The plumbing every training recipe shares: run start, seeding, accelerate, checkpoints and resume.

A recipe calls, in order:

    run, cfg = start_run("lora", cfg)                       # run dir, resolved config, seed
    accelerator = build_accelerator(cfg.mixed_precision, cfg.grad_accum)
    ... build models, optimizer, lr schedule, loader; accelerator.prepare(...) ...
    accelerator.register_for_checkpointing(loader)           # anything with state_dict/load_state_dict
    step = resume_from_checkpoint(accelerator, run, cfg.resume)   # 0 when starting fresh
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    ... loop: loss, backward; `if nonfinite.check(loss): optimizer.step()`;
              `if nonfinite.finish(run, step, loss_value): log the step`;
              save_checkpoint(accelerator, run, step) every N steps ...

Checkpoints are accelerate's `save_state` folders (models, optimizers, schedules, RNG states, and
the data loader's position through `register_for_checkpointing`), each valid only once its
COMPLETE marker exists: the marker is written (atomically) after every other file is fsync'ed, so a
kill at any moment leaves the newest complete checkpoint intact and `resume=latest` skips the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tune.config import to_toml
from tune.errors import ConfigError, TrainingError, TuneError
from tune.runs import (
    COMPLETE_MARKER,
    RunDir,
    check_disk_space,
    default_output_dir,
    fsync_tree,
    read_run,
    step_dir_name,
)

log = logging.getLogger(__name__)

# Test-only hooks (tests/test_kill_resume.py): pause a checkpoint save of step N so a test can kill the
# process at a known moment. Unset in real use; each value is a step number.
PAUSE_IN_CHECKPOINT_ENV = "TUNE_TEST_PAUSE_IN_CHECKPOINT"
"""Pause after the checkpoint's files are written, before its COMPLETE marker."""
PAUSE_AFTER_CHECKPOINT_ENV = "TUNE_TEST_PAUSE_AFTER_CHECKPOINT"
"""Pause right after the checkpoint is complete (and old ones pruned)."""
_TEST_PAUSE_S = 120.0


class ReplicaRunDir(RunDir):
    """The run directory as the other processes of a multi-process run see it: the same paths, no writes.

    The main process creates the folder, holds its LOCK and writes every file (config, run.json,
    metrics, samples, COMPLETE markers, exports, DONE); these calls are no-ops here.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, None)

    def sample_dir(self, step: int) -> Path:
        return self.samples_dir / step_dir_name(step)

    def log_metrics(self, step: int, **values: Any) -> None:
        pass

    def update_info(self, **values: Any) -> None:
        pass

    def mark_checkpoint_complete(self, step: int) -> None:
        pass

    def finish(self) -> None:
        self.close()


def _distributed_cpu() -> bool:
    """Whether this is one of several processes on a machine without an accelerator: accelerate then
    needs cpu=True to join them with gloo (else each process would train alone)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def start_run(recipe: str, cfg: Any) -> tuple[RunDir, Any]:
    """Create (or reopen, with `resume`) the run directory; save the resolved config; seed everything.

    Returns the run and the config with `output_dir` resolved (the saved config.toml names the
    folder, so running it again reproduces this run). Under `torchrun` / `accelerate launch` only the
    main process creates and writes the folder (the others get a `ReplicaRunDir` of the same path, and
    the main process's error, if creating it failed).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, set_seed

    state = PartialState(cpu=_distributed_cpu())  # joins the process group under torchrun / accelerate launch
    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=str(default_output_dir(recipe)))
    resume = getattr(cfg, "resume", "")
    if resume not in ("", "latest") and not Path(resume).is_dir():
        raise ConfigError(f"resume must be '', 'latest' or a checkpoint folder; got {resume!r}")
    run: RunDir | None = None
    error = ""
    if state.is_main_process:
        try:
            run = RunDir.create(cfg.output_dir, recipe, to_toml(cfg), resume=bool(resume))
        except TuneError as err:
            if state.num_processes == 1:
                raise
            error = str(err)
    if state.num_processes > 1:
        # The main process's folder name (a default one holds a timestamp) and its error, if any.
        shared = broadcast_object_list([cfg.output_dir, error])
        cfg = dataclasses.replace(cfg, output_dir=shared[0])
        if shared[1]:
            raise TuneError(shared[1])
        if run is None:
            run = ReplicaRunDir(Path(cfg.output_dir))
            logging.getLogger().setLevel(logging.WARNING)  # progress is logged once, by the main process
    assert run is not None
    set_seed(cfg.seed)
    log.info("run directory: %s", run.path)
    return run, cfg


def build_accelerator(
    mixed_precision: str = "no", grad_accum: int = 1, log_with: str | None = None, batch_size: int = 1
):
    """An `accelerate.Accelerator`; bf16/fp16 only where a GPU can use them (CPU trains in fp32).

    Under `torchrun` / `accelerate launch` it joins the process group (DDP, or FSDP / DeepSpeed from an
    accelerate config). `max_steps` counts optimizer steps of the whole job and `batch_size` is each
    process's: the lr schedule steps once per optimizer step whatever the process count (accelerate's
    `split_batches`, whose only other effect, on loaders passed through `prepare`, does not apply: tune's
    loader shards itself).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if mixed_precision != "no" and not torch.cuda.is_available():
        log.warning("mixed_precision=%s needs a GPU; training in fp32 on CPU", mixed_precision)
        mixed_precision = "no"
    accelerator = Accelerator(
        cpu=_distributed_cpu(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with or None,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None and deepspeed.is_auto("train_micro_batch_size_per_gpu"):
        # accelerate reads it from a loader passed through prepare(); tune's loader never is.
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    return accelerator


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
    is checked first.
    """
    path = run.checkpoint_dir(step)
    if accelerator.is_main_process:
        check_disk_space(
            run.checkpoints_dir, checkpoint_bytes(accelerator, run), f"the step {step} checkpoint"
        )
        if path.exists():  # an incomplete leftover of a crash at this very step
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
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
    step = int(path.name.removeprefix("step_"))
    log.info("resumed from %s (step %d)", path, step)
    return step


class NonFiniteGuard:
    """Skip optimizer steps whose loss is NaN or infinite, and stop the run after `limit` in a row.

    Per micro-batch, after `accelerator.backward(loss)`: `if guard.check(loss): optimizer.step()` (with
    gradient clipping inside the `if`, so a scaler never unscales gradients it will not step). The
    gradients of a skipped step are dropped by the usual `zero_grad`; the lr schedule still steps, so it
    stays a function of the step number. Once per optimizer step: `if guard.finish(run, step, loss):`
    log the step; a skipped step is logged here instead (metrics row with `skipped`), and the `limit`-th
    skipped step in a row raises TrainingError: the run stops, its checkpoints untouched. All processes
    agree on skipping (the flag is reduced across them).
    """

    def __init__(self, limit: int, accelerator: Any) -> None:
        if limit < 1:
            raise ConfigError(f"max_nonfinite_steps must be >= 1; got {limit}")
        self.limit = limit
        self.accelerator = accelerator
        self.in_a_row = 0
        self._bad = False

    def check(self, loss: Any) -> bool:
        """Whether this optimizer step may update the weights: every loss of it so far was finite."""
        import torch

        self._bad = self._bad or not bool(torch.isfinite(loss.detach()).all())
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            flag = torch.tensor([float(self._bad)], device=self.accelerator.device)
            self._bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return not self._bad

    def finish(self, run: RunDir, step: int, loss: float) -> bool:
        """End optimizer step `step`: True when it was applied; else log the skip (and stop after the limit)."""
        skipped = self._bad or not math.isfinite(loss)
        self._bad = False
        if not skipped:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        log.warning(
            "step %d: loss is %s; skipped the update (%d non-finite in a row, the run stops at %d)",
            step,
            loss,
            self.in_a_row,
            self.limit,
        )
        if self.accelerator.is_main_process:
            run.log_metrics(step, skipped=f"non-finite loss ({loss})", nonfinite_in_a_row=self.in_a_row)
        if self.in_a_row >= self.limit:
            kept = read_run(run.path).checkpoint_steps
            last = (
                f"the last good checkpoint is {run.checkpoint_dir(kept[-1])}" if kept else "no checkpoint yet"
            )
            raise TrainingError(
                f"loss was not finite for {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}); "
                f"stopped ({last}). Lower optim.lr, turn off mixed precision, or check the data; "
                "max_nonfinite_steps sets the limit"
            )
        return False


def module_bytes(*objects: Any) -> int:
    """Bytes of the parameters and buffers of the torch modules among `objects` (an export's size)."""
    import torch

    total = 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total
