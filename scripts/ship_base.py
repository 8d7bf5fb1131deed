"""Ship the base model: the three base runs' exports -> models/shapes-base and models/shapes-clip (fp16).

    python scripts/ship_base.py                     # runs/base-{vae,clip,unet} -> models/
    python scripts/ship_base.py --runs DIR --out DIR

`make base` trains the three runs (data, vae, clip, unet) and then calls this. It writes:
- models/shapes-base/: the U-Net run's Stable Diffusion pipeline folder (vae/, text_encoder/, tokenizer/,
  unet/, scheduler/, model_index.json) with fp16 safetensors, which plain
  `StableDiffusionPipeline.from_pretrained(path)` loads;
- models/shapes-clip/: the CLIP run's transformers CLIPModel (text and image towers) in fp16 plus its
  tokenizer and image-processor files (`CLIPModel.from_pretrained(path)`), the judge `tune eval` uses;
- a MODEL_CARD.md in each, with the commands, the data seed, each stage's training time and the
  measured figures, read from the runs' run.json and eval/ reports (nothing typed in by hand).

A folder that is already there is replaced only with --force: every commit of weights stays in git
history forever, so shipping is deliberate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tune import PROJECT_ROOT

log = logging.getLogger("ship_base")

MAX_BASE_BYTES = 25 * 2**20
DATA_COMMAND = "tune data shapes data/shapes-train --count 10000 --split train --seed 0"
CLIP_FILES = ("config.json", "preprocessor_config.json")  # plus the tokenizer, saved through transformers


def fail(message: str) -> None:
    print(f"ship_base: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        fail(f"{path} is missing; did that run finish? (make base trains the runs first)")
    return json.loads(path.read_text())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def command_of(run: Path) -> str:
    argv = read_json(run / "run.json").get("argv", [])
    return "tune " + " ".join(argv[1:]) if argv else "(unknown)"


def minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def wall_seconds(run: Path) -> float:
    started = datetime.datetime.fromisoformat(read_json(run / "run.json")["started_at"])
    return (run / "DONE").stat().st_mtime - started.timestamp()


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


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


def stage_rows(runs: Path) -> list[tuple[str, str, str]]:
    rows = [("data", DATA_COMMAND, "about 5 s")]
    for stage in ("vae", "clip", "unet"):
        run = runs / f"base-{stage}"
        info = read_json(run / "run.json")
        seconds = info.get("train_seconds") or info.get("train_time_s")
        if stage == "unet":
            seconds = read_json(run / "eval" / "unet.json").get("train_time_s")
        if seconds is None:
            seconds = read_json(run / "eval" / f"{stage}.json").get("train_seconds")
        if seconds is None:  # the clip recipe records no training time: start to DONE, wall clock
            seconds = wall_seconds(run)
        rows.append((stage, command_of(run), minutes(seconds)))
    return rows


def unet_table(report: dict[str, Any]) -> str:
    lines = [
        "| prompts | n | object colour | shape | background | position (small) | all correct |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"train": "colour-shape pairs seen in training", "heldout": "held-out colour-shape pairs"}
    for split in ("train", "heldout"):
        r = report[split]
        cells = [pct(r[k]) for k in ("color", "shape", "bg", "position_small", "all_correct")]
        lines.append(f"| {names[split]} | {r['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def concept_figures(vae_dir: Path) -> dict[str, Any]:
    """The vae recipe's example-concept round trip, for a VAE run from before its eval reported it."""
    from diffusers import AutoencoderKL

    from recipes.vae import concept_round_trip

    return concept_round_trip(AutoencoderKL.from_pretrained(vae_dir).eval(), resolution=64)


def base_card(runs: Path, out: Path) -> str:
    unet = read_json(runs / "base-unet" / "eval" / "unet.json")
    vae = read_json(runs / "base-vae" / "eval" / "vae.json")
    clip = read_json(runs / "base-clip" / "eval" / "clip.json")
    concept = vae if "concept_psnr_db" in vae else concept_figures(runs / "base-vae" / "export" / "vae")
    stages = stage_rows(runs)
    total = "\n".join(f"| {s} | `{c}` | {t} |" for s, c, t in stages)
    settings = unet.get("settings", {})
    return f"""# shapes-base: tune's default base model

A small latent diffusion model with the Stable Diffusion 1.x module topology (so LoRA key names match
SD1.5) at small widths, trained from scratch by tune's own recipes on the built-in shapes dataset
(one flat-colour circle, square, triangle or star on a flat background, 64x64). It is what `make demo`,
the personalization recipes (`base_model` default) and the dashboard use when no real SD1.x is given.

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("models/shapes-base")
    image = pipe("a large red circle on a blue background", num_inference_steps=25,
                 guidance_scale=6.0, height=64, width=64).images[0]

fp16 safetensors, {folder_bytes(out) / 2**20:.1f} MB. U-Net {unet.get("unet_params", 0) / 1e6:.2f}M parameters
on {" x ".join(str(d) for d in vae.get("latent_shape", []))} latents (VAE factor 4), v-prediction,
{settings.get("scheduler", "DDIM")} sampling. Prompts follow the training captions:
`a {{size}} {{color}} {{shape}} on a {{bg}} background[ in the {{position}}]`.

## How it was made (`make base` repeats it)
Data seed 0 (10,000 training images; the held-out colour-shape pairs of `tune.data.shapes.HELDOUT_PAIRS`
never appear in training). Each recipe's seed is 0 (its config). Times are training time on 2 CPU cores
(no GPU); other jobs sharing the cores slow a stage 2-4x.

| stage | command | time |
|---|---|---|
{total}

Shipped with `python scripts/ship_base.py` (fp32 EMA weights cast to fp16).

## Measured figures
U-Net: one image per prompt, {settings.get("steps", 25)} steps, guidance {settings.get("guidance", 6.0)}, fresh
seeds, judged by the shapes attribute detector (`tune.data.shapes_detect`, at least 98% right on generator
images); position is scored over small objects only (large ones are always centred).

{unet_table(unet)}

VAE ({vae["eval_images"]} held-out images): PSNR {vae["psnr_db"]:.2f} dB; the detector reads the right object colour on
{pct(vae["color_accuracy"])} of reconstructions, background {pct(vae["bg_accuracy"])}, shape {pct(vae["shape_accuracy"])}.
Latent scaling factor {vae["scaling_factor"]:.4f} (latent mean {vae["latent_mean"]:.2f}, std {vae["latent_std"]:.2f} before scaling).
The same images with every colour shifted off the palette (`color_augment` at 1.0) come back at
{vae["recoloured_psnr_db"]:.1f} dB. The example concept's {concept["concept_photos"]} photos (a pink and teal toy, shaded, 64 px) come
back at {concept["concept_psnr_db"]:.1f} dB, the toy still found by its detector in {pct(concept["concept_detected"])} of reconstructions
({pct(concept["concept_detected_originals"])} of the originals).

CLIP text tower (frozen during U-Net training): text-to-image top-1 retrieval among {clip["specs"]} held-out pairs
{pct(clip["heldout"]["t2i_top1"])}, image-to-text {pct(clip["heldout"]["i2t_top1"])}.

## Limits
It draws the shapes domain only: one object, eight colours, four shapes, two sizes, five positions.
Anything else (photos, styles, the personalization subjects) is what LoRA and DreamBooth teach it.
Its VAE saw flat shapes only (30% of them recoloured off the palette, the vae recipe's `color_augment`):
photos with texture, shading and fine detail come back blurred (the concept figures above), so what a
personalization recipe can teach this base is a subject's colours and outline at 64 px, not its texture.
"""


def clip_card(runs: Path, out: Path) -> str:
    clip = read_json(runs / "base-clip" / "eval" / "clip.json")
    info = read_json(runs / "base-clip" / "run.json")
    seconds = info.get("train_seconds") or info.get("train_time_s") or wall_seconds(runs / "base-clip")
    rows = "\n".join(
        f"| {split} | {pct(clip[split]['t2i_top1'])} | {pct(clip[split]['i2t_top1'])} |"
        for split in ("heldout", "train")
    )
    return f"""# shapes-clip: the CLIP model (text and image towers) of the shapes domain

A transformers `CLIPModel` trained contrastively from scratch on the built-in shapes dataset's captions
(with a byte-level BPE tokenizer trained on them); its text tower is the text encoder of
`models/shapes-base`. `tune eval` uses both towers as its default judge (CLIP-I subject fidelity, CLIP-T
prompt fidelity). fp16 safetensors, {folder_bytes(out) / 2**20:.1f} MB.

    from transformers import CLIPModel, CLIPTokenizer
    model = CLIPModel.from_pretrained("models/shapes-clip")
    tokenizer = CLIPTokenizer.from_pretrained("models/shapes-clip")

## How it was made
    {DATA_COMMAND}
    {command_of(runs / "base-clip")}

Data seed 0, recipe seed 0, {clip["step"]} steps, {minutes(seconds)} on 2 CPU cores. `make base` repeats it.

## Measured figures
Top-1 retrieval among {clip["specs"]} (caption, image) pairs:

| pairs | text-to-image | image-to-text |
|---|---|---|
{rows}

"heldout" uses the colour-shape pairs never shown in training (`tune.data.shapes.HELDOUT_PAIRS`).
It knows the shapes domain only; on photos its embeddings carry colour and layout more than identity.
"""


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
    parser.add_argument(
        "--runs", type=Path, default=PROJECT_ROOT / "runs", help="folder of base-{vae,clip,unet}"
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "models", help="where the models go")
    parser.add_argument("--force", action="store_true", help="replace models that are already there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    runs, out = args.runs, args.out
    out.mkdir(parents=True, exist_ok=True)

    def fill_base(folder: Path) -> None:
        ship_pipeline(runs / "base-unet", folder)
        size = folder_bytes(folder)
        if size > MAX_BASE_BYTES:
            fail(
                f"the fp16 pipeline is {size / 2**20:.1f} MB, over the {MAX_BASE_BYTES / 2**20:.0f} MB limit"
            )
        (folder / "MODEL_CARD.md").write_text(base_card(runs, folder))

    def fill_clip(folder: Path) -> None:
        ship_clip(runs / "base-clip", folder)
        (folder / "MODEL_CARD.md").write_text(clip_card(runs, folder))

    write_folder(out / "shapes-base", args.force, fill_base)
    write_folder(out / "shapes-clip", args.force, fill_clip)
    for name in ("shapes-base", "shapes-clip"):
        log.info("shipped %s (%.1f MB)", out / name, folder_bytes(out / name) / 2**20)


if __name__ == "__main__":
    main()
