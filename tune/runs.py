"""The run directory: the contract between recipes, eval and the dashboard.

```
<output_dir>/
  run.json            recipe, tune version, start time, command line, pid/host of the writer
  config.toml         the resolved config: `tune run <recipe> --config <output_dir>/config.toml` repeats it
  metrics.jsonl       one JSON object per line, each with "step" (a torn last line is ignored)
  samples/step_XXXXXX/   validation images (written by tune.sampling.sample_grid)
  checkpoints/step_XXXXXX/  complete only once its COMPLETE marker exists (written last)
  export/             LoRA / weights files for other tools; export/pipeline/ a whole diffusers pipeline
  eval/               evaluation reports: the default suite's; eval/<suite>/ each other suite's
  LOCK                held (flock) by the one process writing the run
  DONE                written last, when the run finished
```

This module imports no torch: the dashboard and `tune ls` read runs with it cheaply. Writers use
`RunDir`; readers use `read_run` / `list_runs`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tune.durable import write_atomic
from tune.errors import TuneError

STEP_DIR_FORMAT = "step_{:06d}"
COMPLETE_MARKER = "COMPLETE"
EXPORT_PIPELINE = "pipeline"
"""export/<this>/: the folder `save_pretrained` writes where a recipe exports a whole pipeline (unet, dreambooth)."""


def step_dir_name(step: int) -> str:
    return STEP_DIR_FORMAT.format(step)


def default_output_dir(recipe: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{recipe}-{stamp}"


class RunDir:
    """A run directory being written by one process (it holds the LOCK while open)."""

    def __init__(self, path: Path, lock_file: Any):
        self.path = path
        self._lock_file = lock_file

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, output_dir: str | Path, recipe: str, config_toml: str, *, resume: bool = False) -> RunDir:
        """Create (or, with `resume`, reopen) a run directory and take its lock.

        An existing non-empty folder is never overwritten: without `resume` it is an error.
        """
        path = Path(output_dir)
        if path.exists() and not path.is_dir():
            raise TuneError(f"output_dir {path} is a file; choose a folder, e.g. output_dir=runs/{recipe}-1")
        check_not_in_use(path)
        if path.is_dir() and any(path.iterdir()) and not resume:
            what = "a finished run" if (path / "DONE").exists() else "files"
            raise TuneError(
                f"output_dir {path} already holds {what}; choose a new output_dir=... "
                "or continue it with resume=latest"
            )
        try:
            for sub in ("", "samples", "checkpoints", "export", "eval"):
                (path / sub).mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise TuneError(f"cannot write to output_dir {path}: permission denied") from None
        except FileExistsError as err:  # a parent (or a subfolder's name) is a file
            raise TuneError(f"cannot create output_dir {path}: {err.filename} is a file") from None
        except OSError as err:
            raise TuneError(f"cannot create output_dir {path}: {err.strerror or err}") from None
        lock_file = _take_lock(path)
        run = cls(path, lock_file)
        with contextlib.suppress(FileNotFoundError):
            (path / "DONE").unlink()  # a resumed run is running again
        _drop_torn_line(path / "metrics.jsonl")  # a killed writer may have left half a row
        write_atomic(path / "config.toml", config_toml)
        info = {
            "recipe": recipe,
            "tune_version": _tune_version(),
            "started_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        if resume and (path / "run.json").exists():
            previous = _read_json(path / "run.json")
            info["started_at"] = previous.get("started_at", info["started_at"])
            # The command that started the run stays (a resume's own command line is often just
            # `--config <run>/config.toml resume=latest`, which does not say how the run was made).
            info["argv"] = previous.get("argv", info["argv"])
            info["resume_argv"] = sys.argv
            info["resumed_at"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        write_atomic(path / "run.json", json.dumps(info, indent=2))
        return run

    # -- paths ------------------------------------------------------------------------------
    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def sample_dir(self, step: int) -> Path:
        d = self.samples_dir / step_dir_name(step)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dir_name(step)

    # -- writing ----------------------------------------------------------------------------
    def log_metrics(self, step: int, **values: float | int | str) -> None:
        """Append one line to metrics.jsonl (flushed at once, so readers see progress live)."""
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def update_info(self, **values: Any) -> None:
        """Add facts to run.json (e.g. base model, concept, max_steps) for readers."""
        info = _read_json(self.path / "run.json")
        info.update(values)
        write_atomic(self.path / "run.json", json.dumps(info, indent=2))

    def mark_checkpoint_complete(self, step: int) -> None:
        write_atomic(self.checkpoint_dir(step) / COMPLETE_MARKER, "")

    def finish(self) -> None:
        """Write DONE (last) and release the lock."""
        write_atomic(self.path / "DONE", _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        self.close()

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None


def _drop_torn_line(path: Path) -> None:
    """Cut a metrics file back to its last complete line, so the next row starts on a line of its own."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def _in_use_error(path: Path, holder: str) -> TuneError:
    return TuneError(
        f"run directory {path} is in use by {holder or 'another process'} (another tune run is writing it); "
        "wait for it to finish or choose another output_dir"
    )


def check_not_in_use(path: str | Path) -> None:
    """Raise a TuneError when a live process holds the run directory's lock (cheap; takes no lock)."""
    path = Path(path)
    if _holder_alive(path):
        try:
            holder = (path / "LOCK").read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        raise _in_use_error(path, holder)


def _take_lock(path: Path) -> Any:
    # flock is released by the kernel when the holder dies, so a stale lock never blocks a new run.
    try:
        f = open(path / "LOCK", "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's lifetime
    except OSError as err:
        raise TuneError(f"cannot write to output_dir {path}: {err.strerror or err}") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise _in_use_error(path, holder) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def _tune_version() -> str:
    from tune import __version__

    return __version__


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------
# Reading (pure Python)
# ---------------------------------------------------------------------------------------------

Status = Literal["done", "running", "crashed"]


@dataclass
class RunInfo:
    """What a reader needs to know about one run directory."""

    path: Path
    recipe: str
    status: Status
    config: dict[str, Any]
    info: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sample_steps: list[int] = field(default_factory=list)
    checkpoint_steps: list[int] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)

    @property
    def last_step(self) -> int | None:
        steps = [m["step"] for m in self.metrics if isinstance(m.get("step"), int)]
        return max(steps) if steps else None

    @property
    def duration_s(self) -> float | None:
        times = [m["time"] for m in self.metrics if isinstance(m.get("time"), int | float)]
        started = self.info.get("started_at")
        if not times or not started:
            return None
        return max(times) - _dt.datetime.fromisoformat(started).timestamp()

    def samples_at(self, step: int) -> Path:
        return self.path / "samples" / step_dir_name(step)

    def checkpoint_at(self, step: int) -> Path:
        return self.path / "checkpoints" / step_dir_name(step)

    @property
    def export_dir(self) -> Path:
        return self.path / "export"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn or garbled line (a run killed mid-write) is skipped."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _steps(folder: Path, need_marker: bool = False) -> list[int]:
    steps = []
    if folder.is_dir():
        for d in folder.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit():
                if not need_marker or (d / COMPLETE_MARKER).exists():
                    steps.append(int(d.name[5:]))
    return sorted(steps)


def _holder_alive(path: Path) -> bool:
    lock = path / "LOCK"
    if not lock.exists():
        return False
    try:
        with open(lock, encoding="utf-8") as f:
            # A non-blocking shared lock fails only while the writer holds its exclusive lock.
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "run.json").is_file() and (p / "config.toml").is_file()


def read_run(path: str | Path) -> RunInfo:
    """Read one run directory (no torch import)."""
    import tomllib

    p = Path(path)
    if not is_run_dir(p):
        raise TuneError(f"{p} is not a tune run directory (no run.json/config.toml)")
    info = _read_json(p / "run.json")
    try:
        config = tomllib.loads((p / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    status: Status = "done" if (p / "DONE").exists() else "running" if _holder_alive(p) else "crashed"
    exports = sorted(x for x in (p / "export").rglob("*") if x.is_file()) if (p / "export").is_dir() else []
    return RunInfo(
        path=p,
        recipe=str(info.get("recipe", "?")),
        status=status,
        config=config,
        info=info,
        metrics=read_metrics(p / "metrics.jsonl"),
        sample_steps=_steps(p / "samples"),
        checkpoint_steps=_steps(p / "checkpoints", need_marker=True),
        exports=exports,
    )


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every run directory under `root` (searched two levels deep), newest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    candidates = [d for d in r.iterdir() if d.is_dir()]
    candidates += [d for c in candidates for d in c.iterdir() if d.is_dir()]
    runs = [read_run(d) for d in candidates if is_run_dir(d)]
    return sorted(runs, key=lambda run: str(run.info.get("started_at", "")), reverse=True)
