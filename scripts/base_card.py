"""The model cards of the shipped base (models/world-base, models/world-clip), from the base runs' records:
commands from run.json, times from metrics.jsonl, figures from each run's eval/ (nothing typed in by hand).
Used by scripts/ship_base.py."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from tune import PROJECT_ROOT

log = logging.getLogger("ship_base")

DATA_COMMAND = "tune data world data/world-train --count 30000 --split train --seed 0"


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
    """The command that started the run, and the last one that resumed it (it may change max_steps)."""
    info = read_json(run / "run.json")
    argv, resumed = info.get("argv", []), info.get("resume_argv", [])
    command = "tune " + " ".join(argv[1:]) if argv else "(unknown)"
    return command + (f"`, resumed by `tune {' '.join(resumed[1:])}" if resumed else "")


def minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


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


STAGES = (("vae", "base-vae"), ("clip", "base-clip"), ("unet", "base-unet"))
"""(stage, run folder in --runs), in the order `make base` runs them."""


def previous_rows(card: Path) -> dict[str, tuple[str, str]]:
    """Stage -> (command, time) from the stage table of an earlier MODEL_CARD.md (none when absent)."""
    if not card.is_file():
        return {}
    rows = (
        re.fullmatch(r"\| ([a-z0-9 ]+) \| `(.*)` \| (.*) \|", line) for line in card.read_text().splitlines()
    )
    return {m[1]: (m[2], m[3]) for m in rows if m}


def stage_rows(runs: Path, previous_card: Path, eval_seconds: float | None) -> list[tuple[str, str, str]]:
    """The card's stage table (`eval_seconds`: the unet run's judged evaluation). A required stage whose
    run is not in `runs` (shipped before, its run folder gone) keeps its row from `previous_card`, marked
    as carried over."""
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
    seconds = data_seconds(data_dir_path)
    previous = previous_rows(previous_card)
    data_time = minutes(seconds) if seconds is not None or "data" not in previous else previous["data"][1]
    rows = [("data", DATA_COMMAND.replace("data/world-train", data_dir), data_time)]
    for stage, name in STAGES:
        run = runs / name
        if run.is_dir():
            rows.append((stage, command_of(run), minutes(compute_seconds(run))))
        else:
            if stage not in previous:
                fail(f"{run} is missing and {previous_card} has no '{stage}' row to keep; run make base")
            command, time = previous[stage]
            carried = (
                "" if "carried over" in time else f"; carried over from the previous card ({run} is gone)"
            )
            rows.append((stage, command, time + carried))
    rows.append(("unet eval", "(end of the unet run)", minutes(eval_seconds)))
    return rows


def vae_report(runs: Path) -> dict[str, Any]:
    """The evaluation of the VAE the base ships (the vae run's)."""
    if not (runs / "base-vae").is_dir():
        fail(f"{runs} has no base-vae run; run make base")
    return read_json(runs / "base-vae" / "eval" / "vae.json")


def clip_report(runs: Path, kept_clip: Path) -> dict[str, Any]:
    """The clip run's retrieval figures; without the run (the shipped CLIP is kept), measured again on
    the kept model as the clip recipe measures them."""
    if (runs / "base-clip").is_dir():
        return read_json(runs / "base-clip" / "eval" / "clip.json")
    from transformers import CLIPModel, CLIPTokenizer

    from recipes.clip import EVAL_COUNT, EVAL_SEED
    from tune.world.retrieval import retrieval, retrieval_set

    model, tokenizer = CLIPModel.from_pretrained(kept_clip), CLIPTokenizer.from_pretrained(kept_clip)
    size = model.config.vision_config.image_size
    report: dict[str, Any] = {"specs": EVAL_COUNT, "measured_on": str(kept_clip)}
    for split in ("heldout", "train"):
        report[split] = retrieval(model, tokenizer, *retrieval_set(split, EVAL_COUNT, size, EVAL_SEED))
    return report


def base_card(runs: Path, out: Path, previous_card: Path, kept_clip: Path, note: str = "") -> str:
    """world-base's MODEL_CARD.md from the runs (and, for stages whose runs are gone, `previous_card`)."""
    from tune.world.scoring import format_table

    unet = unet_eval(runs)
    vae = vae_report(runs)
    clip = clip_report(runs, kept_clip)
    stages = "\n".join(
        f"| {s} | `{c}` | {t} |" for s, c, t in stage_rows(runs, previous_card, unet.get("eval_time_s"))
    )
    settings = unet.get("settings", {})
    odd = unet.get("odd_prompts", {})
    psnr = " / ".join(f"{k} {v:.1f}" for k, v in vae["psnr_db_by_style"].items())
    rescored = (
        f"; scored again at commit {vae['rescored']} by `python scripts/score_vae.py`"
        if vae.get("rescored")
        else ""
    )
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

Shipped with `python scripts/ship_base.py` (fp32 EMA weights cast to fp16).{note and chr(10) * 2 + note}

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

VAE ({vae["eval_images"]} fresh renders{rescored}): PSNR {vae["psnr_db"]:.2f} dB ({psnr}); the judge reads
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
