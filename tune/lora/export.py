"""The commands that write a shareable file: `tune export` (`export_run`, a run's adapter) and
`tune lora convert` (`convert_lora_file`, any file we read).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tune.errors import ConfigError, ModelError
from tune.lora.core import ExportFormat, Lora
from tune.lora.read import lora_targets
from tune.lora.run_files import (
    _find_value,
    default_export_path,
    find_run_adapter,
    run_base_family,
    run_metadata,
)
from tune.lora.skeleton import read_lora
from tune.lora.write import DTYPES, FORMATS, save_lora
from tune.lora.write_lycoris import dora_as_lora

logger = logging.getLogger(__name__)


def _check_target(path: Path, force: bool, *, source: Path | None = None) -> None:
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; name a .safetensors file")
    if path.suffix != ".safetensors":
        raise ConfigError(f"--out must name a .safetensors file; got {path}")
    if path.exists() and not force:
        same = " (the file being read)" if source is not None and path.resolve() == source.resolve() else ""
        raise ConfigError(f"{path} exists{same}; pass --force to overwrite it, or --out to write elsewhere")


def export_run(
    run_dir: str | Path,
    format: ExportFormat = "kohya",
    *,
    dtype: torch.dtype = torch.float16,
    step: int | None = None,
    out: str | Path | None = None,
    force: bool = False,
    dora_rank: int | None = None,
) -> Path:
    """`tune export`: a run's adapter (final, else newest checkpoint, or `step`) as a kohya or
    diffusers file, with the run's metadata, named for the base model's family (SD1.x, SD2.x, SDXL).
    Never overwrites an existing file unless `force`.

    LoHa and LoKr adapters become LyCORIS keys (kohya only: diffusers cannot load them). A DoRA adapter
    goes into the diffusers file exactly; its kohya file is the DoRA delta as a plain LoRA by SVD at
    `dora_rank` (default: the adapter's rank), which needs the run's base model, with the relative
    error in the log and in the metadata (`tune_dora_svd_error`)."""
    source, step = find_run_adapter(run_dir, step)
    target = Path(out) if out is not None else default_export_path(run_dir, format, step)
    _check_target(target, force, source=source)
    family, v_prediction = run_base_family(run_dir)
    lora = read_lora(source, family=family)
    metadata = run_metadata(run_dir, output_name=target.stem, step=step)
    if format == "kohya" and "dora" in lora.kinds:
        lora, metadata = _dora_for_kohya(lora, _run_base_weights(run_dir, lora), dora_rank, metadata)
    return save_lora(lora, target, format, dtype=dtype, metadata=metadata, v_prediction=v_prediction)


def _run_base_weights(run_dir: str | Path, lora: Lora) -> dict[str, torch.Tensor]:
    """The base weights of the run's DoRA modules (DoRA's delta depends on them): loads the base."""
    from tune.runs import read_run

    run = read_run(run_dir)
    base = run.info.get("base_model") or _find_value(run.config, ("base_model", "pretrained_model"))
    if not base:
        raise ModelError(f"{run.path} names no base model; a DoRA adapter's kohya file needs its weights")
    return _base_weights(str(base), lora)


def _base_weights(base: str | Path, lora: Lora) -> dict[str, torch.Tensor]:
    """The weights of `base` (a model folder or file) that the DoRA modules of `lora` change."""
    from tune.models import load_pipeline

    targets = lora_targets(load_pipeline(str(base)))
    weights = {}
    for target, module in lora.modules.items():
        if module.kind == "dora":
            component, path = target.split(".", 1)
            layer = targets[component].get_submodule(path)
            weights[target] = getattr(layer, "base_layer", layer).weight
    return weights


def _file_dtype(lora: Lora) -> torch.dtype:
    dtypes = {t.dtype for module in lora.modules.values() for t in module.tensors}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(DTYPES.values()) else torch.float32


def convert_lora_file(
    source: str | Path,
    to: ExportFormat,
    out: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
    base: str | Path | None = None,
    dora_rank: int | None = None,
) -> Path:
    """`tune lora convert`: any LoRA file we read -> kohya or diffusers, same deltas.

    Default out: `<stem>_<format>.safetensors` beside the source; default dtype: the source's. The
    source's descriptive metadata (names, trigger, tune_*) is kept; the format's own is recomputed.
    A DoRA file becomes a kohya file only with `base` (the model it was trained on): the plain LoRA
    nearest its delta at `dora_rank` (see `export_run`).
    """
    if to not in FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(FORMATS)}; got {to!r}")
    source = Path(source)
    target = Path(out) if out is not None else source.with_name(f"{source.stem}_{to}.safetensors")
    _check_target(target, force, source=source)
    lora = read_lora(source)
    metadata = dict(lora.metadata)
    file_dtype = _file_dtype(lora)
    if to == "kohya" and "dora" in lora.kinds:
        if base is None:
            raise ConfigError(
                f"{source} is DoRA: its kohya file is a plain LoRA made from the base weights; name the base model"
            )
        lora, metadata = _dora_for_kohya(lora, _base_weights(base, lora), dora_rank, metadata)
    return save_lora(lora, target, to, dtype=dtype or file_dtype, metadata=metadata)


def _dora_for_kohya(
    lora: Lora, weights: dict[str, torch.Tensor], rank: int | None, metadata: dict[str, str]
) -> tuple[Lora, dict[str, str]]:
    """DoRA modules as plain LoRA pairs by SVD, with the error in the log and the metadata."""
    lora, errors, overall = dora_as_lora(lora, weights, rank)
    worst = max(errors.values(), default=0.0)
    metadata = {
        **metadata,
        "tune_dora_svd_rank": str(rank or "adapter rank"),
        "tune_dora_svd_error": f"{overall:.6g} overall, {worst:.6g} worst module",
    }
    logger.info("DoRA as a plain LoRA for the kohya file: relative error %s", metadata["tune_dora_svd_error"])
    return lora, metadata
