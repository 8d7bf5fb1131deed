"""The `tune` command line: commands, recipe dispatch, config handling, one-line errors."""

import subprocess
import sys
import textwrap

import pytest

import recipes
from tune.cli import main

FAKE_RECIPE = '''
"""A fake recipe for CLI tests: writes its config and a metric."""
from dataclasses import dataclass, field
from typing import Literal

from tune.config import to_toml
from tune.runs import RunDir


@dataclass(frozen=True)
class Optim:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    """Optimizer."""
    lr: float = 1e-4
    """Learning rate."""


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/fake"
    """Run directory."""
    seed: int = 0
    """Seed."""
    instance_prompt: str = "a photo of sks toy"
    """Prompt."""
    optim: Optim = field(default_factory=Optim)
    """Optimizer settings."""


def main(cfg: Config) -> RunDir:
    run = RunDir.create(cfg.output_dir, "fakerecipe", to_toml(cfg))
    run.log_metrics(0, seed=cfg.seed, lr=cfg.optim.lr)
    run.finish()
    return run
'''


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "extra_recipes"
    folder.mkdir()
    (folder / "fakerecipe.py").write_text(FAKE_RECIPE)
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(folder)])
    yield "fakerecipe"
    sys.modules.pop("recipes.fakerecipe", None)


def run_tune(*args):
    return subprocess.run([sys.executable, "-m", "tune.cli", *args], capture_output=True, text=True)


def test_help_lists_every_command():
    out = run_tune("--help")
    assert out.returncode == 0
    for command in ("ls", "run", "cp", "sample", "export", "lora", "eval", "dashboard", "data"):
        assert f"    {command} " in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
        (["smaple"], "unknown command 'smaple' (did you mean 'sample'?)"),
        (["data", "chek"], "unknown command 'chek' (did you mean 'check'?)"),
    ],
)
def test_unknown_names_exit_2_with_one_line(args, message):
    out = run_tune(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert message in out.stderr


def test_recipe_suggestion(fake_recipe, capsys):
    assert main(["run", "fakerecip"]) == 2
    assert "did you mean 'fakerecipe'?" in capsys.readouterr().err


def test_run_writes_run_dir_and_config_reproduces(fake_recipe, tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("seed = 4\n[optim]\nlr = 0.5\n")
    out1 = tmp_path / "run1"
    assert main(["run", fake_recipe, "--config", str(cfg_file), f"output_dir={out1}", "optim.lr=0.25"]) == 0
    assert (out1 / "DONE").exists()
    resolved = (out1 / "config.toml").read_text()
    assert "seed = 4" in resolved and "lr = 0.25" in resolved
    # Running the saved config again reproduces the run (into a new folder; the old one is never overwritten).
    assert main(["run", fake_recipe, "--config", str(out1 / "config.toml")]) == 2
    out2 = tmp_path / "run2"
    assert main(["run", fake_recipe, "--config", str(out1 / "config.toml"), f"output_dir={out2}"]) == 0
    assert (out2 / "config.toml").read_text() == resolved.replace(str(out1), str(out2))
    assert (out2 / "metrics.jsonl").read_text().split('"time"')[0] == (
        out1 / "metrics.jsonl"
    ).read_text().split('"time"')[0]


def test_print_config_and_dry_run_run_nothing(fake_recipe, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", fake_recipe, "--print-config", f"output_dir={out}", "seed=3"]) == 0
    text = capsys.readouterr().out
    assert "# Seed.\nseed = 3" in text and "[optim]" in text
    assert main(["run", fake_recipe, "--dry-run", f"output_dir={out}"]) == 0
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("sed=1", "unknown key 'sed' (did you mean 'seed'?)"),
        ("optim.name=adam", "optim.name must be one of adamw, adamw8bit"),
        ("seed=x", "seed must be int; got 'x'"),
        ("seed", "unexpected argument 'seed'"),
    ],
)
def test_bad_config_exits_2(fake_recipe, capsys, override, message):
    assert main(["run", fake_recipe, "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_config_file_exit_2(fake_recipe, capsys):
    assert main(["run", fake_recipe, "--config", "nope.toml"]) == 2
    assert "config file nope.toml not found" in capsys.readouterr().err


def test_dashboard_with_a_missing_runs_folder_exits_2(tmp_path, capsys):
    assert main(["dashboard", "--runs", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_ls_lists_recipes_and_does_not_import_torch(fake_recipe):
    code = textwrap.dedent(
        """
        import sys, recipes
        recipes.__path__.append(sys.argv[1])
        from tune.cli import main
        main(["ls"])
        print("torch imported:", "torch" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(recipes.__path__[-1])], capture_output=True, text=True, check=True
    )
    assert "fakerecipe" in out.stdout and "A fake recipe for CLI tests" in out.stdout
    assert "torch imported: False" in out.stdout


def test_bad_option_value_is_not_called_a_command(capsys):
    assert main(["sample", "--scheduler", "dpmpp2m", "--prompt", "x", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "unknown value for --scheduler 'dpmpp2m' (did you mean 'dpmpp_2m'?)" in err
