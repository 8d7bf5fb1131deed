"""Writing LoHa and LoKr modules as kohya/LyCORIS keys, and DoRA as a plain LoRA (SVD) for kohya files.

    LoHa   <stem>.hada_w1_a [out, r], .hada_w1_b [r, in*k*k], .hada_w2_a, .hada_w2_b, .alpha = r
    LoKr   <stem>.lokr_w1 [a, c] or .lokr_w1_a/.lokr_w1_b, .lokr_w2 [b, d(, k, k)] or .lokr_w2_a [b, r] /
           .lokr_w2_b [r, d*k*k], .alpha = r (the rows of the decomposed factor)

Plain layouts only (no Tucker tensors, which ComfyUI cannot apply). The module's scale alpha / r is
folded into w1 (hada_w1_a, lokr_w1 or lokr_w1_a) and alpha = r is written, so every loader computes the
trained delta with scale 1: ComfyUI and A1111 (alpha / r), LyCORIS's reload, and also the LoKr case
with both factors full, where loaders ignore alpha (reference lycoris-formats.md §4.3), and LyCORIS's
merge, which applies the scale twice (§0 trap 1; harmless at scale 1). alpha = r is an integer, exact
in every file dtype. Metadata as LyCORIS's kohya wrapper writes it: ss_network_module "lycoris.kohya",
ss_network_args {"algo": ..., "conv_dim", "conv_alpha", LoKr's "factor" / "decompose_both"}.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tune.errors import ModelError
from tune.lora.core import ADAPTER_CONFIG_KEY, Lora, LoraModule
from tune.lora.lycoris import Factor, LohaModule, LokrModule

logger = logging.getLogger(__name__)

Checked = Callable[[torch.Tensor, torch.dtype, str], torch.Tensor]


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    return tensor.to(torch.float32) * scale if scale != 1.0 else tensor


def _factor_tensors(name: str, factor: Factor, scale: float) -> dict[str, torch.Tensor]:
    if isinstance(factor, tuple):
        return {f"{name}_a": _scaled(factor[0], scale), f"{name}_b": factor[1]}
    return {name: _scaled(factor, scale)}


def lycoris_tensors(
    stem: str, module: LohaModule | LokrModule, dtype: torch.dtype, checked: Checked
) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS keys of one LoHa or LoKr module, its scale folded into w1 (module docstring)."""
    if isinstance(module, LohaModule):
        rank = module.rank
        parts = {
            "hada_w1_a": _scaled(module.w1a, module.alpha / rank),
            "hada_w1_b": module.w1b.flatten(1),
            "hada_w2_a": module.w2a,
            "hada_w2_b": module.w2b.flatten(1),
        }
    else:
        parts = _factor_tensors("lokr_w1", module.w1, module.alpha / module.rank)
        parts.update(_factor_tensors("lokr_w2", module.w2, 1.0))
        decomposed = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        rank = int(decomposed.shape[0]) if decomposed is not None else module.rank
    tensors = {f"{stem}.{key}": checked(value, dtype, f"{stem}.{key}") for key, value in parts.items()}
    tensors[f"{stem}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return tensors


def _adapter_config(lora: Lora) -> dict[str, Any]:
    """The PEFT config a run's adapter file carries (`tune_adapter_config`), {} when none."""
    try:
        config = json.loads(lora.metadata.get(ADAPTER_CONFIG_KEY, "{}"))
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def lycoris_metadata(lora: Lora) -> dict[str, str]:
    """ss_network_* for a LoHa/LoKr file (the modules' own alphas are folded in, so alpha = dim)."""
    config = _adapter_config(lora)
    kinds = lora.kinds - {"lora"}
    if len(kinds) != 1:
        raise ModelError(f"one adapter type per kohya file; {lora.source or 'this file'} has {sorted(kinds)}")
    (algo,) = kinds
    ranks: dict[bool, list[int]] = {False: [], True: []}
    decompose_both = False
    for module in lora.modules.values():
        # A LoHa conv's hada_w*_b is [r, in*k*k]: its tensors do not tell a 3x3 conv from a Linear, and
        # conv_dim only matters to LyCORIS re-creating a network, so LoHa ranks all count as linear.
        if isinstance(module, LohaModule):
            ranks[False].append(module.rank)
        elif isinstance(module, LokrModule):
            ranks[isinstance(module.w2, torch.Tensor) and module.w2.ndim == 4].append(module.rank)
            decompose_both |= isinstance(module.w1, tuple)
    linear = ranks[False] or ranks[True] or [1]
    dim = str(max(set(linear), key=linear.count))
    args: dict[str, object] = {"algo": algo}
    if ranks[True]:
        conv = str(max(set(ranks[True]), key=ranks[True].count))
        args.update(conv_dim=conv, conv_alpha=conv)
    if algo == "lokr":
        args["factor"] = str(config.get("decompose_factor", -1))
        if decompose_both:  # LyCORIS reads the raw string: "False" would enable it, so only True is written
            args["decompose_both"] = "True"
    args["dropout"] = None
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_network_args": json.dumps(args),
    }


def dora_as_lora(
    lora: Lora, weights: Mapping[str, torch.Tensor], rank: int | None = None
) -> tuple[Lora, dict[str, float], float]:
    """DoRA modules as plain LoRA pairs: the delta W' - W0 (it needs the base weights `weights`, by
    target) by truncated SVD at `rank` (default: each module's own). Returns (the LoRA, relative
    Frobenius error per module, overall relative error). kohya files carry DoRA this way because
    A1111 and ComfyUI disagree on `dora_scale` (reference §5, §9.6). Written by hand: a few lines of
    torch.linalg.svd."""
    modules: dict[str, LoraModule | LohaModule | LokrModule] = {}
    errors: dict[str, float] = {}
    lost = total = 0.0
    for target, module in lora.modules.items():
        if not isinstance(module, LoraModule) or module.magnitude is None:
            modules[target] = module
            continue
        if target not in weights:
            raise ModelError(f"no base weight for DoRA module {target}; is the base the run's model?")
        base = weights[target].detach().to("cpu", torch.float32)
        delta = module.delta(base.shape, base=base).flatten(1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = min(rank or module.rank, s.numel())
        up = u[:, :keep] * s[:keep]
        down = vh[:keep]
        residual = float(s[keep:].square().sum())
        energy = float(s.square().sum())
        errors[target] = (residual / energy) ** 0.5 if energy > 0 else 0.0
        lost, total = lost + residual, total + energy
        if base.ndim == 4:
            up, down = up[:, :, None, None], down.reshape(keep, *base.shape[1:])
        modules[target] = LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(keep))
    overall = (lost / total) ** 0.5 if total > 0 else 0.0
    converted = Lora(modules, lora.formats, dict(lora.metadata), lora.source, lora.family)
    if errors:
        worst = max(errors, key=errors.__getitem__)
        logger.info(
            "DoRA as a plain LoRA by SVD: relative error %.3g overall, %.3g at worst (%s)",
            overall,
            errors[worst],
            worst,
        )
    return converted, errors, overall
