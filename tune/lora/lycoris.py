"""LoHa and LoKr modules (the LyCORIS variants PEFT trains) and DoRA's weight decomposition: each with the
one `delta()` that merge, apply and export all use.

The math is PEFT's (peft/tuners/loha/layer.py, lokr/layer.py, lora/dora.py), which for these plain
layouts is also what LyCORIS, ComfyUI and A1111 compute (reference lycoris-formats.md §3.2, §4.4, §5.2):

    LoHa   delta W = (alpha / r) * (w1a @ w1b) * (w2a @ w2b)     r = w1b.shape[0]; convs: w*b is [r, in*k*k]
    LoKr   delta W = (alpha / r) * kron(w1, w2)                   w1 = lokr_w1 or w1a @ w1b, w2 likewise
    DoRA   W' = m * V / ||V||, V = W0 + delta W of the LoRA pair  norm per output row (m [out, 1, ...]) or,
           for old LyCORIS files, per input column (m [1, in, ...])

Tucker layouts (`hada_t1/t2`, `lokr_t2`) are not read: ComfyUI cannot apply them (reference §4.4) and we
never write them. Written by hand: no library computes these deltas outside its own layer classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Factor = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A LoKr factor: the full matrix, or (a, b) with the matrix a @ b."""


def _f32(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return tensor.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class LohaModule:
    """One LoHa (Hadamard product) module: hada_w1_a [out, r], hada_w1_b [r, in(*k*k)], the same for w2."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float

    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w1a, self.w1b, self.w2a, self.w2b)

    def delta(
        self,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(alpha / r) * (w1a @ w1b) * (w2a @ w2b) in float32, shaped like the target weight."""
        first = _f32(self.w1a, device) @ _f32(self.w1b, device)
        second = _f32(self.w2a, device) @ _f32(self.w2b, device)
        return (first * second).reshape(shape) * (self.alpha / self.rank)


def _full(factor: Factor, device: torch.device | None) -> torch.Tensor:
    if isinstance(factor, tuple):
        return _f32(factor[0], device) @ _f32(factor[1], device)
    return _f32(factor, device)


@dataclass(frozen=True)
class LokrModule:
    """One LoKr (Kronecker product) module: w1 [a, c] and w2 [b, d] (or [b, d, k, k], or [b, d*k*k]),
    each full or as (a, b) low-rank factors, with out = a*b and in = c*d."""

    w1: Factor
    w2: Factor
    alpha: float
    rank: int
    """The r of alpha / r. PEFT scales by its config's r even when both factors are full (no r in the
    shapes), so it is kept here; files from other tools with both factors full get alpha = rank (scale 1),
    as ComfyUI and A1111 apply them."""

    kind = "lokr"

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for f in (self.w1, self.w2) for t in (f if isinstance(f, tuple) else (f,)))

    def delta(
        self,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(alpha / rank) * kron(w1, w2) in float32, shaped like the target weight."""
        w1, w2 = _full(self.w1, device), _full(self.w2, device)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(shape) * (self.alpha / self.rank)


def decomposed_weight(low_rank: torch.Tensor, magnitude: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight m * V / ||V|| with V = base + low_rank, all float32.

    `magnitude` is shaped to broadcast against the weight: [out, 1, ...] normalizes each output row
    (PEFT; LyCORIS `wd_on_out=True`), [1, in, ...] each input column (LyCORIS before 2025)."""
    merged = base.to(torch.float32) + low_rank
    if magnitude.shape[0] == merged.shape[0] and magnitude.shape[1] == 1:
        dims = tuple(range(1, merged.ndim))
    else:
        dims = (0, *range(2, merged.ndim))
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
    return merged * (magnitude.to(merged) / norm)


def magnitude_layout(
    magnitude: torch.Tensor, shape: torch.Size | tuple[int, ...], *, peft: bool
) -> torch.Tensor:
    """A DoRA magnitude as stored -> [out, 1, ...] or [1, in, ...] for a weight of `shape`.

    PEFT's `lora_magnitude_vector` is per output row: [out], or [1, out, 1, 1] for convs. kohya's
    `dora_scale` tells the axis by its shape, as ComfyUI reads it: [out, 1(, 1, 1)] per output row,
    [1, in(, 1, 1)] per input column. Raises ValueError when it fits neither."""
    out, width, ones = shape[0], shape[1], (1,) * (len(shape) - 2)
    if peft and magnitude.numel() == out:
        return magnitude.reshape(out, 1, *ones)
    if not peft and magnitude.shape[0] == out and magnitude.numel() == out:
        return magnitude.reshape(out, 1, *ones)
    if not peft and magnitude.shape[0] == 1 and magnitude.numel() == width:
        return magnitude.reshape(1, width, *ones)
    raise ValueError(f"DoRA magnitude {tuple(magnitude.shape)} fits no axis of a weight {tuple(shape)}")
