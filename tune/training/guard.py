"""NonFiniteGuard: skip optimizer steps whose loss is NaN or infinite; stop after too many in a row."""

from __future__ import annotations

import logging
import math
from typing import Any

from tune.errors import ConfigError, TrainingError
from tune.runs import RunDir, read_run

log = logging.getLogger(__name__)


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
