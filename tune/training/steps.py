"""Step cadence and logging: when a periodic action is due, one step's metrics row, its noise generator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tune.runs import RunDir


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (sampling, checkpoint) runs after `step`: every N steps and at the end."""
    return every > 0 and (step % every == 0 or step == max_steps)


def log_step(run: RunDir, accelerator: Any, step: int, **values: float) -> None:
    """One metrics.jsonl row, and the trackers' when report_to is set. Every process calls it: with several,
    the logged loss is their mean (the loss of the whole batch), not the main process's share."""
    import torch

    if accelerator.num_processes > 1 and "loss" in values:
        loss = torch.tensor([values["loss"]], device=accelerator.device)
        values = {**values, "loss": float(accelerator.reduce(loss, reduction="mean"))}
    if accelerator.is_main_process:
        run.log_metrics(step, **values)
    if accelerator.trackers:
        accelerator.log(values, step=step)


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of one micro-step's noise and timesteps: a function of (seed, micro-step) only, so a
    resumed run draws exactly what an uninterrupted one would."""
    import torch

    return torch.Generator().manual_seed(seed * 2**32 + micro_step)
