"""The eval reports the dashboard charts, read from a run directory: pure Python, no Streamlit, no torch.

`tune eval` writes eval/report.json for the default suite and eval/<suite>/report.json for each other
one; each holds the base's entry and one per checkpoint, with the scores of `tune.evaluation.report`
and the folder of the images it judged (laid out as samples/step_XXXXXX/).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from dashboard.data import SampleSet, read_sample_set
from tune.errors import ConfigError
from tune.evaluation.report import METRICS
from tune.evaluation.suites import DEFAULT_SUITE, suite_eval_dir
from tune.runs import RunInfo

EVAL_SCORES = METRICS
"""The scores a report may hold per model (`tune eval`'s own list)."""


def eval_suites(run: RunInfo) -> list[str]:
    """The suites with a report in the run: "default" (eval/report.json) first, then eval/<suite>/'s."""
    names = [DEFAULT_SUITE] if (run.path / "eval" / "report.json").is_file() else []
    for report in sorted((run.path / "eval").glob("*/report.json")):
        with contextlib.suppress(ConfigError):  # a folder no suite writes to (eval/base/, eval/default/)
            if suite_eval_dir(run.path, report.parent.name) == report.parent:
                names.append(report.parent.name)
    return names


def read_eval_report(run: RunInfo, suite: str = DEFAULT_SUITE) -> dict[str, Any] | None:
    """A suite's report.json as a dict, or None when there is none (or it is unreadable)."""
    try:
        report = json.loads((suite_eval_dir(run.path, suite) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def eval_entries(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The base entry and the checkpoints', in step order."""
    entries = [report["base"]] if isinstance(report.get("base"), dict) else []
    entries += [c for c in report.get("checkpoints", []) if isinstance(c, dict)]
    return sorted(entries, key=lambda e: int(e.get("step", 0) or 0))


def eval_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per entry: label, step, every score present, and each part of the subject's look read
    right as "look <part>" (subject_parts: what a miss of subject_found comes from)."""
    rows = []
    for e in eval_entries(report):
        row: dict[str, Any] = {"label": e.get("label", ""), "step": int(e.get("step", 0) or 0)}
        for key in EVAL_SCORES:
            if isinstance(e.get(key), int | float):
                row[key] = float(e[key])
        parts = e.get("subject_parts")
        for part, share in parts.items() if isinstance(parts, dict) else ():
            if isinstance(share, int | float):
                row[f"look {part}"] = float(share)
        rows.append(row)
    return rows


def eval_styles(report: dict[str, Any]) -> dict[str, str]:
    """prompt -> style from the suite's prompts when they carry one ({"prompt": ..., "style": ...})."""
    styles = {}
    for p in report.get("prompts", []):
        if isinstance(p, dict) and p.get("prompt") and p.get("style"):
            styles[str(p["prompt"])] = str(p["style"])
    return styles


def eval_sample_sets(run: RunInfo, report: dict[str, Any]) -> dict[int, SampleSet]:
    """step -> the eval suite's images of that entry (same layout as samples/step_XXXXXX/)."""
    sets = {}
    for e in eval_entries(report):
        folder = e.get("images")
        if not folder:
            continue
        step = int(e.get("step", 0) or 0)
        s = read_sample_set(run.path / str(folder), step, str(e.get("label") or ""))
        if s is not None:
            sets[step] = s
    return sets
