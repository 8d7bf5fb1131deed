"""The accelerate `Accelerator` a recipe trains with (processes, mixed precision, gradient accumulation),
the mixed-precision choice and the dtype frozen weights are kept in."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _distributed_cpu() -> bool:
    """Whether this is one of several processes on a machine without an accelerator: accelerate then
    needs cpu=True to join them with gloo (else each process would train alone)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def build_accelerator(
    mixed_precision: str = "no", grad_accum: int = 1, log_with: str | None = None, batch_size: int = 1
):
    """An `accelerate.Accelerator`; bf16/fp16 only where a GPU can use them (CPU trains in fp32), "auto"
    as `resolve_mixed_precision` picks.

    Under `torchrun` / `accelerate launch` it joins the process group (DDP, or FSDP / DeepSpeed from an
    accelerate config). `max_steps` counts optimizer steps of the whole job and `batch_size` is each
    process's: the lr schedule steps once per optimizer step whatever the process count (accelerate's
    `split_batches`, whose only other effect, on loaders passed through `prepare`, does not apply: tune's
    loader shards itself).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    mixed_precision = resolve_mixed_precision(mixed_precision)
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


def resolve_mixed_precision(name: str) -> str:
    """ "auto" -> bf16 on GPUs that have it, fp16 on other GPUs, "no" on CPUs; other names unchanged."""
    import torch

    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def weight_dtype(accelerator: Any) -> torch.dtype:
    """The dtype frozen weights are kept in: the mixed-precision type (trained weights stay fp32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        str(accelerator.mixed_precision), torch.float32
    )
