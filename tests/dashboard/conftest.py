"""Dashboard test setup: the checkout on sys.path (the app's `dashboard` package) and fixture runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tune import PROJECT_ROOT

if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from dashboard_testkit import make_runs  # noqa: E402


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """Fixture runs (see dashboard_testkit): a finished LoRA-like run and a stopped one."""
    return make_runs(tmp_path)
