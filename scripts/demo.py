"""`make demo`: the main job end to end, offline, on this machine (a few minutes on 2 CPU cores).

1. writes a few renders of the built-in toy world and checks them with the shared data loader;
2. samples the shipped base model (models/world-base): an image and its denoising film strip;
3. trains a LoRA on the example concept (concepts/sks-toy: 10 photos of a toy the base model has never
   seen) with the lora recipe's default config, which exports kohya and diffusers files;
4. draws the exported kohya file through `tune sample --lora` (the file A1111 and ComfyUI load);
5. puts base and tuned side by side on the concept's validation prompts (the recipe's step-0 samples are
   the base model, its last samples the tuned one: same prompts, same seeds) in compare.png.
Everything goes to runs/demo-<timestamp>/; the last lines say where, and how to open the dashboard.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from pathlib import Path

from tune import PROJECT_ROOT
from tune.cli import main as tune

log = logging.getLogger("demo")
CONCEPT = PROJECT_ROOT / "concepts" / "sks-toy"
BASE = PROJECT_ROOT / "models" / "world-base"


def step(*args: str) -> None:
    log.info("$ tune %s", " ".join(args))
    code = tune(list(args))
    if code != 0:
        sys.exit(code)


def compare(run: Path, out: Path) -> Path:
    """Base (the step-0 samples) next to tuned (the last samples), one row per validation prompt."""
    from PIL import Image

    from tune.grids import make_grid
    from tune.runs import read_run

    steps = read_run(run).sample_steps
    first, last = run / "samples" / f"step_{steps[0]:06d}", run / "samples" / f"step_{steps[-1]:06d}"
    index = json.loads((first / "prompts.json").read_text())
    seed = index["seeds"][0]
    images, labels = [], []
    for i, prompt in enumerate(index["prompts"]):
        name = f"p{i:02d}_s{seed}.png"
        images += [Image.open(first / name).convert("RGB"), Image.open(last / name).convert("RGB")]
        labels.append(prompt)
    grid = make_grid(images, len(labels), 2, row_labels=labels, col_labels=["base", f"lora step {steps[-1]}"])
    grid.save(out)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not (BASE / "model_index.json").is_file():
        sys.exit(f"demo: {BASE} is missing; `git checkout models/` or rebuild it with `make base`")
    started = time.perf_counter()
    out = Path("runs") / f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True)

    step("data", "world", str(out / "world"), "--count", "24", "--seed", "0", "--workers", "1")
    step("data", "check", str(out / "world"), "--resolution", "64")
    step(
        "sample",
        "--prompt",
        "a photo of a large red ball on a blue background",
        "--seed",
        "3",
        "--steps",
        "25",
        "--guidance",
        "6",
        "--trajectory",
        "5",
        "--out",
        str(out / "sample.png"),
    )

    lora_run = out / "lora-sks-toy"
    step("run", "lora", "--config", "default", f"concept={CONCEPT}", f"output_dir={lora_run}")
    kohya = next(
        p for p in sorted((lora_run / "export").glob("*.safetensors")) if p.name.startswith(lora_run.name)
    )
    step(
        "sample",
        "--lora",
        str(kohya),
        "--prompt",
        "a photo of sks toy on a blue background",
        "--seed",
        "0",
        "--steps",
        "20",
        "--guidance",
        "6",
        "--out",
        str(out / "sks_toy_blue.png"),
    )
    side_by_side = compare(lora_run, out / "compare.png")

    minutes = (time.perf_counter() - started) / 60
    log.info("demo done in %.1f min; results in %s:", minutes, out)
    log.info("  %s  base (left) vs LoRA (right) on the concept's validation prompts", side_by_side)
    log.info(
        "  %s  the exported kohya LoRA (A1111, ComfyUI), drawn through tune sample", out / "sks_toy_blue.png"
    )
    log.info("  %s  every validation grid of the run (step 0 is the base model)", lora_run / "samples")
    log.info("  %s  the LoRA files (kohya and diffusers formats)", lora_run / "export")
    log.info(
        "  %s  and %s  the base model and its film strip", out / "sample.png", out / "sample_trajectory.png"
    )
    log.info("open the dashboard: tune dashboard --runs %s   (or .venv/bin/tune ...)", out)


if __name__ == "__main__":
    main()
