"""A complete install: the wheel built from this clone, installed into a fresh venv, works from a folder
outside the clone: `tune ls`, `tune sample` with the default base model, `tune dashboard --help`, and the
eval suites, world judge and dashboard app it ships. Slow: it builds a ~30 MB wheel and samples once.

The venv borrows the dependencies (torch, diffusers ...) of the Python running the tests through a .pth
file naming its site-packages, so nothing is downloaded; tune itself comes only from the wheel (no
PYTHONPATH, the clone is not the current folder), so a file the wheel lacks fails here.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

IN_WHEEL = (
    "tune/paths.py",
    "recipes/lora.py",
    "tune/_shipped/models/world-base/model_index.json",
    "tune/_shipped/models/world-base/unet/diffusion_pytorch_model.safetensors",
    "tune/_shipped/models/world-clip/model.safetensors",
    "tune/_shipped/models/world-judge/model.safetensors",
    "tune/_shipped/concepts/sks-toy/concept.toml",
    "tune/_shipped/eval/default.toml",
    "tune/_shipped/recipes/configs/lora/tiny.toml",
    "tune/_shipped/recipes/configs/accelerate/multi_gpu.yaml",
    "tune/_shipped/dashboard/app.py",
)


def clone_files(dest: Path) -> Path:
    """The clone's tracked and new (not ignored) files, copied: what a fresh clone would hold."""
    try:
        listing = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a git clone of tune")
    for name in filter(None, listing.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not listed as a file
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run(*command: str | Path, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_everything_tune_needs_outside_the_clone(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="builds the wheel with this Python's setuptools (offline)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    source = clone_files(tmp_path / "clone")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp_path / "dist", source, cwd=tmp_path, env=env)  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("tune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [n for n in IN_WHEEL if n not in names], sorted(names)
    assert not [n for n in names if n.startswith(("tests/", "recipes/configs/")) or "__pycache__" in n]

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
        cwd=tmp_path, env=env)  # fmt: skip
    purelib = run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path, env=env
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    # .pth files inside these folders are not run: an editable tune installed there stays invisible.
    Path(purelib.strip(), "_tune_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    work = tmp_path / "elsewhere"  # no models/, concepts/ or eval/ here: the shipped ones must be found
    work.mkdir()
    where = run(python, "-c", CHECK_INSTALLED, cwd=work, env=env)
    assert where.startswith(str(venv.resolve())), where

    listing = run(venv / "bin" / "tune", "ls", cwd=work, env=env)
    assert "lora" in listing and "tiny" in listing and "sks-toy" in listing, listing
    run(venv / "bin" / "tune", "sample", "--prompt", "a photo of a red ball", "--steps", "2",
        "--out", "ball.png", cwd=work, env=env)  # fmt: skip
    assert (work / "ball.png").stat().st_size > 0
    assert "--runs" in run(venv / "bin" / "tune", "dashboard", "--help", cwd=work, env=env)


# Run in the venv: tune and its shipped files come from the venv, and each shipped part loads.
CHECK_INSTALLED = """
import tune, tune.paths
from tune.evaluation import load_suite
from tune.world.judge import load_judge
from tune.metrics import load_clip
from tune.paths import find_path
assert find_path("dashboard/app.py").is_file()
load_suite("default")
load_judge()
load_clip()
print(tune.paths.DATA_ROOT, tune.__file__)
"""
