"""Ship the base model: the base runs' exports -> models/world-base and models/world-clip (fp16).

    python scripts/ship_base.py                     # runs/base-{vae,clip,unet} -> models/
    python scripts/ship_base.py --runs DIR --out DIR [--note TEXT]

A U-Net retrained on the shipped CLIP (its clip run gone) ships without a base-clip run: models/world-clip
is kept, its retrieval figures are measured again for the card, and the stage rows of runs that are gone
are kept from the card being replaced (marked as carried over).

`make base` trains the three runs (data, vae, clip, unet) and then calls this. It writes:
- models/world-base/: the U-Net run's Stable Diffusion pipeline folder (vae/, text_encoder/, tokenizer/,
  unet/, scheduler/, model_index.json) with fp16 safetensors, which plain
  `StableDiffusionPipeline.from_pretrained(path)` loads;
- models/world-clip/: the CLIP run's transformers CLIPModel (text and image towers) in fp16 plus its
  tokenizer and image-processor files (`CLIPModel.from_pretrained(path)`), the judge `tune eval` uses;
- a MODEL_CARD.md in each, with the commands, the data seed, each stage's training time and the
  measured figures, read from the runs' run.json and eval/ reports (nothing typed in by hand).

A folder that is already there is replaced only with --force: every commit of weights stays in git
history forever, so shipping is deliberate.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from base_card import base_card, clip_card, fail, folder_bytes

from tune import PROJECT_ROOT

log = logging.getLogger("ship_base")

MAX_BASE_BYTES = 40 * 2**20
"""The pipeline and its CLIP together stay under this (the issue's budget for the default base)."""
CLIP_FILES = ("config.json", "preprocessor_config.json")  # plus the tokenizer, saved through transformers


def load_in_fp32(config_path: Path) -> None:
    """Make transformers load these fp16 weights as fp32, as diffusers does for the unet and vae.

    transformers 5 loads a model in the dtype its config.json names; fp16 text towers on a CPU then meet
    the fp32 unet's inputs and fail ("mat1 and mat2 must have the same dtype"). The file stays fp16.
    """

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: ("float32" if k in ("dtype", "torch_dtype") and v == "float16" else fix(v))
                for k, v in node.items()
            }
        return node

    config_path.write_text(json.dumps(fix(json.loads(config_path.read_text())), indent=2) + "\n")


def ship_pipeline(unet_run: Path, out: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline = unet_run / "export" / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        fail(f"{pipeline} has no model_index.json; the unet run has not exported its pipeline")
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True, safety_checker=None)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    load_in_fp32(out / "text_encoder" / "config.json")


def ship_clip(clip_run: Path, out: Path) -> None:
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    source = clip_run / "export" / "clip"
    if not (source / "config.json").is_file():
        fail(f"{source} has no config.json; the clip run has not exported its model")
    CLIPModel.from_pretrained(source, dtype=torch.float16).save_pretrained(out, safe_serialization=True)
    load_in_fp32(out / "config.json")
    CLIPTokenizer.from_pretrained(source).save_pretrained(out)
    for name in CLIP_FILES:
        if (source / name).is_file() and not (out / name).is_file():
            shutil.copy2(source / name, out / name)


def write_folder(out: Path, force: bool, fill) -> None:
    if out.exists() and not force:
        fail(f"{out} exists; pass --force to replace it")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        staged.mkdir()
        fill(staged)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=PROJECT_ROOT / "runs", help="folder of the base-* runs")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "models", help="where the models go")
    parser.add_argument("--force", action="store_true", help="replace models that are already there")
    parser.add_argument(
        "--note", default="", help="a paragraph for the card's 'How it was made' (what the runs cannot tell)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    runs, out = args.runs, args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (runs / "base-unet").is_dir():
        fail(f"{runs / 'base-unet'} is missing; make base trains the runs first")
    # Stages whose runs are gone (shipped before, on another machine) keep their rows from this card.
    with tempfile.TemporaryDirectory() as tmp:
        previous_card = Path(tmp) / "MODEL_CARD.md"
        if (out / "world-base" / "MODEL_CARD.md").is_file():
            shutil.copy2(out / "world-base" / "MODEL_CARD.md", previous_card)
        new_clip = (runs / "base-clip").is_dir()
        if not new_clip and not (out / "world-clip" / "config.json").is_file():
            fail(
                f"{runs / 'base-clip'} is missing and there is no {out / 'world-clip'} to keep; run make base"
            )

        def fill_base(folder: Path) -> None:
            ship_pipeline(runs / "base-unet", folder)
            card = base_card(runs, folder, previous_card, out / "world-clip", args.note)
            (folder / "MODEL_CARD.md").write_text(card)

        def fill_clip(folder: Path) -> None:
            ship_clip(runs / "base-clip", folder)
            (folder / "MODEL_CARD.md").write_text(clip_card(runs, folder))

        if new_clip:
            write_folder(out / "world-clip", args.force, fill_clip)
        else:
            log.info("kept %s: %s has no base-clip run", out / "world-clip", runs)
        write_folder(out / "world-base", args.force, fill_base)
    total = folder_bytes(out / "world-base") + folder_bytes(out / "world-clip")
    if total > MAX_BASE_BYTES:
        fail(
            f"world-base and world-clip are {total / 2**20:.1f} MB together, over {MAX_BASE_BYTES / 2**20:.0f} MB"
        )
    for name in ("world-base", "world-clip"):
        log.info("shipped %s (%.1f MB)", out / name, folder_bytes(out / name) / 2**20)


if __name__ == "__main__":
    main()
