"""LoRA by truncated SVD: from a full fine-tune (`extract_lora`, `tune lora extract`) and from a LoRA of a
higher rank (`resize_lora`, `tune lora resize`).

Each module's weight difference delta [out, in(*kh*kw)] is factored as U S Vh; the best rank-r
approximation (Eckart-Young) keeps the r largest singular values: up = U_r sqrt(S_r), down =
sqrt(S_r) Vh_r, alpha = r (scale 1). The square root goes to both sides so neither factor is far
larger than the other in an fp16 file. The relative error ||delta - up @ down|| / ||delta|| (Frobenius)
is measured on the factors as stored (after the file dtype's rounding), not taken from the dropped
singular values.

Which modules (as kohya's extract_lora_from_models and LoRA network take them): the U-Net's transformer
modules (attn1, attn2, ff, proj_in/out: every Linear and Conv2d under `attentions.N`) at `rank`; with
`conv_rank` > 0 also the resnets and down/upsamplers: their 3x3 convs at `conv_rank`, their Linear and
1x1 convs at `rank`; with `text_encoder`, every encoder's attention and MLP projections at `rank`.
Modules the fine-tune did not change are left out.

Resizing keeps, per module, a fixed rank or (`energy` F) the smallest rank whose singular values keep
F of the squared sum, sum_{i<=k} s_i^2 >= F * sum_i s_i^2 (kohya's resize_lora "sv_fro" asks for a share
f of the Frobenius norm instead: the same rank as F = f**2), never more than the module's rank.

The SVDs run on `device` (a GPU makes an SDXL extraction minutes shorter); the factors come back on the CPU.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tune.errors import ConfigError, ModelError
from tune.lora.core import AdapterModule, Lora, LoraModule
from tune.lora.export import _check_target, _file_dtype
from tune.lora.inspect import module_group
from tune.lora.lycoris import LohaModule
from tune.lora.read import lora_targets
from tune.lora.run_files import run_metadata
from tune.lora.skeleton import module_skeleton, read_lora
from tune.lora.write import save_lora
from tune.models.families import Family

_TRANSFORMER = re.compile(r"(?:^|\.)attentions\.\d+\.")
_CONV_BLOCKS = re.compile(r"(?:^|\.)(?:resnets|downsamplers|upsamplers)\.\d+\.")
_TEXT_PROJECTIONS = re.compile(r".*\.(?:q_proj|k_proj|v_proj|out_proj|fc1|fc2)")


@dataclass(frozen=True)
class SvdError:
    """How far one module's low-rank pair is from the delta it stands for (Frobenius norms)."""

    norm: float
    """||delta||."""
    residual: float
    """||delta - (alpha / r) * up @ down||."""

    @property
    def relative(self) -> float:
        return self.residual / self.norm if self.norm else 0.0


def factor(
    delta: torch.Tensor,
    rank: int,
    *,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[LoraModule, SvdError]:
    """The best low-rank pair for one weight difference (Linear [out, in] or Conv2d [out, in, kh, kw]) at
    `rank`, or with `energy` at the smallest rank (at most `rank`) keeping that share of the squared
    singular values; factors in `dtype`, alpha = rank."""
    matrix = delta.detach().to(device, torch.float32).flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if energy is not None and energy < 1:  # energy 1 keeps `rank`: no rounding of the sum drops a value
        kept = torch.cumsum(s.double().square(), 0)
        rank = min(rank, int(torch.searchsorted(kept, energy * kept[-1])) + 1)
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(dtype)
    down = (root[:, None] * vh[:rank]).to(dtype)
    residual = float((matrix - up.float() @ down.float()).norm())
    if delta.ndim == 4:  # kohya's conv layout: down [r, in, kh, kw], up [out, r, 1, 1]
        down = down.reshape(rank, *delta.shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    pair = LoraModule(down=down.cpu().contiguous(), up=up.cpu().contiguous(), alpha=float(rank))
    return pair, SvdError(norm=float(matrix.norm()), residual=residual)


def _module_rank(component: str, path: str, layer: nn.Module, rank: int, conv_rank: int) -> int:
    """The rank a module is extracted at; 0 = not extracted."""
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        return 0
    if component != "unet":
        return rank if _TEXT_PROJECTIONS.fullmatch(path) else 0
    if _TRANSFORMER.search(path):
        return rank
    if conv_rank and _CONV_BLOCKS.search(path):
        is_3x3 = isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)
        return conv_rank if is_3x3 else rank
    return 0


def _check_ranks(rank: int, conv_rank: int) -> None:
    if rank < 1 or conv_rank < 0:
        raise ConfigError(f"--rank must be >= 1 and --conv-rank >= 0; got {rank} and {conv_rank}")


def extract_lora(
    tuned_pipe: Any,
    base_pipe: Any,
    rank: int,
    conv_rank: int = 0,
    text_encoder: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Lora, dict[str, SvdError]]:
    """A LoRA of `tuned_pipe - base_pipe` (SD1, SD2 or SDXL pipelines of one family; modules matched by
    name), and each module's error (see the module docstring). The Lora's factors are in `dtype`."""
    from tune.models.families import check_same_family, family_of_pipeline

    _check_ranks(rank, conv_rank)
    family = family_of_pipeline(base_pipe)
    check_same_family("the fine-tuned model", family_of_pipeline(tuned_pipe), family)
    tuned, base = lora_targets(tuned_pipe), lora_targets(base_pipe)
    components = [c for c in base if c == "unet" or text_encoder]
    modules: dict[str, LoraModule] = {}
    errors: dict[str, SvdError] = {}
    for component in components:
        tuned_layers = dict(tuned[component].named_modules())
        for path, layer in base[component].named_modules():
            module_rank = _module_rank(component, path, layer, rank, conv_rank)
            if not module_rank:
                continue
            other = tuned_layers.get(path)
            if (
                other is None
                or getattr(other, "weight", None) is None
                or other.weight.shape != layer.weight.shape
            ):
                raise ModelError(
                    f"the fine-tuned model's {component}.{path} does not match the base's "
                    "(another architecture?); extract from a fine-tune of this base"
                )
            weights = (m.weight.detach().to(device, torch.float32) for m in (other, layer))
            delta = next(weights) - next(weights)
            if not delta.any():  # not trained (a frozen text encoder, say): nothing to carry
                continue
            target = f"{component}.{path}"
            modules[target], errors[target] = factor(delta, module_rank, dtype=dtype, device=device)
    if not modules:
        raise ModelError("the fine-tuned model's weights equal the base's in every extracted module")
    return Lora(modules=modules, formats=frozenset({"kohya"}), family=family, source="extracted"), errors


def _factor_shape(factor: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[int, ...]:
    """The shape of a LoKr factor: a whole tensor's, or a low-rank pair's product."""
    if isinstance(factor, tuple):
        return (factor[0].shape[0], *factor[1].shape[1:])
    return tuple(factor.shape)


def _weight_shape(pair: AdapterModule, target: str, family: Family | None) -> tuple[int, ...]:
    """The shape of the weight a module changes. A LoRA pair says it (4-D for a 3x3 conv's pair); LoHa and
    LoKr store a conv's columns flat (in * k * k), so the kernel comes from the family's module skeleton."""
    if isinstance(pair, LoraModule):
        if pair.magnitude is not None:
            raise ConfigError(
                f"{target} is DoRA, whose delta needs the base weights; make a plain LoRA of it first with "
                "`tune lora convert FILE --to kohya --base MODEL`, then resize that"
            )
        if pair.down.ndim == 4 or pair.up.ndim == 4:
            return (pair.up.shape[0], *pair.down.shape[1:], *([1, 1] if pair.down.ndim == 2 else []))
        return (pair.up.shape[0], pair.down.shape[1])
    if isinstance(pair, LohaModule):
        rows, columns = pair.w1a.shape[0], pair.w1b.shape[1]
    else:  # LoKr: kron(w1 [a, c], w2 [b, d] or [b, d, k, k]), each factor whole or as a low-rank pair
        (a, c), w2 = (_factor_shape(f) for f in (pair.w1, pair.w2))
        if len(w2) == 4:  # a whole conv w2: the kernel is in the file
            return (a * w2[0], c * w2[1], *w2[2:])
        rows, columns = a * w2[0], c * w2[1]
    component, path = target.split(".", 1)
    module = module_skeleton(family or "sd1")[component].get_submodule(path)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (rows, columns // (kh * kw), kh, kw)
    return (rows, columns)


def resize_lora(
    lora: Lora,
    rank: int | None = None,
    *,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Lora, dict[str, SvdError]]:
    """Each module of `lora` at a lower rank: `rank` (modules already at or below it keep their
    delta exactly, up to the SVD's rounding) or the smallest rank keeping `energy` of its squared
    singular values. Errors are relative to each module's delta in `lora`."""
    if (rank is None) == (energy is None):
        raise ConfigError("give one of --rank or --energy")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1; got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1]; got {energy}")
    modules: dict[str, LoraModule] = {}
    errors: dict[str, SvdError] = {}
    for target, pair in sorted(lora.modules.items()):
        shape = _weight_shape(pair, target, lora.family)
        delta = pair.delta(shape, device=torch.device(device) if device else None)
        if not delta.any():  # zero pairs (an OpenCLIP layer's filler projections): the writer restores them
            continue
        # A LoRA pair's delta has at most its rank; LoHa's and LoKr's products have more than theirs.
        cap = pair.rank if isinstance(pair, LoraModule) else min(delta.flatten(1).shape)
        limit = min(cap, rank) if rank is not None else cap
        modules[target], errors[target] = factor(delta, limit, energy=energy, dtype=dtype, device=device)
    if not modules:
        raise ModelError(f"{lora.source or 'the LoRA'} changes no weight: every module is zero")
    resized = Lora(
        modules=modules,
        formats=lora.formats,
        metadata=dict(lora.metadata),
        source=lora.source,
        family=lora.family,
    )
    return resized, errors


def summarize_errors(errors: Mapping[str, SvdError]) -> dict[str, float]:
    """Relative error per module group (as `tune lora inspect` names them) and "overall":
    sqrt(sum residual^2 / sum norm^2) over the group's modules."""
    sums: dict[str, list[float]] = {}
    for target, error in errors.items():
        for name in (module_group(target), "overall"):
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += error.residual**2
            acc[1] += error.norm**2
    return {name: math.sqrt(r / n) if n else 0.0 for name, (r, n) in sorted(sums.items(), key=_overall_last)}


def _overall_last(item: tuple[str, Any]) -> tuple[bool, str]:
    return item[0] == "overall", item[0]


def _fastest_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _error_metadata(errors: Mapping[str, SvdError]) -> str:
    return json.dumps({name: round(value, 6) for name, value in summarize_errors(errors).items()})


def extract_lora_file(
    source: str | Path,
    out: str | Path,
    *,
    rank: int,
    base: str | Path | None = None,
    conv_rank: int = 0,
    text_encoder: bool = False,
    config: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
    force: bool = False,
) -> tuple[Path, Lora, dict[str, SvdError]]:
    """`tune lora extract`: a kohya file of `source - base`. `source` is a run directory (its
    export/pipeline; `base` defaults to the run's base model) or a model (diffusers folder or single
    file, `config` the diffusers folder a single file needs; default: `base` when it is a folder)."""
    from tune.models import load_pipeline, resolve_model_path
    from tune.runs import EXPORT_PIPELINE, is_run_dir, read_run

    source, out = Path(source), Path(out)
    _check_ranks(rank, conv_rank)
    _check_target(out, force)
    metadata: dict[str, str] = {}
    if is_run_dir(source):
        run = read_run(source)
        base = base or run.info.get("base_model") or run.config.get("base_model")
        metadata = run_metadata(source, output_name=out.stem, step=None)
        source = source / "export" / EXPORT_PIPELINE
        if not source.is_dir():
            raise ModelError(
                f"{source.parent.parent} has no exported model ({source} is missing); finish the run first"
            )
    if not base:
        raise ConfigError("--base is required (the model the fine-tune started from)")
    base_pipe = load_pipeline(str(base))
    if config is None and resolve_model_path(base).is_dir():
        config = base
    tuned_pipe = load_pipeline(source, config=config if source.is_file() else None)
    lora, errors = extract_lora(
        tuned_pipe, base_pipe, rank, conv_rank, text_encoder, dtype=dtype, device=_fastest_device()
    )
    v_prediction = base_pipe.scheduler.config.get("prediction_type") == "v_prediction"
    metadata |= {
        "tune_extract": json.dumps(
            {"base": str(base), "rank": rank, "conv_rank": conv_rank, "text_encoder": text_encoder}
        ),
        "tune_extract_error": _error_metadata(errors),
    }
    save_lora(lora, out, "kohya", dtype=dtype, metadata=metadata, v_prediction=v_prediction)
    return out, lora, errors


def resize_lora_file(
    source: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> tuple[Path, Lora, dict[str, SvdError]]:
    """`tune lora resize`: any LoRA file we read at a lower rank, as a kohya file (default dtype: the
    source's), its descriptive metadata kept."""
    source, out = Path(source), Path(out)
    _check_target(out, force, source=source)
    lora = read_lora(source)
    dtype = dtype or _file_dtype(lora)
    resized, errors = resize_lora(lora, rank, energy=energy, dtype=dtype, device=_fastest_device())
    how = f"rank {rank}" if rank is not None else f"energy {energy}"
    metadata = resized.metadata | {
        "tune_resize": f"{how} from ranks {','.join(map(str, sorted({p.rank for p in lora.modules.values()})))}",
        "tune_resize_error": _error_metadata(errors),
    }
    save_lora(resized, out, "kohya", dtype=dtype, metadata=metadata)
    return out, resized, errors
