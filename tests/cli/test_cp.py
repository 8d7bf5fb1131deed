"""`tune cp <recipe> DEST.py` and `tune run DEST.py`: copy a shipped recipe, edit it, run the copy."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from tune import PROJECT_ROOT
from tune.cli import main
from tune.cli.recipe_files import recipe_names
from tune.runs import read_metrics, read_run
from tune.world.render import render
from tune.world.subjects import SUBJECTS

RECIPES = PROJECT_ROOT / "recipes"

# A recipe file written by hand: no RECIPE line, so --config must be a path.
HANDWRITTEN = '''
"""A handwritten recipe: records its seed."""
from dataclasses import dataclass

from tune.config import to_toml
from tune.runs import RunDir


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/handwritten"
    """Run directory."""
    seed: int = 0
    """Seed."""


def main(cfg: Config) -> RunDir:
    run = RunDir.create(cfg.output_dir, "handwritten", to_toml(cfg))
    run.log_metrics(0, seed=cfg.seed)
    run.finish()
    return run
'''


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("tune: error: ")
    return err


def make_concept(root: Path, count: int = 4) -> Path:
    """Four small photos of the example toy (world renders) and a concept.toml."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(count):
        spec = SUBJECTS["sks-toy"].spec(("wooden table", "grey", "sand", "blue")[i % 4])
        render(spec, np.random.default_rng(i), 64, 64).save(photos / f"toy_{i}.jpg", quality=90)
    (root / "concept.toml").write_text('token = "sks"\nclass_word = "toy"\n')
    return root


def test_cp_lora_then_run_the_edited_copy_on_the_tiny_config(
    tmp_path: Path, tiny_pipeline_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine.py"
    assert main(["cp", "lora", str(mine)]) == 0
    assert capsys.readouterr().out.strip() == str(mine)
    assert mine.read_bytes() == (RECIPES / "lora.py").read_bytes()
    # Edit the copy, so the run below shows that the copy ran, not recipes/lora.py.
    source = mine.read_text()
    start = "    run, cfg = start_run(RECIPE, cfg)\n"
    assert source.count(start) == 1
    mine.write_text(source.replace(start, start + '    (run.path / "edited.txt").write_text("mine")\n'))

    out = tmp_path / "run"
    args = ["run", str(mine), "--config", "tiny", f"output_dir={out}", f"base_model={tiny_pipeline_dir}"]
    args += [f"concept={make_concept(tmp_path / 'concept')}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0

    run = read_run(out)
    assert run.status == "done" and run.recipe == "lora"
    assert (out / "edited.txt").read_text() == "mine"
    assert "max_steps = 4" in (out / "config.toml").read_text()  # recipes/configs/lora/tiny.toml
    loss = {m["step"]: m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m}
    assert sorted(loss) == [1, 2, 3, 4] and all(math.isfinite(v) for v in loss.values())
    assert (out / "export" / "pytorch_lora_weights.safetensors").is_file()


def test_cp_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine.py"
    mine.write_text("# my work\n")
    assert main(["cp", "lora", str(mine)]) == 2
    assert "mine.py already exists" in one_error_line(capsys)
    assert mine.read_text() == "# my work\n"


def test_cp_unknown_recipe_suggests_the_nearest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cp", "lroa", str(tmp_path / "mine.py")]) == 2
    assert "unknown recipe 'lroa' (did you mean 'lora'?)" in one_error_line(capsys)
    assert not (tmp_path / "mine.py").exists()


def test_cp_into_a_folder_and_only_to_py(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cp", "vae", str(tmp_path)]) == 0
    assert (tmp_path / "vae.py").read_bytes() == (RECIPES / "vae.py").read_bytes()
    assert main(["cp", "vae", str(tmp_path / "vae.txt")]) == 2
    assert "DEST must end in .py" in one_error_line(capsys)


def test_every_shipped_recipe_names_itself() -> None:
    """`tune run COPY.py --config NAME` relies on the RECIPE line a copy keeps."""
    for name in recipe_names():
        tree = ast.parse((RECIPES / f"{name}.py").read_text())
        values = [
            node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["RECIPE"]
            and isinstance(node.value, ast.Constant)
        ]
        assert values == [name], name


def test_run_file_without_recipe_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "handwritten.py"
    recipe.write_text(HANDWRITTEN)
    assert main(["run", str(recipe), "--config", "tiny"]) == 2
    assert "has no RECIPE" in one_error_line(capsys)
    config = tmp_path / "c.toml"
    config.write_text("seed = 7\n")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--config", str(config), f"output_dir={out}"]) == 0
    assert read_run(out).status == "done"
    assert [m["seed"] for m in read_metrics(out / "metrics.jsonl")] == [7]


def test_run_file_missing_or_not_a_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    assert "recipe file" in one_error_line(capsys)
    other = tmp_path / "notes.py"
    other.write_text("X = 1\n")
    assert main(["run", str(other)]) == 2
    assert "is not a recipe: it has no Config and no main" in one_error_line(capsys)
