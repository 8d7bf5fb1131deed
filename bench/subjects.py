"""The default configs on subjects they were not tuned on: the world's three extra subjects.

    python bench/subjects.py [--subjects yellow-cup blue-cone red-ball] [--recipes lora dreambooth]
        [--photos 8] [--suites backgrounds] [--jobs 2] [--name NAME] [--keep DIR] [--collect DIR]
        [--set KEY=VALUE ...]

For each subject of `tune.world.subjects.SUBJECTS` named (by default the three besides the shipped
sks-toy and w-person: a yellow cup with purple spots, a blue and orange striped cone, a red ball with
white spots, each a look held out of the base), the script renders `--photos` photos with their caption
sidecars and a concept folder like the shipped ones (concept.toml: the subject's token and class word,
prior preservation on), runs each recipe with `--config default` (and `--set`'s values, as `tune run`
takes them: `--set prior.guidance=3.0`) on it and `tune eval --suite S
--checkpoints last` for each suite, `--jobs` runs at a time, each on one torch thread. It prints one row
per subject, recipe and suite (subject found, background right, style right, the subject without the
trigger for the drift suite, training seconds) and
writes bench/results/subjects-<name>.json (rows of another subject, recipe or suite already there are
kept; each row names the commit it was measured at). The concept folders and runs go to a temporary folder, or
to `--keep DIR` to look at the images afterwards (DIR/runs/<subject>-<recipe>/eval/<suite>/);
`--collect DIR` reads the rows of such kept runs again without training (their settings from each run's
run.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXTRA = ("yellow-cup", "blue-cone", "red-ball")
CONCEPT = """\
# Written by bench/subjects.py: {description}.
token = "{token}"
class_word = "{class_word}"
instance_dir = "photos"
instance_prompt = "a photo of {{token}} {{class}}"
class_prompt = "a photo of {{class}}"
# the shipped concepts' validation prompts: what the samples show and prior.from_prompts draws
validation_prompts = {validation_prompts}

[prior_preservation]
enabled = true
num_class_images = 100
prior_loss_weight = 1.0
"""


def shipped_validation_prompts() -> list[str]:
    """The templates concepts/sks-toy (and w-person) ship ("a photo of {token} {class}", ...)."""
    return tomllib.loads((ROOT / "concepts" / "sks-toy" / "concept.toml").read_text())["validation_prompts"]


def write_concept(name: str, folder: Path, photos: int) -> Path:
    """concepts/<name>-like folder: photos with caption sidecars and concept.toml."""
    from tune.world.subjects import SUBJECTS, write_photos

    subject = SUBJECTS[name]
    concept = folder / name
    write_photos(subject, concept / "photos", count=photos)
    (concept / "concept.toml").write_text(
        CONCEPT.format(
            description=subject.description,
            token=subject.token,
            class_word=subject.class_word,
            validation_prompts=json.dumps(shipped_validation_prompts()),  # a JSON array of strings is TOML
        )
    )
    return concept


def run_one(
    concept: Path, recipe: str, suites: list[str], runs: Path, log: Path, settings: list[str]
) -> list[dict[str, Any]]:
    """Train `recipe` with its default config (and `settings`, KEY=VALUE) on `concept`, evaluate each suite;
    one row per suite."""
    out = runs / f"{concept.name}-{recipe}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    tune = [sys.executable, "-m", "tune.cli"]
    with log.open("w") as f:
        start = time.time()
        command = [*tune, "run", recipe, "--config", "default", f"concept={concept}", f"output_dir={out}"]
        command += settings
        subprocess.run(command, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
        train_s = time.time() - start
        for suite in suites:
            command = [*tune, "eval", str(out), "--suite", suite, "--checkpoints", "last"]
            subprocess.run(command, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return rows_of(out, concept.name, recipe, suites, round(train_s, 1))


def rows_of(
    run: Path, subject: str, recipe: str, suites: list[str], train_s: float | None
) -> list[dict[str, Any]]:
    """One row per suite from the run's eval reports (the last checkpoint, and the base's subject found), with
    the guidance they were drawn at and the settings the run was trained with."""
    from tune.evaluation import suite_eval_dir

    settings = settings_of(run)
    rows = []
    for suite in suites:
        report = json.loads((suite_eval_dir(run, suite) / "report.json").read_text())
        last = report["checkpoints"][-1]
        rows.append(
            {
                "subject": subject,
                "recipe": recipe,
                "suite": suite,
                "step": last["step"],
                "train_s": train_s,
                **{
                    k: last[k]
                    for k in ("subject_found", "background_right", "style_right", "subject_in_others")
                },
                "base_subject_found": report["base"]["subject_found"],
                "guidance": report.get("guidance"),  # what the eval drew at (the run's own, or --guidance)
                "settings": settings,
            }
        )
    return rows


def share(value: float | None, width: int) -> str:
    """A share as a percentage, or "-" where the suite does not measure it (drift: no subject found)."""
    return f"{value:>{width}.1%}" if value is not None else f"{'-':>{width}}"


def train_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Render each subject's concept, then train and evaluate each recipe on it, `--jobs` at a time."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tune-subjects-") as tmp:
        work = args.keep or Path(tmp)
        concepts = [write_concept(name, work / "concepts", args.photos) for name in args.subjects]
        (work / "runs").mkdir(parents=True, exist_ok=True)
        jobs = [(c, r) for r in args.recipes for c in concepts]
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(run_one, c, r, args.suites, work / "runs", work / f"{c.name}-{r}.log", args.set)
                for c, r in jobs
            ]
            for (c, r), future in zip(jobs, futures, strict=True):
                try:
                    rows += future.result()
                except subprocess.CalledProcessError:
                    print(f"{c.name} / {r} failed; see {work / f'{c.name}-{r}.log'}", flush=True)
    return rows


def settings_of(run: Path) -> list[str]:
    """The KEY=VALUE values a kept run was trained with over the default config, from its command line
    (run.json's argv), without the concept and output folder that `run_one` itself passes."""
    argv = json.loads((run / "run.json").read_text()).get("argv", [])
    mine = ("concept=", "output_dir=")
    return [a for a in argv if "=" in a and not a.startswith("-") and not a.startswith(mine)]


def collect(folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of the runs an earlier `--keep folder` left (their eval reports; no training seconds)."""
    runs = [(n, r, folder / "runs" / f"{n}-{r}") for r in args.recipes for n in args.subjects]
    return [row for n, r, run in runs if run.is_dir() for row in rows_of(run, n, r, args.suites, None)]


def main() -> None:
    from tune.world.subjects import SUBJECTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="+", default=list(EXTRA), choices=sorted(SUBJECTS))
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["lora", "dreambooth"],
        choices=["lora", "dreambooth", "textual_inversion"],
    )
    parser.add_argument("--photos", type=int, default=8, help="photos per subject (default 8)")
    parser.add_argument("--suites", nargs="+", default=["backgrounds"])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--name", default="extra", help="results file: bench/results/subjects-NAME.json")
    parser.add_argument("--keep", type=Path, help="keep concepts and runs here (default: a temporary folder)")
    parser.add_argument(
        "--collect",
        type=Path,
        help="train nothing: read the rows from the runs an earlier --keep DIR holds (no training seconds)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="values over the default config, as tune run takes them (prior.guidance=3.0)",
    )
    args = parser.parse_args()
    if bad := [v for v in args.set if "=" not in v]:
        parser.error(f"--set takes KEY=VALUE; got {bad[0]!r}")

    rows = collect(args.collect, args) if args.collect else train_all(args)
    print(f"{'subject':<12} {'recipe':<18} {'suite':<12}  found  background   style  drift  train s")
    for row in rows:
        seconds = f"{row['train_s']:>7.0f}" if row["train_s"] is not None else f"{'-':>7}"
        print(
            f"{row['subject']:<12} {row['recipe']:<18} {row['suite']:<12} {share(row['subject_found'], 6)}"
            f"  {share(row['background_right'], 10)}  {share(row['style_right'], 6)}"
            f"  {share(row['subject_in_others'], 5)}  {seconds}"
        )
    from tune.paths import source_commit

    commit = source_commit()
    for row in rows:
        row["commit"] = commit  # the configs and code the row was measured with
    out = ROOT / "bench" / "results" / f"subjects-{args.name}.json"
    if out.is_file():  # a rerun of some subjects or recipes replaces their rows and keeps the others
        ran = {(r["subject"], r["recipe"], r["suite"]) for r in rows}
        old = json.loads(out.read_text())["rows"]
        rows = [r for r in old if (r["subject"], r["recipe"], r["suite"]) not in ran] + rows
    out.write_text(json.dumps({"photos": args.photos, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
