"""Ship the base model: the three base runs' exports -> models/world-base and models/world-clip (fp16).

    python scripts/ship_base.py                     # runs/base-{vae,clip,unet} -> models/
    python scripts/ship_base.py --runs DIR --out DIR

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
import sys
import tempfile
from pathlib import Path
from typing import Any

from tune import PROJECT_ROOT

log = logging.getLogger("ship_base")

MAX_BASE_BYTES = 40 * 2**20
"""The pipeline and its CLIP together stay under this (the issue's budget for the default base)."""
DATA_COMMAND = "tune data world data/world-train --count 30000 --split train --seed 0"
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


def compute_seconds(run: Path, gap: float = 300.0) -> float | None:
    """Seconds the run spent training: the sum of the gaps between its logged steps (metrics.jsonl),
    leaving out gaps over `gap` (a run stopped and resumed later). Steps redone after a resume count
    again: it is the compute spent, not that of an unbroken run."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    times = [row["time"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]
    return sum(b - a for a, b in zip(times, times[1:], strict=False) if 0 < b - a <= gap) or None


def data_seconds(data_dir: Path) -> float | None:
    """From the first image written to metadata.jsonl (written last) of a `tune data world` folder."""
    first, last = data_dir / "000000.png", data_dir / "metadata.jsonl"
    if not (first.is_file() and last.is_file()):
        return None
    return last.stat().st_mtime - first.stat().st_mtime


NOT_MEASURED = "(not measured: the unet run's judged evaluation had not finished when this was shipped)"


def unet_eval(runs: Path) -> dict[str, Any]:
    """The unet run's judged evaluation, or {} (with a warning) when it has not finished; the card then
    says so instead of showing figures."""
    path = runs / "base-unet" / "eval" / "unet.json"
    if not path.is_file():
        log.warning("%s is missing: the card will say the base is not measured", path)
        return {}
    return json.loads(path.read_text())


def stage_rows(runs: Path) -> list[tuple[str, str, str]]:
    config = (runs / "base-unet" / "config.toml").read_text()
    data_dir = next(
        (
            line.split("=", 1)[1].strip().strip('"')
            for line in config.splitlines()
            if line.startswith("data_dir")
        ),
        "data/world-train",
    )
    data_dir_path = Path(data_dir) if Path(data_dir).is_absolute() else PROJECT_ROOT / data_dir
    rows = [
        ("data", DATA_COMMAND.replace("data/world-train", data_dir), minutes(data_seconds(data_dir_path)))
    ]
    for stage in ("vae", "clip", "unet"):
        run = runs / f"base-{stage}"
        rows.append((stage, command_of(run), minutes(compute_seconds(run))))
    unet = unet_eval(runs)
    rows.append(("unet eval", "(end of the unet run)", minutes(unet.get("eval_time_s"))))
    return rows


def base_card(runs: Path, out: Path) -> str:
    from tune.world.scoring import format_table

    unet = unet_eval(runs)
    vae = read_json(runs / "base-vae" / "eval" / "vae.json")
    clip = read_json(runs / "base-clip" / "eval" / "clip.json")
    stages = "\n".join(f"| {s} | `{c}` | {t} |" for s, c, t in stage_rows(runs))
    settings = unet.get("settings", {})
    odd = unet.get("odd_prompts", {})
    psnr = " / ".join(f"{k} {v:.1f}" for k, v in vae["psnr_db_by_style"].items())
    subjects = ", ".join(
        f"{name}: {vae.get(f'{name}_psnr_db', float('nan')):.1f} dB, found in {vae.get(f'{name}_found', 'n/a')} of "
        f"{vae.get(f'{name}_photos', 'n/a')} reconstructions ({vae.get(f'{name}_found_originals', 'n/a')} originals)"
        for name in ("sks-toy", "w-person")
    )
    return f"""# world-base: tune's default base model

A small latent diffusion model with the Stable Diffusion 1.x module topology (so LoRA key names match
SD1.5) at small widths (multiples of 32, GroupNorm(32), as ComfyUI's model code expects), trained from
scratch by tune's own recipes on the built-in toy world (`tune.world`): one toy (ball, ring, block, cup,
cone) or person, in twelve colours, plain, striped or spotted, on a colour or a surface (a wooden table,
grass, sand, a rug), as a photo, a drawing, a pencil sketch or pixel art, 64x64. It is what `make demo`,
the personalization recipes (`base_model` default) and the dashboard use when no real SD1.x is given.

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("models/world-base")
    image = pipe("a photo of a large red ball on a blue background", num_inference_steps=25,
                 guidance_scale=6.0).images[0]

fp16 safetensors, {folder_bytes(out) / 2**20:.1f} MB (with models/world-clip: see its card). U-Net
{unet.get("unet_params", read_json(runs / "base-unet" / "run.json").get("unet_params", 0)) / 1e6:.2f}M parameters on {" x ".join(str(d) for d in vae.get("latent_shape", []))} latents
(VAE factor 4), v-prediction, {settings.get("scheduler", "DDIM")} sampling. Prompts follow the training captions:
`{{style}} a {{size}} {{colour phrase}} {{class}} on {{background}}[ in the {{position}}]`, e.g. "a pencil sketch
of a small pink and teal striped ring on sand in the top left"; parts may be left out ("a photo of a toy").

## How it was made (`make base` repeats it)
Data seed 0 (30,000 training images). Times are training compute (the sum of the step times each run
logged, resumed segments included); stages that ran side by side or beside other jobs ran slower. Held out of training (`tune.world.spec`): the twelve (colour, class)
pairs of `HELDOUT_PAIRS` in any pattern (composition is measured on them) and the example subjects' looks
of `HELDOUT_LOOKS` (every pink-and-teal striped ring, the green-haired person in a yellow shirt with purple
spots, and three more). Each recipe's seed is 0 (its config). Times are on 2 CPU cores (no GPU).

| stage | command | time |
|---|---|---|
{stages}

Shipped with `python scripts/ship_base.py` (fp32 EMA weights cast to fp16).

## Measured figures
All images fresh, {settings.get("steps", 25)} steps, guidance {settings.get("guidance", 6.0)}, one image per
prompt, read by the world judge (`models/world-judge`, its own card has its accuracy). Colours are not
scored in pencil sketches (they have none); position only for small objects.

Seen combinations (400 canonical prompts, styles taking turns):

{format_table(unet["seen"]) if "seen" in unet else NOT_MEASURED}

Held-out (colour, class) pairs (200 prompts):

{format_table(unet["heldout"]) if "heldout" in unet else NOT_MEASURED}

Partial and odd prompts, 8 colours x 5 seeds each, right background: "a photo of a toy on a {{colour}}
background" {pct(odd.get("toy", float("nan")))}; "a photo of zwx toy on a {{colour}} background" (an unknown
word) {pct(odd.get("unknown_word", float("nan")))}.

VAE ({vae["eval_images"]} fresh renders): PSNR {vae["psnr_db"]:.2f} dB ({psnr}); the judge reads
{pct(vae.get("judge_agreement", float("nan")))} of reconstructions exactly as the originals
({pct(vae.get("judge_agreement_blurred", float("nan")))} after a 1 px blur). Example subjects' photos: {subjects}.
Latent scaling factor {vae["scaling_factor"]:.4f}.

CLIP text tower (frozen during U-Net training): text-to-image top-1 retrieval among {clip["specs"]} held-out
specs {pct(clip["heldout"]["t2i_top1"])}, image-to-text {pct(clip["heldout"]["i2t_top1"])}.

## Limits
It draws the toy world only, at 64 px. Anything else (real photos, other styles) is what LoRA and
DreamBooth would have to teach it, and a 64 px model learns colours, shapes and patterns, not fine texture.
"""


def clip_card(runs: Path, out: Path) -> str:
    clip = read_json(runs / "base-clip" / "eval" / "clip.json")
    seconds = compute_seconds(runs / "base-clip")
    rows = "\n".join(
        f"| {split} | {pct(clip[split]['t2i_top1'])} | {pct(clip[split]['i2t_top1'])} |"
        for split in ("heldout", "train")
    )
    return f"""# world-clip: the CLIP model (text and image towers) of the toy world

A transformers `CLIPModel` trained contrastively from scratch on the toy world's captions (with a
byte-level BPE tokenizer trained on them); its text tower is the text encoder of `models/world-base`.
`tune eval` uses both towers for CLIP-I subject fidelity and CLIP-T prompt fidelity.
fp16 safetensors, {folder_bytes(out) / 2**20:.1f} MB.

    from transformers import CLIPModel, CLIPTokenizer
    model = CLIPModel.from_pretrained("models/world-clip")
    tokenizer = CLIPTokenizer.from_pretrained("models/world-clip")

## How it was made
    {DATA_COMMAND}
    {command_of(runs / "base-clip")}

Data seed 0, recipe seed 0, {clip["step"]} steps, {minutes(seconds)} on 2 CPU cores. `make base` repeats it.

## Measured figures
Top-1 retrieval among {clip["specs"]} (caption, image) pairs (a pick is right when the caption describes the
picked image: two sketches differing only in colour look alike):

| specs | text-to-image | image-to-text |
|---|---|---|
{rows}

"heldout" uses the (colour, class) pairs never shown in training (`tune.world.spec.HELDOUT_PAIRS`).
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
        (folder / "MODEL_CARD.md").write_text(base_card(runs, folder))

    def fill_clip(folder: Path) -> None:
        ship_clip(runs / "base-clip", folder)
        (folder / "MODEL_CARD.md").write_text(clip_card(runs, folder))

    write_folder(out / "world-base", args.force, fill_base)
    write_folder(out / "world-clip", args.force, fill_clip)
    total = folder_bytes(out / "world-base") + folder_bytes(out / "world-clip")
    if total > MAX_BASE_BYTES:
        fail(
            f"world-base and world-clip are {total / 2**20:.1f} MB together, over {MAX_BASE_BYTES / 2**20:.0f} MB"
        )
    for name in ("world-base", "world-clip"):
        log.info("shipped %s (%.1f MB)", out / name, folder_bytes(out / name) / 2**20)


if __name__ == "__main__":
    main()
