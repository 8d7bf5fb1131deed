"""Optimizers and learning-rate schedules for every recipe: one small table, not an if-chain.

8-bit optimizers come from bitsandbytes (they run on CPU too). bitsandbytes keeps tensors smaller
than `min_8bit_size` (4096 elements) in 32-bit state, so tiny models save less than large ones.
Prodigy (prodigyopt) estimates the step size itself: its `optim.prodigy.lr` is a multiplier, 1 unless the
user says otherwise, and the recipe's `optim.lr` (an Adam learning rate) does not apply to it. The
schedule-free AdamW (schedulefree) trains at one point and is evaluated at another (an average it keeps):
`eval_weights` switches to the averaged weights for sampling, checkpoints and export, and back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from tune.errors import ConfigError

log = logging.getLogger(__name__)

OptimName = Literal["adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "prodigy", "adamw_schedulefree"]


@dataclass(frozen=True)
class ProdigyOptions:
    """Prodigy's own settings (the `[optim.prodigy]` table; used with optim.name = "prodigy")."""

    lr: float = 1.0
    """Multiplier on Prodigy's estimated step size d; leave at 1 (optim.lr does not apply to Prodigy)."""
    d_coef: float = 1.0
    """Scales the estimate d: below 1 for smaller steps (e.g. 0.5 when a run overfits), above 1 for larger."""
    d0: float = 1e-6
    """Initial estimate of d (tiny: Prodigy grows it within the first steps)."""
    growth_rate: float = float("inf")
    """Most d may grow per step (a factor, e.g. 1.02); inf means unbounded."""
    use_bias_correction: bool = False
    """Adam's bias correction of the step size (smaller first steps; kohya users often turn it on)."""
    safeguard_warmup: bool = False
    """Keep the learning-rate warmup out of the estimate of d (advised with optim.warmup_steps > 0)."""
    beta3: float = 0.0
    """Decay of Prodigy's running sums; 0 means sqrt(beta2), the package's default."""

    def __post_init__(self) -> None:
        if (
            self.lr <= 0
            or self.d_coef <= 0
            or self.d0 <= 0
            or self.growth_rate < 1
            or not 0 <= self.beta3 < 1
        ):
            raise ConfigError(
                "optim.prodigy needs lr > 0, d_coef > 0, d0 > 0, growth_rate >= 1, 0 <= beta3 < 1; got "
                f"{self.lr}, {self.d_coef}, {self.d0}, {self.growth_rate}, {self.beta3}"
            )


@dataclass(frozen=True)
class ScheduleFreeOptions:
    """The schedule-free AdamW's own settings (the `[optim.schedulefree]` table)."""

    r: float = 0.0
    """Polynomial weighting of the average (0: a plain average of the iterates since warmup)."""
    weight_lr_power: float = 2.0
    """Weights of warmup iterates in the average: lr to this power (0 weighs them all the same)."""

    def __post_init__(self) -> None:
        if self.r < 0 or self.weight_lr_power < 0:
            raise ConfigError(
                f"optim.schedulefree.r and weight_lr_power must be >= 0; got {self.r}, {self.weight_lr_power}"
            )


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule settings (the `[optim]` table of a recipe config)."""

    name: OptimName = "adamw"
    """adamw (torch), adamw8bit, lion8bit or paged_adamw8bit (bitsandbytes 8-bit state), prodigy (sets its
    own step size: no lr to choose) or adamw_schedulefree (no decay schedule; its warmup is its own)."""
    lr: float = 1e-4
    """Peak learning rate (of every optimizer but prodigy, whose multiplier is optim.prodigy.lr)."""
    weight_decay: float = 1e-2
    """Decoupled weight decay."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """Adam/Lion betas (two values)."""
    eps: float = 1e-8
    """Adam epsilon (ignored by Lion)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to lr."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    prodigy: ProdigyOptions = ProdigyOptions()
    """Prodigy's settings (optim.name = "prodigy")."""
    schedulefree: ScheduleFreeOptions = ScheduleFreeOptions()
    """Schedule-free AdamW's settings (optim.name = "adamw_schedulefree")."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0; got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must hold two values; got {list(self.betas)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm must be >= 0; got {self.max_grad_norm}")
        if self.name == "adamw_schedulefree" and self.schedule != "constant":
            raise ConfigError(
                f"optim.schedule must be constant with adamw_schedulefree (it needs no decay); got {self.schedule!r}"
            )


def _bnb(name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
        import bitsandbytes as bnb  # imported on use: it is slow to import and logs on CPU

        cls = getattr(bnb.optim, name)
        kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
        if "Lion" not in name:
            kwargs["eps"] = cfg.eps
        return cls(params, **kwargs)

    return make


def _adamw(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    # The fused kernel updates every tensor in one pass: on CPU a LoRA's 128 small tensors step in about
    # 0.7 ms instead of 4.6 ms (the default for-loop). It needs float tensors on CPU or CUDA.
    fused = bool(tensors) and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )


def _prodigy(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    opts = cfg.prodigy
    # Prodigy steps every parameter group by its one estimate d: prodigyopt refuses groups whose lr differs
    # from the largest unless it is 0 ("only supported for values of 0", at the first step). So a group's own
    # rate (pivotal tuning's token at 5e-3 beside adapters at 1e-3) cannot keep its ratio: every group that
    # trains gets the multiplier, a frozen (lr 0) one stays frozen.
    groups = list(params)
    rates = {g["lr"] for g in groups if isinstance(g, dict) and g.get("lr")}
    if len(rates | {cfg.lr}) > 1:
        log.warning(
            "prodigy estimates one step size for all parameters: the groups' own rates (%s beside optim.lr %g) "
            "do not apply; every group trains at prodigy.lr %g x d",
            ", ".join(f"{r:g}" for r in sorted(rates)),
            cfg.lr,
            opts.lr,
        )
    params = [
        {**g, "lr": opts.lr if g["lr"] else 0.0} if isinstance(g, dict) and "lr" in g else g for g in groups
    ]
    return Prodigy(
        params,
        lr=opts.lr,
        betas=tuple(cfg.betas),
        beta3=opts.beta3 or None,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        use_bias_correction=opts.use_bias_correction,
        safeguard_warmup=opts.safeguard_warmup,
        d0=opts.d0,
        d_coef=opts.d_coef,
        growth_rate=opts.growth_rate,
    )


def _adamw_schedulefree(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,  # its own warmup: build_lr_schedule adds none
        r=cfg.schedulefree.r,
        weight_lr_power=cfg.schedulefree.weight_lr_power,
    )


OPTIMIZERS: dict[str, Callable[[Iterable, OptimConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _bnb("AdamW8bit"),
    "lion8bit": _bnb("Lion8bit"),
    "paged_adamw8bit": _bnb("PagedAdamW8bit"),
    "prodigy": _prodigy,
    "adamw_schedulefree": _adamw_schedulefree,
}

# Our schedule names -> diffusers' (which add the warmup).
_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad] if not isinstance(params, list) else params
    optimizer = OPTIMIZERS[cfg.name](params, cfg)
    if has_eval_weights(optimizer):
        optimizer.train()  # schedule-free optimizers start in eval mode and refuse to step there
    return optimizer


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    warmup = 0 if cfg.name == "adamw_schedulefree" else cfg.warmup_steps  # it warms up by itself
    return get_scheduler(
        _SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=max_steps
    )


def has_eval_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` (plain or accelerate-wrapped) evaluates at other weights than it trains at
    (schedule-free optimizers: they keep a `train_mode` flag in each parameter group)."""
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0]


def set_eval_weights(optimizers: Iterable[torch.optim.Optimizer], on: bool) -> None:
    """Put the weights of schedule-free `optimizers` at their evaluation point (on) or training point (off);
    other optimizers are left alone. Switching is a no-op when already there."""
    for optimizer in optimizers:
        if has_eval_weights(optimizer):
            optimizer.eval() if on else optimizer.train()


@contextmanager
def eval_weights(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
    """The weights to sample, score or save inside; after, those of the optimizers that were training go
    back to training (nested blocks, or one after `set_eval_weights(..., True)`, switch nothing)."""
    switched = [o for o in optimizers if has_eval_weights(o) and o.param_groups[0]["train_mode"]]
    set_eval_weights(switched, True)
    try:
        yield
    finally:
        set_eval_weights(switched, False)


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Values worth a metrics column: Prodigy's step-size estimate `d` (its lr is lr x d)."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    return {"d": float(group["d"])} if "d" in group and "d_coef" in group else {}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (how we compare 8-bit and 32-bit optimizers)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
