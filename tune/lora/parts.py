"""The tensors of one module in a file -> one adapter module (LoRA, DoRA, LoHa, LoKr).

Key suffixes read (kohya/LyCORIS and PEFT spell the LoHa/LoKr ones alike, PEFT without `.weight`):

    LoRA   .lora_down.weight/.lora_up.weight, .lora_A.weight/.lora_B.weight and older diffusers forms
    DoRA   the LoRA pair + .dora_scale (kohya/LyCORIS) or .lora_magnitude_vector (PEFT)
    LoHa   .hada_w1_a .hada_w1_b .hada_w2_a .hada_w2_b
    LoKr   .lokr_w1 or .lokr_w1_a/.lokr_w1_b, and .lokr_w2 or .lokr_w2_a/.lokr_w2_b
    all    .alpha (0-dim; absent in PEFT files, whose alpha comes from their config)

Tucker tensors (.hada_t1/.hada_t2/.lokr_t2/.lora_mid.weight) are refused: see `tune.lora.lycoris`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tune.lora.core import AdapterModule, LoraModule
from tune.lora.lycoris import LohaModule, LokrModule, magnitude_layout

# (key suffix, role). Checked in order; the first match wins. The attention-processor form
# `...processor.to_q_lora.down.weight` is the `_lora.` entries.
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".dora_scale", "dora_scale"),
    *((f".{name}", name) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    *(
        (f".{name}", name)
        for name in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2")
    ),
    *((f".{name}", name) for name in ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2", "lora_mid.weight")),
    (".alpha", "alpha"),
)
_TUCKER = ("hada_t1", "hada_t2", "lokr_t1", "lokr_t2", "lora_mid.weight")


def split_role(key: str) -> tuple[str, str] | None:
    """`<stem><suffix>` -> (stem, role), or None for a key no adapter uses."""
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _factor(slot: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if name in slot:
        return slot[name]
    return slot[f"{name}_a"], slot[f"{name}_b"]


def _has_factor(slot: Mapping[str, torch.Tensor], name: str) -> bool:
    return name in slot or (f"{name}_a" in slot and f"{name}_b" in slot)


def build_module(
    slot: Mapping[str, torch.Tensor],
    alpha: float | None,
    config_rank: int | None,
    shape: tuple[int, ...],
) -> AdapterModule | str:
    """The module these tensors (role -> tensor) make for a weight of `shape`, or why they make none.

    `alpha` is the file's (or its config's) alpha, None when neither has one (then scale 1, as kohya
    reads it); `config_rank` the r of a PEFT config (LoKr with both factors full has no r in its shapes).
    `shape` only needs the right number of dims and kernel: the widths come from the tensors."""
    tucker = [role for role in _TUCKER if role in slot]
    if tucker:
        return f"has Tucker tensors ({', '.join(tucker)}), which we do not read; export it without them"
    if "hada_w1_a" in slot:
        missing = [r for r in ("hada_w1_b", "hada_w2_a", "hada_w2_b") if r not in slot]
        if missing:
            return f"is a LoHa module without {', '.join(missing)}"
        rank = int(slot["hada_w1_b"].shape[0])
        return LohaModule(
            slot["hada_w1_a"], slot["hada_w1_b"], slot["hada_w2_a"], slot["hada_w2_b"], alpha or float(rank)
        )
    if any(role.startswith("lokr_") for role in slot):
        if not (_has_factor(slot, "lokr_w1") and _has_factor(slot, "lokr_w2")):
            return "is a LoKr module without both factors (lokr_w1 or lokr_w1_a/b, lokr_w2 or lokr_w2_a/b)"
        decomposed = slot.get("lokr_w2_b", slot.get("lokr_w1_b"))
        if decomposed is not None:
            rank = int(decomposed.shape[0])
        else:  # both factors full: ComfyUI and A1111 ignore alpha; PEFT still scales by its alpha / r
            rank = config_rank or 1
            alpha = alpha if config_rank else None
        return LokrModule(_factor(slot, "lokr_w1"), _factor(slot, "lokr_w2"), alpha or float(rank), rank)
    if "down" not in slot or "up" not in slot:
        return f"has no {'up' if 'down' in slot else 'down'} weight"
    rank = int(slot["down"].shape[0])
    stored = slot.get("magnitude", slot.get("dora_scale"))
    magnitude = None
    if stored is not None:
        down, up = slot["down"], slot["up"]
        kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
        pair_shape = (int(up.shape[0]), int(down.shape[1]), *(kernel if len(shape) == 4 else ()))
        try:
            magnitude = magnitude_layout(stored, pair_shape, peft="magnitude" in slot)
        except ValueError as err:
            return str(err)
    return LoraModule(down=slot["down"], up=slot["up"], alpha=alpha or float(rank), magnitude=magnitude)


def check_module_shape(module: AdapterModule, shape: tuple[int, ...]) -> str | None:
    """Why a LoHa or LoKr module cannot change a weight of `shape`, else None (LoRA: keys._check_shape)."""
    size = 1
    for dim in shape[1:]:
        size *= dim
    if isinstance(module, LohaModule):
        got = (module.w1a.shape[0], module.w1b.shape[1], module.w2a.shape[0], module.w2b.shape[1])
        if got != (shape[0], size, shape[0], size) or module.w1a.shape[1] != module.rank:
            return f"LoHa factors {[tuple(t.shape) for t in module.tensors]} do not make a weight {shape}"
        return None
    if isinstance(module, LokrModule):
        w1 = [t.shape for t in (module.w1 if isinstance(module.w1, tuple) else (module.w1,))]
        w2 = [t.shape for t in (module.w2 if isinstance(module.w2, tuple) else (module.w2,))]
        rows = w1[0][0] * w2[0][0]
        cols = w1[-1][-1] * (w2[-1][1:].numel())
        if (rows, cols) != (shape[0], size):
            return f"LoKr factors {[tuple(s) for s in w1 + w2]} do not make a weight {shape}"
    return None
