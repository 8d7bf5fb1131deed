"""`tune dashboard`: where the runs folder comes from, bad input, the streamlit command it execs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tune.cli import dashboard as dashboard_cli
from tune.cli import main


@pytest.fixture
def execs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], dict[str, str]]]:
    """Record the exec instead of becoming a server."""
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    return calls


def test_dashboard_serves_the_app_headless_on_localhost(tmp_path: Path, execs, monkeypatch):
    monkeypatch.delenv("TUNE_RUNS_DIR", raising=False)
    assert main(["dashboard", "--runs", str(tmp_path), "--port", "8600"]) == 0
    [(path, argv, env)] = execs
    assert argv[:5] == [path, "-m", "streamlit", "run", str(dashboard_cli.APP)]
    assert Path(argv[4]).is_file()
    for flag in (
        "--server.address=localhost",
        "--server.port=8600",
        "--server.headless=true",
        "--browser.gatherUsageStats=false",
    ):
        assert flag in argv
    assert env["TUNE_RUNS_DIR"] == str(tmp_path.resolve())


def test_runs_folder_from_environment_then_default(tmp_path: Path, execs, monkeypatch):
    monkeypatch.setenv("TUNE_RUNS_DIR", str(tmp_path))
    assert main(["dashboard"]) == 0
    assert execs[-1][2]["TUNE_RUNS_DIR"] == str(tmp_path.resolve())
    monkeypatch.delenv("TUNE_RUNS_DIR")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["dashboard"]) == 0
    assert execs[-1][2]["TUNE_RUNS_DIR"] == str((tmp_path / "runs").resolve())
    assert "--server.port=8501" in execs[-1][1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "{tmp}/missing"], "runs folder {tmp}/missing (--runs) does not exist"),
        (["--runs", "{tmp}/file.txt"], "(--runs) is a file"),
        (["--runs", "{tmp}", "--port", "0"], "--port must be in 1..65535; got 0"),
        (["--runs", "{tmp}", "--port", "http"], "invalid int value: 'http'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, execs, capsys, args, message):
    (tmp_path / "file.txt").write_text("")
    code = main(["dashboard", *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and not execs
    assert message.format(tmp=tmp_path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_default_runs_folder_names_the_source(tmp_path: Path, execs, capsys, monkeypatch):
    monkeypatch.delenv("TUNE_RUNS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard"]) == 2
    assert "runs folder runs (default ./runs) does not exist" in capsys.readouterr().err
