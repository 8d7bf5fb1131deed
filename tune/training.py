"""The plumbing every training recipe shares: run start, seeding, accelerate, checkpoints and resume.

A recipe calls, in order:

    run, cfg = start_run("lora", cfg)                       # run dir, resolved config, seed
    accelerator = build_accelerator(cfg.mixed_precision, cfg.grad_accum)
    ... build models, optimizer, lr schedule, loader; accelerator.prepare(...) ...
    accelerator.register_for_checkpointing(loader)           # anything with state_dict/load_state_dict
    step = resume_from_checkpoint(accelerator, run, cfg.resume)   # 0 when starting fresh
    ... loop: save_checkpoint(accelerator, run, step) every N steps ...

Checkpoints are accelerate's `save_state` folders (models, optimizers, schedules, RNG states, and
the data loader's position through `register_for_checkpointing`), each valid only once its
COMPLETE marker exists.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from tune.config import to_toml
from tune.errors import ConfigError, TuneError
from tune.runs import RunDir, default_output_dir, read_run

log = logging.getLogger(__name__)


def start_run(recipe: str, cfg: Any) -> tuple[RunDir, Any]:
    """Create (or reopen, with `resume`) the run directory; save the resolved config; seed everything.

    Returns the run and the config with `output_dir` resolved (the saved config.toml names the
    folder, so running it again reproduces this run).
    """
    from accelerate.utils import set_seed

    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=str(default_output_dir(recipe)))
    resume = getattr(cfg, "resume", "")
    if resume not in ("", "latest") and not Path(resume).is_dir():
        raise ConfigError(f"resume must be '', 'latest' or a checkpoint folder; got {resume!r}")
    run = RunDir.create(cfg.output_dir, recipe, to_toml(cfg), resume=bool(resume))
    set_seed(cfg.seed)
    log.info("run directory: %s", run.path)
    return run, cfg


def build_accelerator(mixed_precision: str = "no", grad_accum: int = 1, log_with: str | None = None):
    """An `accelerate.Accelerator`; bf16/fp16 only where a GPU can use them (CPU trains in fp32)."""
    import torch
    from accelerate import Accelerator

    if mixed_precision != "no" and not torch.cuda.is_available():
        log.warning("mixed_precision=%s needs a GPU; training in fp32 on CPU", mixed_precision)
        mixed_precision = "no"
    return Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, log_with=log_with or None
    )


def save_checkpoint(accelerator, run: RunDir, step: int, keep: int = 0) -> Path:
    """Save models, optimizers, schedules, RNG and registered objects; mark complete; prune old ones."""
    path = run.checkpoint_dir(step)
    if path.exists():  # an incomplete leftover of a crash at this very step
        shutil.rmtree(path)
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        run.mark_checkpoint_complete(step)
        if keep > 0:
            for old in read_run(run.path).checkpoint_steps[:-keep]:
                shutil.rmtree(run.checkpoint_dir(old), ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("checkpoint saved: %s", path)
    return path


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
    accelerator.load_state(str(path))
    step = int(path.name.removeprefix("step_"))
    log.info("resumed from %s (step %d)", path, step)
    return step
