"""What the dashboard shows, read from run directories: pure Python, no Streamlit, no torch.

Everything here goes through `tune.runs` (read_run / list_runs) and the files that module and
`tune.sampling` document: samples/step_XXXXXX/ (p{i:02d}_s{seed}.png, prompts.json, optional
*_trajectory.png) and metrics.jsonl; the eval reports are read by dashboard/eval_reports.py and export
files described by dashboard/export_page.py. The Streamlit app (app.py) only lays these out.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune.data.masks import is_mask_file
from tune.paths import find_path
from tune.runs import RunInfo, list_runs, read_run, step_dir_name

RUNS_ENV = "TUNE_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SAMPLE_NAME = re.compile(r"^p(\d+)_s(-?\d+)\.png$")
NO_STYLE = "(plain)"
"""The style of a prompt that is only the subject, e.g. "a photo of sks toy"."""


def runs_dir() -> Path:
    """The runs folder: $TUNE_RUNS_DIR (what `tune dashboard --runs` sets), else ./runs."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR)


def load_runs(root: str | Path) -> list[RunInfo]:
    return list_runs(root)


def load_run(path: str | Path) -> RunInfo:
    return read_run(path)


def run_name(run: RunInfo, root: str | Path) -> str:
    """The run folder relative to the runs folder (runs may sit one level down, e.g. sweep/lr-1e-4)."""
    try:
        return str(run.path.relative_to(root))
    except ValueError:
        return run.path.name


# ---------------------------------------------------------------------------------------------
# Runs page
# ---------------------------------------------------------------------------------------------


def _setting(run: RunInfo, key: str) -> Any:
    """A fact from run.json, else from config.toml (run.json holds resolved values, e.g. concept paths)."""
    value = run.info.get(key)
    return value if value not in (None, "") else run.config.get(key)


def base_model(run: RunInfo) -> str:
    return str(_setting(run, "base_model") or "")


def concept_label(run: RunInfo) -> str:
    """The concept's name, else its folder, else the photo folder ("" for runs without a subject)."""
    name = run.info.get("concept_name") or _setting(run, "concept")
    if name:
        return Path(str(name)).name
    return str(_setting(run, "instance_dir") or "")


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


def run_row(run: RunInfo, root: str | Path) -> dict[str, Any]:
    """One row of the runs table."""
    max_steps = run.info.get("max_steps") or run.config.get("max_steps")
    last = run.last_step
    steps = "" if last is None else f"{last}/{max_steps}" if max_steps else str(last)
    return {
        "run": run_name(run, root),
        "recipe": run.recipe,
        "base model": base_model(run),
        "concept": concept_label(run),
        "status": run.status,
        "steps": steps,
        "time": format_duration(run.duration_s),
        "started": str(run.info.get("started_at", "")),
        "samples": len(run.sample_steps),
        "exports": len(run.exports),
    }


def loss_points(run: RunInfo, max_points: int = 2000) -> list[dict[str, Any]]:
    """{"step", "metric", "value"} rows of every numeric metric whose name contains "loss" (the training
    `loss`, the held-out photos' `val_loss`, ...), each thinned to about `max_points` points so long runs
    stay light in the browser. The metrics come in rows of their own (val_loss every val_every steps),
    so each keeps only its own points: a line per metric, without gaps."""
    keys = sorted(
        {k for m in run.metrics for k, v in m.items() if "loss" in k and isinstance(v, int | float)}
    )
    points = []
    for key in keys:
        rows = [
            m for m in run.metrics if isinstance(m.get("step"), int) and isinstance(m.get(key), int | float)
        ]
        stride = max(1, math.ceil(len(rows) / max_points))
        points += [{"step": m["step"], "metric": key, "value": float(m[key])} for m in rows[::stride]]
    return points


# ---------------------------------------------------------------------------------------------
# Sample folders (the tune.sampling.sample_grid layout)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleImage:
    step: int
    prompt_index: int
    prompt: str
    seed: int
    path: Path
    trajectory: Path | None = None


@dataclass
class SampleSet:
    """One samples/step_XXXXXX/ folder (or an eval images folder of the same layout)."""

    step: int
    label: str
    folder: Path
    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    images: list[SampleImage] = field(default_factory=list)


def read_sample_set(folder: str | Path, step: int, label: str | None = None) -> SampleSet | None:
    """The images of one sample folder, from its prompts.json, else from the file names alone
    (a folder being written has images before its index). None when it holds no sample image."""
    folder = Path(folder)
    label = label or ("base" if step == 0 else step_dir_name(step))
    if not folder.is_dir():
        return None
    index: dict[str, Any] = {}
    try:
        loaded = json.loads((folder / "prompts.json").read_text(encoding="utf-8"))
        index = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    prompts = [str(p) for p in index.get("prompts", [])]
    images: list[SampleImage] = []
    for entry in index.get("images", []):
        try:
            path = folder / str(entry["file"])
            i, seed = int(entry["prompt_index"]), int(entry["seed"])
        except (KeyError, TypeError, ValueError):
            continue
        if not path.is_file():
            continue
        traj = entry.get("trajectory")
        traj_path = folder / str(traj) if traj and (folder / str(traj)).is_file() else None
        prompt = str(entry.get("prompt") or (prompts[i] if i < len(prompts) else f"prompt {i}"))
        images.append(SampleImage(step, i, prompt, seed, path, traj_path))
    if not images:  # no usable index: the file names say prompt index and seed
        for path in sorted(folder.glob("p*_s*.png")):
            m = _SAMPLE_NAME.match(path.name)
            if not m:
                continue
            i, seed = int(m.group(1)), int(m.group(2))
            traj_path = path.with_name(f"{path.stem}_trajectory.png")
            prompt = prompts[i] if i < len(prompts) else f"prompt {i}"
            images.append(
                SampleImage(step, i, prompt, seed, path, traj_path if traj_path.is_file() else None)
            )
    if not images:
        return None
    seeds = [int(s) for s in index.get("seeds", [])] or sorted({im.seed for im in images})
    settings = {k: v for k, v in index.items() if k not in ("prompts", "seeds", "images", "grid")}
    return SampleSet(
        step, label, folder, prompts or _unique(im.prompt for im in images), seeds, settings, images
    )


def sample_sets(run: RunInfo) -> dict[int, SampleSet]:
    """step -> its validation samples (step 0 is the base model for the personalization recipes)."""
    sets = {}
    for step in run.sample_steps:
        s = read_sample_set(run.samples_at(step), step)
        if s is not None:
            sets[step] = s
    return sets


def _unique(items: Any) -> list[Any]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# Compare page: rows = prompt x seed, columns = base + checkpoints
# ---------------------------------------------------------------------------------------------


def subject_phrases(run: RunInfo) -> list[str]:
    """Ways the subject is written in this run's prompts, longest first (to cut out of a prompt)."""
    trigger = str(run.info.get("trigger") or run.config.get("token") or "")
    phrases = [str(run.info.get("instance_prompt") or run.config.get("instance_prompt") or "")]
    class_prompt = str(run.info.get("class_prompt") or run.config.get("class_prompt") or "")
    phrases.append(class_prompt)
    class_word = class_prompt.split()[-1] if class_prompt else ""
    if trigger:
        phrases += [f"{trigger} {class_word}".strip(), trigger]
    return sorted({p for p in phrases if p}, key=len, reverse=True)


_STYLE_SPLIT = re.compile(r"(,\s*|\s+(?:on|in|with|at|under|wearing|by)\s+)", re.IGNORECASE)


def prompt_style(prompt: str, subjects: list[str] | tuple[str, ...] = ()) -> str:
    """The words around the subject: "a photo of sks toy on a red background" -> "on a red background".

    Without a known subject phrase in the prompt, the style is what follows the first ", " / " on " /
    " in " / " with " ... ("a large red circle on a blue background" -> "on a blue background").
    A prompt that is only its subject has the style NO_STYLE.
    """
    text = " ".join(prompt.split())
    for phrase in subjects:
        at = text.lower().find(phrase.lower())
        if at >= 0:
            rest = (text[:at] + " " + text[at + len(phrase) :]).strip(" ,.;")
            return " ".join(rest.split()) or NO_STYLE
    m = _STYLE_SPLIT.search(text)
    if not m:
        return NO_STYLE
    return text[m.end() :].strip(" ,.;") if m.group(1).strip() == "," else text[m.start() :].strip(" ,.;")


@dataclass(frozen=True)
class CompareRow:
    prompt: str
    style: str
    seed: int
    cells: dict[int, SampleImage]
    """column step -> image (missing where that step has no image of this prompt and seed)."""


def compare_rows(
    sets: dict[int, SampleSet],
    subjects: list[str] | tuple[str, ...] = (),
    styles: dict[str, str] | None = None,
) -> list[CompareRow]:
    """One row per (prompt, seed) found in any column, in prompt order then seed order. Images match
    across columns by prompt text and seed, so a checkpoint drawn with other prompts lines up too.
    `styles` (prompt -> style, e.g. an eval suite's style field) wins over `prompt_style`."""
    by_key: dict[tuple[str, int], dict[int, SampleImage]] = {}
    order: dict[str, tuple[int, int]] = {}
    for step in sorted(sets):
        for im in sets[step].images:
            by_key.setdefault((im.prompt, im.seed), {})[step] = im
            order.setdefault(im.prompt, (step, im.prompt_index))
    keys = sorted(by_key, key=lambda k: (order[k[0]][1], order[k[0]][0], k[1]))
    styles = styles or {}
    return [
        CompareRow(prompt, styles.get(prompt) or prompt_style(prompt, subjects), seed, by_key[(prompt, seed)])
        for prompt, seed in keys
    ]


def filter_rows(
    rows: list[CompareRow],
    text: str = "",
    styles: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[CompareRow]:
    """Rows whose prompt contains `text` (case-insensitive; every word must appear) and whose style and
    seed are among those chosen (None = all)."""
    words = text.lower().split()
    return [
        r
        for r in rows
        if all(w in r.prompt.lower() for w in words)
        and (styles is None or r.style in styles)
        and (seeds is None or r.seed in seeds)
    ]


def default_columns(steps: list[int], most: int = 5) -> list[int]:
    """The first column (base) plus up to `most - 1` later steps spread evenly, always the last one."""
    if len(steps) <= most:
        return list(steps)
    rest, n = steps[1:], most - 1
    return [steps[0], *sorted({rest[round(i * (len(rest) - 1) / (n - 1))] for i in range(n)})]


def column_label(step: int) -> str:
    return "base (step 0)" if step == 0 else f"step {step}"


# ---------------------------------------------------------------------------------------------
# Concept photos
# ---------------------------------------------------------------------------------------------


def concept_photos(run: RunInfo, limit: int = 24) -> list[Path]:
    """The subject's photos: run.json's instance_dir, else config's instance_dir, else the concept
    folder's (its concept.toml names the photo folder, "photos" by default)."""
    folders = []
    for value in (run.info.get("instance_dir"), run.config.get("instance_dir")):
        if value:
            folders.append(find_path(str(value)))
    concept = _setting(run, "concept")
    if concept:
        root = find_path(str(concept))
        sub = "photos"
        try:
            sub = str(
                tomllib.loads((root / "concept.toml").read_text(encoding="utf-8")).get("instance_dir", sub)
            )
        except (OSError, ValueError):
            pass
        folders.append(root / sub)
    for folder in folders:
        if folder.is_dir():
            photos = sorted(
                p
                for p in folder.iterdir()
                if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file() and not is_mask_file(p)
            )
            if photos:
                return photos[:limit]
    return []


# ---------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------


def trajectory_of(image: SampleImage) -> Path | None:
    return image.trajectory if image.trajectory and image.trajectory.is_file() else None
