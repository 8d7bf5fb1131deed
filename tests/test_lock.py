"""requirements/lock.txt (what `make install` installs) agrees with pyproject's ranges."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
UNLOCKED = {"torch"}  # chosen by `make TORCH=...` (CPU or CUDA build), never pinned; see scripts/lock.py


def read_lock(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = project["optional-dependencies"]["dev"]
    return [Requirement(spec) for spec in project["dependencies"] + dev]


def test_every_locked_package_satisfies_pyproject() -> None:
    pins = read_lock(ROOT / "requirements" / "lock.txt")
    requirements = project_requirements()
    assert requirements, "pyproject lists no dependencies"
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name in UNLOCKED:
            assert name not in pins, f"{name} must stay out of the lock (make TORCH=... chooses it)"
            continue
        assert name in pins, f"pyproject's {requirement} is not in requirements/lock.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_read_lock_refuses_a_range(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\npeft==0.21.2\ndiffusers>=0.35\n")
    try:
        read_lock(lock)
    except AssertionError as error:
        assert "diffusers>=0.35" in str(error)
    else:
        raise AssertionError("a range in the lock was accepted")
