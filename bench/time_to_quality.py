"""Time to quality: how long each side trains a LoRA before the tuned model draws the subject.

    python bench/time_to_quality.py [--concept concepts/sks-toy] [--every 100] [--max-steps 400]
        [--suite backgrounds] [--found 0.8] [--background 0.8] [--threads 1] [--name NAME]

Both sides train a LoRA on the shipped base (models/world-base) from the same photos (the concept's),
with our default lora config's rank, targets and blocks, learning rate and batch size:
- ours: `recipes.lora.main` with `--config default` (cached latents and text, the photos' caption
  sidecars), a checkpoint every `--every` steps, each scored afterwards by `tune eval`'s evaluator;
- the baseline: bench/baseline_loop.py's loop, written the way diffusers' example scripts are (no caching,
  the VAE and text encoder every step, the one instance prompt for every photo), scored in the loop
  every `--every` steps by the same evaluator, with its clock stopped while it draws.
Scoring is the suite's prompts and seeds judged by the world judge (subject found, background right).
Prints, for each side, the training seconds to the first scored step with subject found >= `--found`
and background right >= `--background` (or "not reached") and writes
bench/results/time-to-quality-<name>.json with every scored step. Run it on otherwise idle cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import baseline_loop  # noqa: E402  (the diffusers-example loop)
import train_speed  # noqa: E402  (the machine description, the results folder)

BASE = "models/world-base"


def reached(points: list[dict[str, Any]], found: float, background: float) -> float | None:
    """Training seconds of the first scored step that meets both figures, else None."""
    for p in points:
        if p["subject_found"] >= found and p["background_right"] >= background:
            return p["train_s"]
    return None


def run_ours(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from recipes import lora
    from tune.config import load_config
    from tune.evaluation import evaluate_run
    from tune.runs import read_metrics

    overrides = [
        f"concept={args.concept}",
        f"output_dir={work / 'ours'}",
        f"data.cache_dir={work / 'cache'}",
        f"max_steps={args.max_steps}",
        f"checkpoint_every={args.every}",
        "checkpoints_keep=0",  # every scored step's checkpoint stays
        "sample_every=0",
        f"seed={args.seed}",
        *args.set,
    ]
    cfg = load_config(lora.Config, ROOT / "recipes/configs/lora/default.toml", overrides)
    start = time.time()
    run = lora.main(cfg)
    rows = {m["step"]: m["time"] for m in read_metrics(run.path / "metrics.jsonl") if "loss" in m}
    report = evaluate_run(run.path, args.suite, checkpoints="all")
    return [
        {
            "step": c["step"],
            "train_s": rows[c["step"]] - start,
            "subject_found": c["subject_found"],
            "background_right": c["background_right"],
        }
        for c in report["checkpoints"]
    ]


def run_baseline(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from recipes import lora
    from tune import metrics
    from tune.config import load_config
    from tune.data.concepts import load_concept
    from tune.data.masks import is_mask_file
    from tune.evaluation import EvalSubject, Evaluator, load_suite
    from tune.lora.inject import unet_target_pattern
    from tune.personalize import load_base

    # --set's values too: the same rank, rate and batch as ours, and the same guidance to score at
    cfg = load_config(
        lora.Config, ROOT / "recipes/configs/lora/default.toml", [f"concept={args.concept}", *args.set]
    )
    concept = load_concept(args.concept)
    photos = work / "photos"  # the example scripts read every file of the folder: the images only
    photos.mkdir()
    for path in sorted(concept.instance_dir.iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and not is_mask_file(path):
            shutil.copy(path, photos / path.name)
    evaluator = Evaluator(
        load_suite(args.suite).drawn_at(cfg.sample.guidance),  # as evaluate_run draws ours
        EvalSubject(concept.token, concept.class_word, concept.instance_dir),
        work / "baseline",
        clip=metrics.DEFAULT_CLIP,
    )
    pipe = load_base(BASE)
    baseline_args = argparse.Namespace(
        recipe="lora",
        base=str(ROOT / BASE),
        photos_dir=str(photos),
        resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        batch_size=cfg.batch_size,
        rank=cfg.lora.rank,
        warmup=0,
        steps=args.max_steps,
        mixed_precision="no",
        seed=args.seed,
    )
    points: list[dict[str, Any]] = []
    paused = 0.0  # seconds spent scoring, off the training clock
    start = time.time()

    def on_step(step: int, unet: Any) -> None:
        nonlocal paused
        if step % args.every and step != args.max_steps:
            return
        now = time.time()
        pipe.unet = unet
        entry = evaluator.evaluate(pipe, step, modules=[unet], progress=False)
        points.append(
            {
                "step": step,
                "train_s": now - start - paused,
                "subject_found": entry["subject_found"],
                "background_right": entry["background_right"],
            }
        )
        paused += time.time() - now
        print(f"  baseline step {step}: subject found {entry['subject_found']:.1%}", flush=True)

    baseline_loop.run_baseline(
        baseline_args,
        work,
        on_step=on_step,
        prompt=concept.instance_caption,
        lr=cfg.optim.lr,
        lora_targets=unet_target_pattern(cfg.lora.targets, cfg.lora.blocks),
    )
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="concepts/sks-toy", help="concept folder (default: sks-toy)")
    parser.add_argument("--every", type=int, default=100, help="score every this many steps")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--suite", default="backgrounds", help="eval suite (default: backgrounds)")
    parser.add_argument("--found", type=float, default=0.8, help="subject found to reach (default 0.8)")
    parser.add_argument("--background", type=float, default=0.8, help="background right to reach")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="", help="results file suffix (default: the concept's name)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="key=value settings for our recipe, on its default config (the baseline takes its rank, rate, "
        "batch size and guidance from the same)",
    )
    parser.add_argument("--sides", nargs="+", default=["ours", "baseline"], choices=["ours", "baseline"])
    parser.add_argument(
        "--keep", type=Path, help="keep the runs and scored images here (default: a temporary folder)"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sides: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="tune-ttq-") as tmp:
        for side, run in (("ours", run_ours), ("baseline", run_baseline)):
            if side not in args.sides:
                continue
            print(f"{side} ...", flush=True)
            work = (args.keep or Path(tmp)) / side
            work.mkdir(parents=True)
            sides[side] = run(args, work)
    result: dict[str, Any] = {
        "concept": args.concept,
        "suite": args.suite,
        "set": args.set,
        "target": {"subject_found": args.found, "background_right": args.background},
        "machine": train_speed.machine(args.threads),
    }
    for side, points in sides.items():
        seconds = reached(points, args.found, args.background)
        result[side] = {"points": points, "time_to_target_s": seconds}
        best = max(points, key=lambda p: p["subject_found"])
        when = f"{seconds:.0f} s" if seconds is not None else "not reached"
        print(
            f"{side:>8}: time to subject found >= {args.found:.0%} with background right >= "
            f"{args.background:.0%}: {when}; best subject found {best['subject_found']:.1%} "
            f"at step {best['step']} ({best['train_s']:.0f} s of training)"
        )
    name = args.name or Path(args.concept).name
    out = train_speed.RESULTS / f"time-to-quality-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
