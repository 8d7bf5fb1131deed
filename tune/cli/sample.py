"""`tune sample`: one image (and optionally its denoising film strip) from a model and optional LoRAs.

    tune sample --model PATH --prompt TEXT --out FILE.png [--lora FILE[:SCALE] ...] [--embedding FILE ...]
                [--seed N] [--steps N] [--scheduler NAME] [--guidance G] [--width W --height H]
                [--init-image FILE --strength S] [--trajectory K] [--attention WORD[,WORD]] [--negative TEXT]
                [--config DIR] [--device auto|cpu|cuda] [--edit TEXT [--edit-steps K] [--reweight WORD=F ...]]

--embedding loads a textual-inversion file (a textual_inversion run's export, or a lora run's with
pivotal tuning: learned_embeds.safetensors; or an A1111/ComfyUI/kohya embedding) under the token it
names, as diffusers' load_textual_inversion does.

Draws through `tune.sampling.generate`, the sampler every recipe, `tune eval` and the dashboard use, with
diffusers' own pipeline of the model's family: SD1.x and SD2.x (v-prediction included) through
StableDiffusionPipeline, SDXL through StableDiffusionXLPipeline (img2img: their Img2Img classes).
An existing --out is overwritten only when it is a PNG image.

--attention WORD[,WORD] also records the cross-attention maps (`tune.attention`) and writes, beside the
image, `<stem>_attn_<word>.png` (the word's map over the image at 5 steps) and `<stem>_attention.safetensors`
(all maps [steps, 77, h, w] float16, the tokens in the metadata). A word not in the prompt is an error.

--edit B draws the prompt (A) and B from the same seed, B with A's cross-attention maps for its first K
steps (prompt-to-prompt, `tune.editing`; --edit-steps K, default 40% of --steps): a word swap when A and B
have as many tokens, a refinement when B adds words to A. --reweight WORD=F (repeatable) scales B's
attention to WORD by F. --out gets A and B side by side, `<stem>_a.png` and `<stem>_b.png` each alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from tune import attention, editing
from tune.errors import ConfigError, DataError, ModelError
from tune.paths import missing_shipped
from tune.sampling import DEFAULT_MODEL, SCHEDULERS, generate

logger = logging.getLogger(__name__)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tune sample`."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"diffusers folder or checkpoint (default: {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--config", default=None, metavar="DIR", help="diffusers config folder for a single-file checkpoint"
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="apply a LoRA (repeatable; scale default 1)",
    )
    parser.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE",
        help="load a textual-inversion embedding under its token (repeatable)",
    )
    parser.add_argument("--prompt", default=None, help="text prompt (required)")
    parser.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    parser.add_argument(
        "--scheduler", choices=list(SCHEDULERS), default=None, help="sampler (default: the model's own)"
    )
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)"
    )
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--init-image", default=None, metavar="FILE", help="start from this image (img2img)")
    parser.add_argument(
        "--strength", type=float, default=0.75, help="img2img noise strength in [0, 1] (default: 0.75)"
    )
    parser.add_argument(
        "--trajectory",
        type=int,
        default=0,
        metavar="K",
        help="also write a film strip with a frame every K steps",
    )
    parser.add_argument(
        "--attention",
        default=None,
        metavar="WORD[,WORD]",
        help="also write each word's cross-attention film strip and the maps (.safetensors)",
    )
    parser.add_argument(
        "--edit", default=None, metavar="TEXT", help="also draw this prompt with the prompt's attention maps"
    )
    parser.add_argument(
        "--edit-steps",
        type=int,
        default=None,
        metavar="K",
        help="with --edit: steps that reuse the prompt's maps (default: 40%% of --steps)",
    )
    parser.add_argument(
        "--reweight",
        action="append",
        default=[],
        metavar="WORD=F",
        help="with --edit: scale the edit's attention to WORD by F (repeatable)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to run (default: cuda if available)",
    )
    parser.add_argument("--out", required=True, metavar="FILE.png", help="where to write the image")


def _check_png_target(path: Path) -> None:
    """Refuse targets we could clobber by mistake: non-.png names, folders, existing non-PNG files."""
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file; got {path}")
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; name a .png file inside it")
    if path.exists():
        with path.open("rb") as f:
            if f.read(len(_PNG_MAGIC)) != _PNG_MAGIC:
                raise ConfigError(f"--out {path} exists and is not a PNG image; refusing to overwrite it")
        logger.info("%s exists; it will be overwritten", path)


def _check_edit(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """The --edit options' own errors (before the model loads); returns --reweight as {word: factor}."""
    if args.edit is None:
        for flag, value in (("--edit-steps", args.edit_steps), ("--reweight", args.reweight or None)):
            if value is not None:
                raise ConfigError(f"{flag} needs --edit B (the edited prompt; B may equal --prompt)")
        return {}
    for flag, value in (("--attention", args.attention), ("--init-image", args.init_image)):
        if value is not None:
            raise ConfigError(f"{flag} does not combine with --edit; draw the prompt on its own for it")
    if args.trajectory:
        raise ConfigError("--trajectory does not combine with --edit; draw the prompt on its own for it")
    if args.edit_steps is not None and not 0 <= args.edit_steps <= args.steps:
        raise ConfigError(f"--edit-steps must be in [0, {args.steps}] (--steps); got {args.edit_steps}")
    reweight = dict(editing.parse_reweight(spec) for spec in args.reweight)
    for suffix in ("_a", "_b"):
        _check_png_target(out.with_name(f"{out.stem}{suffix}.png"))
    return reweight


def _run_edit(args: argparse.Namespace, pipe: Any, out: Path, reweight: dict[str, float]) -> int:
    """--edit: A and B side by side in `out`, each alone beside it."""
    result = editing.edit(
        pipe,
        args.prompt,
        args.edit,
        args.seed,
        steps=args.steps,
        guidance=args.guidance,
        edit_steps=args.edit_steps,
        reweight=reweight,
        negative_prompt=args.negative,
        scheduler=args.scheduler,
        width=args.width,
        height=args.height,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result.side_by_side().save(out, format="PNG")
    for suffix, image in (("_a", result.image_a), ("_b", result.image_b)):
        image.save(out.with_name(f"{out.stem}{suffix}.png"), format="PNG")
    logger.info(
        "wrote %s (%s for %d of %d steps) and its _a/_b images",
        out,
        result.plan.mode,
        result.edit_steps,
        args.steps,
    )
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)


def run_cli(args: argparse.Namespace) -> int:
    """`tune sample`: one image (plus an optional trajectory strip) from a model and optional LoRAs."""
    from tune import lora as lora_io
    from tune import models
    from tune.personalize.weights import apply_embeddings

    if args.prompt is None:
        raise ConfigError(
            "--edit B needs --prompt A, the prompt to edit" if args.edit else "--prompt is required"
        )
    out = Path(args.out)
    strip_out = out.with_name(f"{out.stem}_trajectory.png")
    _check_png_target(out)
    reweight = _check_edit(args, out)
    if args.trajectory:
        _check_png_target(strip_out)
    words = [w.strip() for w in (args.attention or "").split(",") if w.strip()]
    if args.attention is not None and not words:
        raise ConfigError("--attention needs at least one word, e.g. --attention ball,background")
    for word in words:
        _check_png_target(out.with_name(f"{out.stem}_attn_{word}.png"))
    lora_specs = [lora_io.parse_lora_spec(spec) for spec in args.lora]
    for path, _ in lora_specs:
        if not path.is_file():
            raise ModelError(f"LoRA file not found: {path}")
    for path in args.embedding:
        if not Path(path).is_file():
            raise ModelError(f"embedding file not found: {path}")
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise DataError(f"init image not found: {args.init_image}")
    device = _device(args.device)

    model_path = models.resolve_model_path(args.model)
    if args.model == DEFAULT_MODEL and not Path(model_path).exists():
        # Other paths are load_pipeline's to judge (it raises ModelError with its own message).
        raise ModelError(
            f"the default model {missing_shipped(DEFAULT_MODEL, rebuild='make base')}, "
            "or pass --model PATH (a diffusers folder or a single-file checkpoint)"
        )
    pipe = models.load_pipeline(str(model_path), config=args.config)
    pipe.to(device)
    if lora_specs:
        lora_io.apply_loras(pipe, lora_specs)
    embeddings = contextlib.ExitStack()  # left open: the command draws, then exits
    for path in args.embedding:
        embeddings.enter_context(apply_embeddings(pipe, Path(path)))
    if args.edit is not None:
        return _run_edit(args, pipe, out, reweight)
    tokens = attention.prompt_tokens(args.prompt, pipe.tokenizer)
    for word in words:  # before sampling: an unknown word fails fast
        attention.word_token_positions(tokens, word, pipe.tokenizer)

    [sample] = generate(
        pipe,
        args.prompt,
        args.seed,
        negative_prompt=args.negative,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        width=args.width,
        height=args.height,
        init_image=args.init_image,
        strength=args.strength,
        trajectory_every=args.trajectory,
        attention=bool(words),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(out, format="PNG")
    strip = sample.film_strip()
    if strip is not None:
        strip.save(strip_out, format="PNG")
        logger.info("wrote %s (%d frames) and %s", strip_out, len(sample.frames), out)
    else:
        logger.info("wrote %s", out)
    if words:
        maps = sample.attention
        attention.save_maps(out.with_name(f"{out.stem}_attention.safetensors"), maps, args.prompt)
        for word in words:
            strip_path = out.with_name(f"{out.stem}_attn_{word}.png")
            attention.word_strip(sample.image, maps.word_map(word, pipe.tokenizer)).save(
                strip_path, format="PNG"
            )
            logger.info("wrote %s", strip_path)
    return 0
