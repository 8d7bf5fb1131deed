"""Score a finished vae run's export again, as its final evaluation does, without training.

    python scripts/score_vae.py runs/base-vae

For a world or judge that changed after the run: the run's `export/vae` reconstructs fresh renders of the
current renderer (the run's own eval_images and eval_seed) and the example subjects' photos, the current
judge (models/world-judge) reads them, and the run's `eval/vae.json` gets the new figures; its training
record (steps, times, latent statistics) is kept, the figures it replaces go under "previous", and
"rescored" says at which commit. scripts/ship_base.py reads that file for the base model's card.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from tune.paths import source_commit
from tune.world.reconstruction import evaluate_reconstructions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished vae run (its export/vae and eval/vae.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    report_path, vae_dir = args.run / "eval" / "vae.json", args.run / "export" / "vae"
    if not report_path.is_file() or not (vae_dir / "config.json").is_file():
        parser.error(f"{args.run} is not a finished vae run (no eval/vae.json or export/vae)")
    report = json.loads(report_path.read_text())
    resolution = AutoencoderKL.load_config(vae_dir).get("sample_size", 64)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        figures = evaluate_reconstructions(vae, report["eval_images"], report["eval_seed"], resolution)
    previous = {k: report[k] for k in figures if k in report}
    report |= figures | {"previous": previous, "rescored": source_commit() or "unknown"}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"PSNR {figures['psnr_db']:.2f} dB; judge agreement {figures.get('judge_agreement', 'n/a')}; "
        + ", ".join(
            f"{name} found {figures[f'{name}_found']}/{figures[f'{name}_photos']}"
            for name in ("sks-toy", "w-person")
            if f"{name}_found" in figures
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
