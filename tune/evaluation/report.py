"""The report of `tune eval`, torch-free: the best-step/overfit rule and the report's text.

Written (atomically, by `Evaluator.write`) into the suite's folder (`suite_eval_dir`): the default
suite's `RUN_DIR/eval/report.json`, any other's `RUN_DIR/eval/<suite name>/report.json`

    {"suite", "clip_model", "dino_model", "prompts", "seeds", "steps", "guidance",
     "base": {"label": "base", "step": 0, <metrics>, "images": "eval/base/"},
     "checkpoints": [{"label": "step_000200", "step": 200, <metrics>, "images": "eval/step_000200/"}],
     "best_step", "overfit", "overfit_reason"}

("images" is relative to the run directory: `eval/backgrounds/base/` for the backgrounds suite.) An entry
also holds "subject_parts", {part: share} of the subject's look read right (`tune.metrics.look_parts`),
or null.

and `report.md` (a table and the grids: `format_markdown`). `best_step` and `overfit` are decided by
`decide()`; `format_summary` is what `tune eval` prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_KEEP = 0.9
"""A checkpoint keeps the prompt when its prompt fidelity is at least 90% of the base model's."""
DIVERSITY_KEEP = 0.5
"""Diversity has collapsed when it falls below 50% of the base model's."""
METRICS = (
    "subject_fidelity",
    "prompt_fidelity",
    "diversity",
    "dino_fidelity",
    "subject_found",
    "background_right",
    "style_right",
    "prompt_right",
    "subject_in_others",
    "trigger_on_subject",
)


def _floor(base: float, share: float) -> float:
    """`share` of a base value, for either sign (a cosine can be negative): base - (1 - share) * |base|."""
    return base - (1.0 - share) * abs(base)


def decide(
    base: dict[str, Any] | None, checkpoints: Sequence[dict[str, Any]]
) -> tuple[int | None, bool, str | None]:
    """(best_step, overfit, overfit_reason) from the base entry and the checkpoint entries.

    - best_step: the checkpoint with the highest subject fidelity among those whose prompt fidelity is
      at least PROMPT_KEEP (90%) of the base model's; None when no checkpoint qualifies (or none
      exists). Without a base entry every checkpoint qualifies.
    - overfit: the last checkpoint's prompt fidelity is below 90% of the base model's, or its
      diversity below DIVERSITY_KEEP (50%) of the base model's (every seed drawing the same picture);
      the reason says which, with the numbers. Never without a base entry or checkpoints.

    "x% of the base" is base - (1 - x) * |base|, so a negative base value does not invert the rule.
    """
    if not checkpoints:
        return None, False, None
    keep = _floor(base["prompt_fidelity"], PROMPT_KEEP) if base is not None else float("-inf")
    kept = [c for c in checkpoints if c["prompt_fidelity"] >= keep and c.get("subject_fidelity") is not None]
    best = max(kept, key=lambda c: (c["subject_fidelity"], -c["step"]), default=None)
    best_step = None if best is None else int(best["step"])
    if base is None:
        return best_step, False, None
    last = max(checkpoints, key=lambda c: c["step"])
    reasons = []
    if last["prompt_fidelity"] < keep:
        reasons.append(
            f"prompt fidelity {last['prompt_fidelity']:.4f} at step {last['step']} is below "
            f"{PROMPT_KEEP:.0%} of the base model's {base['prompt_fidelity']:.4f}"
        )
    if last["diversity"] < _floor(base["diversity"], DIVERSITY_KEEP):
        reasons.append(
            f"diversity {last['diversity']:.4f} at step {last['step']} collapsed below "
            f"{DIVERSITY_KEEP:.0%} of the base model's {base['diversity']:.4f}"
        )
    return best_step, bool(reasons), "; ".join(reasons) or None


def format_markdown(report: dict[str, Any]) -> str:
    """report.md: settings, one table row per model, the verdict, and the grids."""
    entries = ([report["base"]] if report["base"] else []) + report["checkpoints"]
    columns = [m for m in METRICS if any(e.get(m) is not None for e in entries)]
    lines = [
        f"# Evaluation: suite `{report['suite']}`",
        "",
        f"{len(report['prompts'])} prompts x seeds {report['seeds']}, {report['steps']} steps, "
        f"guidance {report['guidance']}; CLIP `{report['clip_model']}`"
        + (f", DINO `{report['dino_model']}`" if report["dino_model"] else ""),
        "",
        "| model | step | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for e in entries:
        cells = [f"{e[m]:.4f}" if e.get(m) is not None else "-" for m in columns]
        mark = " (best)" if e["label"] != "base" and e["step"] == report["best_step"] else ""
        lines.append(f"| {e['label']}{mark} | {e['step']} | " + " | ".join(cells) + " |")
    lines += _parts_table(entries)
    lines += ["", f"- Best step: {report['best_step'] if report['best_step'] is not None else 'none'}"]
    lines.append(f"- Overfit: {'yes: ' + report['overfit_reason'] if report['overfit'] else 'no'}")
    lines.append("")
    for e in entries:
        lines += [f"## {e['label']}", "", f"![{e['label']}]({e['label']}/grid.png)", ""]
    return "\n".join(lines)


def _parts_table(entries: Sequence[dict[str, Any]]) -> list[str]:
    """report.md's table of the look's parts read right per model; none when no entry has them."""
    parts = list(dict.fromkeys(k for e in entries for k in (e.get("subject_parts") or {})))
    if not parts:
        return []
    lines = [
        "",
        "The subject's look, part by part: the share of the subject images that read it right (colours and "
        "hair over those in a style with colours).",
        "",
        "| model | " + " | ".join(parts) + " |",
        "|---|" + "---:|" * len(parts),
    ]
    for e in entries:
        shares = e.get("subject_parts") or {}
        lines.append(
            f"| {e['label']} | "
            + " | ".join(f"{shares[k]:.0%}" if k in shares else "-" for k in parts)
            + " |"
        )
    return lines


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: base vs last (and the last's look, part by part), best step, overfit."""
    rows = ([report["base"]] if report["base"] else []) + report["checkpoints"][-1:]
    lines = [_summary_line(e) for e in rows]
    if rows and rows[-1].get("subject_parts"):
        shares = rows[-1]["subject_parts"]
        lines.append(f"{'look read':>12}: " + "  ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    lines.append(f"best step: {report['best_step']}  overfit: {report['overfit']}")
    if report["overfit_reason"]:
        lines.append(f"  ({report['overfit_reason']})")
    return "\n".join(lines)


SUMMARY = (  # (metric, its name in the terminal summary); a metric a suite does not measure is left out
    ("subject_fidelity", "subject"),
    ("prompt_fidelity", "prompt"),
    ("diversity", "diversity"),
    ("subject_found", "found"),
    ("background_right", "background right"),
    ("style_right", "style right"),
    ("subject_in_others", "subject without trigger"),
    ("trigger_on_subject", "trigger on subject"),
)


def _summary_line(e: dict[str, Any]) -> str:
    # The drift suite has no prompt with the trigger, so no subject fidelity (None): such values are left out.
    cells = [f"{name} {e[key]:.4f}" for key, name in SUMMARY if e.get(key) is not None]
    return f"{e['label']:>12}: " + "  ".join(cells)
