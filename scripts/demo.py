"""`make demo`: the best end-to-end job tune has today, on this machine, offline.

1. writes a small built-in shapes dataset and checks it with the shared data loader;
2. takes the shipped base model (models/shapes-base) or, until it ships, builds the untrained "small"
   preset (SD1.5 module topology) and saves it as a diffusers folder;
3. samples with the shared sampler: an image, a prompts x seeds grid and a denoising film strip.
Results go to runs/demo-<timestamp>/.
"""

from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

from tune.cli import PROJECT_ROOT
from tune.cli import main as tune

log = logging.getLogger("demo")


def step(*args: str) -> None:
    log.info("$ tune %s", " ".join(args))
    code = tune(list(args))
    if code != 0:
        sys.exit(code)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path("runs") / f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True)

    step("data", "shapes", str(out / "shapes"), "--count", "24", "--seed", "0")
    step("data", "check", str(out / "shapes"), "--resolution", "64")

    model = PROJECT_ROOT / "models" / "shapes-base"
    if not (model / "model_index.json").exists():
        from tune.models import build_pipeline

        model = out / "base-untrained"
        log.info("models/shapes-base is not shipped yet: building the untrained 'small' preset at %s", model)
        build_pipeline("small", seed=0).save_pretrained(model)

    prompt = "a large red circle on a blue background"
    step(
        "sample",
        "--model",
        str(model),
        "--prompt",
        prompt,
        "--seed",
        "3",
        "--steps",
        "25",
        "--trajectory",
        "5",
        "--out",
        str(out / "sample.png"),
    )

    from tune.models import load_pipeline
    from tune.sampling import sample_grid

    prompts = [prompt, "a small yellow star on a black background in the top left"]
    sample_grid(load_pipeline(str(model)), prompts, [0, 1, 2], out / "grid", steps=25, guidance=6.0)
    log.info("demo results in %s: sample.png, sample_trajectory.png, grid/grid.png, shapes/", out)


if __name__ == "__main__":
    main()
