"""tune.paths: the one lookup of shipped files (the user's path first, then the clone's or the wheel's
copy), what a missing one says, and the build files that put the shipped folders in the wheel."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from tune import paths
from tune.paths import find_path, missing_shipped, source_commit

ROOT = Path(__file__).resolve().parent.parent


def test_current_folder_then_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, cwd = tmp_path / "project", tmp_path / "cwd"
    (project / "models" / "base").mkdir(parents=True)
    (project / "models" / "shipped").mkdir(parents=True)
    (cwd / "models" / "base").mkdir(parents=True)
    monkeypatch.setattr(paths, "DATA_ROOT", project)
    monkeypatch.chdir(cwd)
    assert find_path("models/base") == Path("models/base")  # the current folder wins
    assert find_path("models/shipped") == project / "models" / "shipped"
    assert find_path("models/nowhere") == Path("models/nowhere")  # as given, for the error message
    assert find_path(str(project)) == project
    assert find_path(Path("models") / "shipped") == project / "models" / "shipped"


def test_the_clone_is_the_data_root_here() -> None:
    # These tests run from a clone (or its editable install): no tune/_shipped/ copy.
    assert paths.DATA_ROOT == ROOT
    assert find_path("models/world-base").resolve() == ROOT / "models" / "world-base"


def test_missing_shipped_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clone_message = missing_shipped("models/world-base", rebuild="make base")
    assert "git checkout -- models/world-base" in clone_message and "make base" in clone_message
    monkeypatch.setattr(paths, "DATA_ROOT", tmp_path / "site-packages" / "tune" / "_shipped")
    installed = missing_shipped("models/world-base", rebuild="make base")
    assert "pip install" in installed and "complete clone" in installed and "make base" not in installed


def test_default_suite_and_judge_name_the_missing_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.errors import ConfigError, ModelError
    from tune.evaluation import suites
    from tune.world.judge import load_judge

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "DATA_ROOT", tmp_path / "installed")
    monkeypatch.setattr(suites, "SUITES_DIR", tmp_path / "installed" / "eval")
    with pytest.raises(ConfigError, match="eval is not installed with tune.*pip install"):
        suites.find_suite("default")
    with pytest.raises(ModelError, match="models/world-judge is not installed with tune.*pip install"):
        load_judge()


def test_setup_ships_the_folders_the_sdist_carries() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    [shipped] = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SHIPPED"
    ]
    grafts = {
        line.split()[1]
        for line in (ROOT / "MANIFEST.in").read_text().splitlines()
        if line.startswith("graft ")
    }
    assert set(shipped) == grafts
    assert all((ROOT / name).is_dir() for name in shipped)
    assert {"models", "concepts", "eval", "recipes/configs", "dashboard"} <= set(shipped)


def test_source_commit_is_the_clones_head() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git clone")
    commit = source_commit()
    assert commit is not None and head.stdout.strip().startswith(commit) and len(commit) >= 7
