"""The commands that write a shareable file: `tune export` (`export_run`, a run's adapter) and
`tune lora convert` (`convert_lora_file`, any file we read).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tune.errors import ConfigError
from tune.lora.core import ExportFormat, Lora
from tune.lora.run_files import default_export_path, find_run_adapter, run_base_family, run_metadata
from tune.lora.skeleton import read_lora
from tune.lora.write import DTYPES, FORMATS, save_lora


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
) -> Path:
    """`tune export`: a run's adapter (final, else newest checkpoint, or `step`) as a kohya or
    diffusers file, with the run's metadata, named for the base model's family (SD1.x, SD2.x, SDXL).
    Never overwrites an existing file unless `force`."""
    source, step = find_run_adapter(run_dir, step)
    target = Path(out) if out is not None else default_export_path(run_dir, format, step)
    _check_target(target, force, source=source)
    family, v_prediction = run_base_family(run_dir)
    lora = read_lora(source, family=family)
    metadata = run_metadata(run_dir, output_name=target.stem, step=step)
    return save_lora(lora, target, format, dtype=dtype, metadata=metadata, v_prediction=v_prediction)


def _file_dtype(lora: Lora) -> torch.dtype:
    dtypes = {t.dtype for pair in lora.modules.values() for t in (pair.down, pair.up)}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(DTYPES.values()) else torch.float32


def convert_lora_file(
    source: str | Path,
    to: ExportFormat,
    out: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """`tune lora convert`: any LoRA file we read -> kohya or diffusers, same deltas.

    Default out: `<stem>_<format>.safetensors` beside the source; default dtype: the source's. The
    source's descriptive metadata (names, trigger, tune_*) is kept; the format's own is recomputed.
    """
    if to not in FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(FORMATS)}; got {to!r}")
    source = Path(source)
    target = Path(out) if out is not None else source.with_name(f"{source.stem}_{to}.safetensors")
    _check_target(target, force, source=source)
    lora = read_lora(source)
    return save_lora(lora, target, to, dtype=dtype or _file_dtype(lora), metadata=lora.metadata)
