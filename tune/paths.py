"""Where tune finds what it ships beside its code: models/, concepts/, eval/, recipes/configs/, dashboard/.

In a clone (an editable install, or the clone on PYTHONPATH) they are the folders next to tune/. An
installed wheel carries copies of them in tune/_shipped/ (setup.py's build step puts them there), laid
out the same way. `find_path` is the one lookup: the user's own path first, then the shipped one.

    find_path("models/world-base")   # ./models/world-base if it exists, else the shipped base model
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_WHEEL_DATA = _PACKAGE / "_shipped"

DATA_ROOT = _WHEEL_DATA if _WHEEL_DATA.is_dir() else _PACKAGE.parent
"""The folder that holds the shipped folders: an installed wheel's tune/_shipped/, else the clone."""


def find_path(name: str | os.PathLike[str]) -> Path:
    """A path as the user gave it when it exists (absolute, or relative to the current folder), else the
    shipped one of that name (`models/world-base`, `concepts/sks-toy`, `eval/default.toml`).

    Returns the path as given when neither exists, so that error messages name what the user typed.
    """
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    shipped = DATA_ROOT / path
    return shipped if shipped.exists() else path


def missing_shipped(name: str, rebuild: str = "") -> str:
    """What to do when the shipped `name` (e.g. "models/world-base") is missing: the first part of an error
    message, to which the caller adds its own way out ("or pass --model PATH"). `rebuild` is the command
    that remakes it in a clone ("make base")."""
    if DATA_ROOT == _WHEEL_DATA or not (DATA_ROOT / "pyproject.toml").is_file():
        return (
            f"{name} is not installed with tune (looked in ./{name} and {DATA_ROOT / name}); "
            "reinstall tune from a complete clone (pip install --force-reinstall /path/to/tune)"
        )
    again = f" or rebuild it ({rebuild})" if rebuild else ""
    return f"{name} is missing from the clone at {DATA_ROOT}; restore it (git checkout -- {name}){again}"


def source_commit() -> str | None:
    """The short hash of the clone's checked-out commit (what a measurement was made with), or None
    outside a git clone (an installed wheel) or without git."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_PACKAGE.parent, capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip() or None
