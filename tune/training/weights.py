"""Which weights the model holds outside the training step: schedule-free optimizers train at one point
and are evaluated at another (their average), so sampling, scoring, checkpoints and the export switch to
the evaluation weights first. Every other optimizer makes these no-ops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tune.optim import eval_weights, set_eval_weights


def _optimizers(accelerator: Any) -> list[Any]:
    return list(getattr(accelerator, "_optimizers", []))


@contextmanager
def evaluation_weights(accelerator: Any) -> Iterator[None]:
    """The prepared optimizers' evaluation weights inside, the training weights after. Every process
    switches (the switch is arithmetic on the weights), so call it on all of them."""
    with eval_weights(_optimizers(accelerator)):
        yield


def use_training_weights(accelerator: Any) -> None:
    """Back to the training weights (after a resume: checkpoints hold the evaluation weights)."""
    set_eval_weights(_optimizers(accelerator), False)


def use_final_weights(accelerator: Any) -> None:
    """The evaluation weights for good: after the loop, before the export."""
    set_eval_weights(_optimizers(accelerator), True)
