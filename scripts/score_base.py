"""Measure a base pipeline on the toy world as the unet recipe's final evaluation does, without training.

    python scripts/score_base.py --model models/world-base --out runs/score-base
    python scripts/score_base.py --model models/world-base --vae runs/vae-dec-ft/export/vae --out DIR

400 seen-combination prompts, 200 held-out ones and the odd prompts, 25 DDIM steps at guidance 6 (the unet
recipe's defaults), each image read by the world judge (`tune.world.scoring.evaluate_generation`):
`<out>/unet.json`, `unet.md` (the tables) and `unet_grid.png` (64 images with the judge's verdicts).
`--vae` swaps in another VAE first, e.g. a decoder fine-tuned on the same encoder (`tune run vae
init_vae=... train_encoder=false`), whose latents are the U-Net's own.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from tune.errors import TuneError
from tune.models import load_pipeline
from tune.world.scoring import evaluate_generation, try_load_judge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/world-base", help="pipeline folder (default: %(default)s)")
    parser.add_argument("--vae", help="an AutoencoderKL folder to use instead of the pipeline's")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the report")
    parser.add_argument("--prompts", type=int, default=400, help="seen prompts (default: %(default)s)")
    parser.add_argument(
        "--draw-seed",
        type=int,
        default=0,
        help="0: the recipe's own prompts and noise; n > 0: another sample of them (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} already holds files; pass a new folder")
    try:
        pipe = load_pipeline(args.model, torch_dtype=torch.float32)
        if args.vae:
            vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32)
            if vae.config.latent_channels != pipe.vae.config.latent_channels:
                parser.error(
                    f"--vae has {vae.config.latent_channels} latent channels; the U-Net needs "
                    f"{pipe.vae.config.latent_channels}"
                )
            pipe.vae = vae
    except TuneError as error:
        parser.error(str(error))
    judge = try_load_judge()
    if judge is None:
        parser.error("no world judge in models/world-judge (make judge trains it)")
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "vae": args.vae}
    report = evaluate_generation(
        pipe,
        judge,
        args.out / "unet",
        report,
        prompts=args.prompts,
        odd_prompt_seeds=5,
        steps=25,
        guidance=6.0,
        draw_seed=args.draw_seed,
    )
    print(json.dumps({k: report[k]["overall"] for k in ("seen", "heldout")}), report["odd_prompts"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
