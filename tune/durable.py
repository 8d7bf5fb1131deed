"""Writes that are complete or absent: a free-space check first, a temporary name beside the target,
fsync, then a rename (files) or a swap (folders). Readers of a run, a cache or an export never see a torn
file or a half-written folder, and a full disk is a clear error before anything is written.

Hand-written: the standard library has the pieces (tempfile, os.replace, os.fsync), no well-kept library
puts them together with a free-space check and torch-free imports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tune.errors import TuneError

# Free space kept beyond what a write needs: a disk filled to the last byte breaks everything else too.
DISK_MARGIN_BYTES = 16 * 2**20


def check_disk_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Raise a TuneError naming `folder`, the free and the needed bytes when `what` would not fit."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the nearest existing parent holds the space
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:  # cannot tell (e.g. a vanished folder): let the write itself report
        return
    if free < needed_bytes + DISK_MARGIN_BYTES:
        raise TuneError(
            f"not enough disk space for {what} in {folder}: {_size(free)} free, {_size(needed_bytes)} needed "
            f"(+ {_size(DISK_MARGIN_BYTES)} margin); free some space or choose another folder"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - unreachable


def fsync_dir(path: str | Path) -> None:
    """Make a rename or new file inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under `path` and the folders themselves (before a marker says they are complete)."""
    root = Path(path)
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a torn one (temp file in the
    same folder, fsync, rename); a disk without room for it is a TuneError before anything is written."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, len(payload)) as tmp:
        tmp.write_bytes(payload)


@contextlib.contextmanager
def atomic_file(path: str | Path, needed_bytes: int = 0) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (e.g. safetensors' save_file);
    when the block ends it is fsynced and renamed over `path`, so readers never see a torn file (for
    data already in memory, `write_atomic` is simpler). The folder must exist."""
    path = Path(path)
    check_disk_space(path.parent, needed_bytes, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | Path, needed_bytes: int = 0) -> Iterator[Path]:
    """Write a folder (e.g. `save_pretrained`) under a temporary name beside `path`, then swap it in.

    Readers see the old folder or the complete new one, never a half-written one; a crash leaves a
    `.<name>.tmp-*` folder behind, which the next write of the same folder removes. `needed_bytes` is
    checked against the free space first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(path.parent, needed_bytes, f"{path.name}/")
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.tmp-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
