"""Evaluating a run directory: the base model, then every complete checkpoint, on one suite.

`evaluate_run` reads the run (`run_subject`: its token, class word and photos), loads its base model
once and puts each checkpoint's weights into it in turn (`tune.personalize.weights.apply_run_weights`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.errors import ConfigError, TuneError
from tune.evaluation.evaluator import EvalSubject, Evaluator, _word_after
from tune.evaluation.suites import DEFAULT_SUITE, load_suite, suite_eval_dir
from tune.paths import find_path

if TYPE_CHECKING:
    from tune.runs import RunInfo

log = logging.getLogger(__name__)


def run_subject(run: RunInfo) -> EvalSubject:
    """Token, class word and photos of a personalization run (run.json, else config.toml)."""
    from tune.data.concepts import load_concept

    info, config = run.info, run.config
    token = str(info.get("trigger") or config.get("token") or "")
    photos = info.get("instance_dir") or config.get("instance_dir")
    if not token or not photos:
        raise TuneError(
            f"{run.path}/run.json names no trigger word or photos folder; did the run get past its start?"
        )
    class_word = str(info.get("class_word") or "")
    concept = info.get("concept") or ""
    if not class_word and concept and Path(concept, "concept.toml").is_file():
        class_word = load_concept(concept).class_word
    if not class_word:
        class_word = _word_after(
            token, str(info.get("instance_prompt") or config.get("instance_prompt") or "")
        )
    return EvalSubject(token=token, class_word=class_word, photos=find_path(str(photos)))


def run_guidance(run: RunInfo) -> float | None:
    """The guidance the run's validation samples were drawn at (config.toml's `sample.guidance`), or None."""
    sample = run.config.get("sample")
    value = sample.get("guidance") if isinstance(sample, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def evaluate_run(
    run_dir: str | Path,
    suite: str | Path = DEFAULT_SUITE,
    *,
    checkpoints: str = "all",
    clip: str | Path | None = None,
    dino: str | Path | None = None,
    device: str | None = None,
    guidance: float | None = None,
) -> dict[str, Any]:
    """Evaluate a run's base model and checkpoints; write and return the suite's report.json content
    (`suite_eval_dir`: eval/report.json for the default suite, eval/<suite name>/report.json else).
    `guidance` draws at that scale instead of the suite's (a suite's "run" is the run's `run_guidance`)."""
    from tqdm.auto import tqdm

    from tune import metrics
    from tune.personalize import load_base
    from tune.personalize.weights import RECIPES, apply_run_weights
    from tune.runs import read_run

    path = Path(run_dir)
    if not path.is_dir():
        raise TuneError(f"run directory {path} not found")
    run = read_run(path)
    if run.recipe not in RECIPES:
        raise TuneError(
            f"{path} is a {run.recipe} run; tune eval scores personalization runs ({', '.join(RECIPES)})"
        )
    if checkpoints not in ("all", "last"):
        raise ConfigError(f"--checkpoints must be all or last; got {checkpoints!r}")
    the_suite = load_suite(suite).drawn_at(run_guidance(run), guidance)
    out = suite_eval_dir(path, the_suite.name)  # a name that clashes with the image folders fails here
    subject = run_subject(run)
    base_model = str(run.info.get("base_model") or run.config.get("base_model") or "")
    if not base_model:
        raise TuneError(f"{path} names no base_model in run.json or config.toml")
    steps = run.checkpoint_steps[-1:] if checkpoints == "last" else run.checkpoint_steps
    if not steps:
        log.warning("%s has no complete checkpoint; evaluating the base model only", path)
    evaluator = Evaluator(
        the_suite, subject, path, clip=clip or metrics.DEFAULT_CLIP, dino=dino, device=device
    )
    pipe = load_base(base_model)
    pipe.to(evaluator.clip.device)
    for step in tqdm([None, *steps], desc="eval", unit="model"):
        if step is None:
            evaluator.evaluate(pipe, 0, base=True)
        else:
            with apply_run_weights(pipe, run.path, step):
                evaluator.evaluate(pipe, step)
        evaluator.write()  # after every model: a long eval shows its progress in the dashboard
    report = evaluator.write()
    log.info(
        "wrote %s (best step %s, overfit %s)",
        out / "report.json",
        report["best_step"],
        report["overfit"],
    )
    return report
