"""`make demo`: the main job end to end, offline, on this machine (several minutes on 2 CPU cores).

1. writes a few renders of the built-in toy world and checks them with the shared data loader;
2. samples the shipped base model (models/world-base): an image and its denoising film strip;
3. trains a LoRA on each example subject (concepts/sks-toy: 10 photos of a toy, concepts/w-person: of a
   person; the base model has seen neither) with the lora recipe's default config, which exports kohya
   and diffusers files (the two runs side by side, one torch thread each; their logs in train-*.log);
4. draws sks-toy's exported kohya file through `tune sample --lora` (the file A1111 and ComfyUI load),
   with the trigger's embedding (`--embedding`) when the config trains it (pivotal tuning);
5. scores each run's base model and last checkpoint on the backgrounds suite, as
   `tune eval RUN --suite backgrounds --checkpoints last` (report in RUN/eval/backgrounds/): subject found
   and background right, read by the world judge (models/world-judge; without it this step is skipped);
6. puts base and tuned of both subjects side by side on the concepts' validation prompts (background,
   surface and style; the recipe's step-0 samples are the base model, its last samples the tuned one:
   same prompts, same seeds) in compare.png.
Everything goes to runs/demo-<timestamp>/; the last lines give the figures, say where, and how to open
the dashboard.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tune import PROJECT_ROOT
from tune.cli import main as tune

log = logging.getLogger("demo")
SUBJECTS = ("sks-toy", "w-person")
BASE = PROJECT_ROOT / "models" / "world-base"
JUDGE = PROJECT_ROOT / "models" / "world-judge"
SUITE = "backgrounds"


def step(*args: str) -> None:
    log.info("$ tune %s", " ".join(args))
    code = tune(list(args))
    if code != 0:
        sys.exit(code)


def side_by_side(commands: Sequence[Sequence[str]], logs: Sequence[Path]) -> None:
    """Run `tune` commands at once, one torch thread each (on the 64 px base one thread trains a LoRA as
    fast as two: 121 s against 133 s, so two runs side by side take the time of one), each logging to its
    file; exit with the first failure's code after showing the end of its log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for args, path in zip(commands, logs, strict=True):
        log.info("$ tune %s   (log: %s)", " ".join(args), path)
        with path.open("w") as handle:  # the child keeps its own descriptor
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tune.cli", *args], stdout=handle, stderr=handle, env=env
                )
            )
    codes = [proc.wait() for proc in procs]
    for code, path in zip(codes, logs, strict=True):
        if code != 0:
            print(path.read_text()[-2000:], file=sys.stderr)
            sys.exit(code)


def template(prompt: str, token: str, class_word: str) -> str:
    """A validation prompt back as its template: "a drawing of sks toy" -> "a drawing of {token} {class}"."""
    prompt = prompt.replace(f"{token} {class_word}", "{token} {class}")
    return re.sub(rf"\b{re.escape(class_word)}\b", "{class}", prompt)


def compare(runs: Sequence[Path], out: Path) -> Path:
    """A base column (the step-0 samples) and a tuned column (the last samples) per run, one row per
    validation prompt, labelled with its template (the runs must share them)."""
    from PIL import Image

    from tune.evaluation import run_subject
    from tune.grids import make_grid
    from tune.runs import read_run

    columns: list[list[Image.Image]] = []
    col_labels: list[str] = []
    row_labels: list[str] = []
    for run in runs:
        info = read_run(run)
        subject = run_subject(info)
        first, last = info.samples_at(info.sample_steps[0]), info.samples_at(info.sample_steps[-1])
        index = json.loads((first / "prompts.json").read_text())
        templates = [template(p, subject.token, subject.class_word) for p in index["prompts"]]
        if row_labels and templates != row_labels:
            raise ValueError(f"{run} was sampled on other validation prompts than {runs[0]}")
        row_labels = templates
        names = [f"p{i:02d}_s{index['seeds'][0]}.png" for i in range(len(templates))]
        columns += [[Image.open(folder / name).convert("RGB") for name in names] for folder in (first, last)]
        col_labels += [
            f"{subject.token} {subject.class_word} base",
            f"{subject.token} {subject.class_word} tuned",
        ]
    images = [column[row] for row in range(len(row_labels)) for column in columns]
    make_grid(images, len(row_labels), len(columns), row_labels=row_labels, col_labels=col_labels).save(out)
    return out


def figures(run: Path) -> str:
    """Subject found and background right, base -> last checkpoint, from the run's backgrounds report."""
    from tune.evaluation import suite_eval_dir

    report = json.loads((suite_eval_dir(run, SUITE) / "report.json").read_text())
    base, tuned = report["base"], report["checkpoints"][-1]

    def pct(entry: dict, key: str) -> str:
        return "n/a" if entry.get(key) is None else f"{100 * entry[key]:.1f}%"

    return (
        ", ".join(
            f"{key.replace('_', ' ')} {pct(base, key)} -> {pct(tuned, key)}"
            for key in ("subject_found", "background_right")
        )
        + f" (base -> step {tuned['step']})"
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (BASE / "model_index.json").is_file():
        sys.exit(f"demo: {BASE} is missing; `git checkout models/` or rebuild it with `make base`")
    started = time.perf_counter()
    out = Path("runs") / f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True)

    step("data", "world", str(out / "world"), "--count", "24", "--seed", "0", "--workers", "1")
    step("data", "check", str(out / "world"), "--resolution", "64")
    ball = "a photo of a large red ball on a blue background"
    step(
        "sample",
        "--prompt",
        ball,
        *"--seed 3 --steps 25 --guidance 6 --trajectory 5".split(),
        "--out",
        str(out / "sample.png"),
    )

    runs = [out / f"lora-{name}" for name in SUBJECTS]
    train = [
        (
            "run",
            "lora",
            "--config",
            "default",
            f"concept={PROJECT_ROOT / 'concepts' / name}",
            f"output_dir={run}",
        )
        for name, run in zip(SUBJECTS, runs, strict=True)
    ]
    side_by_side(train, [out / f"train-{name}.log" for name in SUBJECTS])
    kohya = next(
        p for p in sorted((runs[0] / "export").glob("*.safetensors")) if p.name.startswith(runs[0].name)
    )
    toy = "a photo of sks toy on a blue background"
    token = runs[0] / "export" / "learned_embeds.safetensors"  # the trigger's embedding (pivotal tuning)
    step(
        "sample",
        "--lora",
        str(kohya),
        *(["--embedding", str(token)] if token.is_file() else []),
        "--prompt",
        toy,
        *"--seed 0 --steps 20 --guidance 2".split(),  # the lora default's sample.guidance, as tune eval draws it
        "--out",
        str(out / "sks_toy_blue.png"),
    )
    judged = (JUDGE / "model.safetensors").is_file()
    if judged:
        evals = [("eval", str(run), "--suite", SUITE, "--checkpoints", "last") for run in runs]
        side_by_side(evals, [out / f"eval-{name}.log" for name in SUBJECTS])
    sheet = compare(runs, out / "compare.png")

    minutes = (time.perf_counter() - started) / 60
    log.info("demo done in %.1f min; results in %s:", minutes, out)
    if judged:
        for name, run in zip(SUBJECTS, runs, strict=True):
            log.info("  %s on the %s suite: %s", name, SUITE, figures(run))
    else:
        log.info("  no world judge in %s: no subject-found / background-right figures (`make judge`)", JUDGE)
    log.info("  %s  base vs LoRA of both subjects on the concepts' validation prompts", sheet)
    log.info(
        "  %s  the exported kohya LoRA (A1111, ComfyUI), drawn through tune sample", out / "sks_toy_blue.png"
    )
    for run in runs:
        log.info("  %s  validation grids (step 0 is the base), LoRA files in export/", run)
        if judged:
            log.info("  %s  the %s report, its images beside it", run / "eval" / SUITE / "report.md", SUITE)
    log.info(
        "  %s  and %s  the base model and its film strip", out / "sample.png", out / "sample_trajectory.png"
    )
    log.info("open the dashboard: tune dashboard --runs %s   (or .venv/bin/tune ...)", out)


if __name__ == "__main__":
    main()
