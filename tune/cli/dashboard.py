"""`tune dashboard`: the Streamlit app (dashboard/app.py) over a runs folder, on localhost.

    tune dashboard [--runs DIR] [--port N]

The runs folder is --runs, else $TUNE_RUNS_DIR, else ./runs; the app gets it as TUNE_RUNS_DIR. The
server runs headless (no browser is opened, no usage statistics are sent) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tune import PROJECT_ROOT
from tune.errors import ConfigError, TuneError

logger = logging.getLogger(__name__)

APP = PROJECT_ROOT / "dashboard" / "app.py"
DEFAULT_PORT = 8501


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tune dashboard`."""
    parser.add_argument(
        "--runs", default=None, metavar="DIR", help="runs folder (default: $TUNE_RUNS_DIR, else ./runs)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")


def streamlit_command(port: int) -> list[str]:
    """The `streamlit run` command line the dashboard is served with."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address=localhost",
        f"--server.port={port}",
        "--server.headless=true",
        "--browser.gatherUsageStats=false",
        "--global.developmentMode=false",
        "--client.toolbarMode=minimal",
    ]


def resolve_runs(value: str | None) -> Path:
    """--runs, else $TUNE_RUNS_DIR, else ./runs; an error unless it is an existing folder."""
    given = value or os.environ.get("TUNE_RUNS_DIR") or "runs"
    runs = Path(given).expanduser()
    source = "--runs" if value else "TUNE_RUNS_DIR" if os.environ.get("TUNE_RUNS_DIR") else "default ./runs"
    if not runs.exists():
        raise ConfigError(
            f"runs folder {runs} ({source}) does not exist; pass --runs DIR with your runs, or start one "
            "with `tune run <recipe>`"
        )
    if not runs.is_dir():
        raise ConfigError(f"runs folder {runs} ({source}) is a file; pass --runs DIR (a folder of runs)")
    return runs.resolve()


def run_cli(args: argparse.Namespace) -> int:
    """`tune dashboard`: become the streamlit server (exec, so Ctrl-C and kill reach it directly)."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535; got {args.port}")
    runs = resolve_runs(args.runs)
    if not APP.is_file():
        raise TuneError(f"the dashboard app {APP} is missing from this checkout of tune")
    env = {**os.environ, "TUNE_RUNS_DIR": str(runs), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    logger.info("dashboard over %s at http://localhost:%d (Ctrl-C stops it)", runs, args.port)
    sys.stdout.flush()
    sys.stderr.flush()
    command = streamlit_command(args.port)
    os.execve(command[0], command, env)
    return 0  # not reached: execve replaces this process
