"""Training speed and memory: torch.compile, channels-last, gradient checkpointing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def enable_gradient_checkpointing(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> None:
    """Recompute activations in the backward pass of the U-Net (and of a trained text encoder)."""
    unet.enable_gradient_checkpointing()  # type: ignore[operator]
    if text_encoder is not None:
        # transformers 5 renamed it (the old name warns); 4.x only has the old one.
        enable = getattr(text_encoder, "activation_checkpointing_enable", None)
        (enable or text_encoder.gradient_checkpointing_enable)()  # type: ignore[operator]


def compiled(model: torch.nn.Module, compile: bool, mode: str = "default") -> torch.nn.Module:
    """`model`, or with `compile` torch.compile(model, mode=mode): the same weights, a compiled forward for
    training (sampling and saving keep using the plain module).

    The compiled forward skips dynamo's guards on module attributes (torch.compiler's
    `skip_guard_on_all_nn_modules_unsafe`): checking them costs about 3 ms a call on CPU, a tenth of a
    tiny model's step. That is safe here because only the training step calls it, always with the
    modules in the state they were compiled in: sampling, evaluation and saving use the plain module and
    put back whatever they change (train mode, LoRA scale, EMA weights). The inputs stay guarded, so a
    new shape (another bucket) still recompiles. Without those guards a graph traced for another model
    earlier in the process (a second run in one Python session) would match this one, so compiling first
    clears dynamo's caches.
    """
    import torch

    if not compile:
        return model
    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip_module_guards is None:  # an older torch
        return torch.compile(model, mode=mode)  # type: ignore[return-value]
    torch.compiler.reset()  # no graph of an earlier model in this process may match this one's
    from torch._inductor import list_mode_options

    options = {**list_mode_options(mode), "guard_filter_fn": skip_module_guards}
    return torch.compile(model, options=options)  # type: ignore[return-value]


def set_channels_last(unet: torch.nn.Module, channels_last: bool) -> None:
    """Channels-last memory order for the U-Net's 4-D weights; convolutions then keep activations in it."""
    import torch

    if channels_last:
        unet.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
