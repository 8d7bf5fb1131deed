"""`tune lora inspect | convert | merge | extract | resize`: look at, convert, bake in, extract and resize
LoRA files.

    tune lora inspect FILE                  format, architecture, modules, ranks/alphas per group, targets,
                                            trigger, metadata, sshs_model_hash check (exit 1 on mismatch)
    tune lora convert FILE --to kohya|diffusers [--out FILE] [--dtype D] [--force] [--base MODEL --dora-rank R]
    tune lora merge BASE LORA[:SCALE] ... --out DIR|FILE.safetensors [--config DIR] [--dtype D] [--force]
    tune lora extract RUN_DIR|TUNED_MODEL [--base BASE] --rank R [--conv-rank R] [--text-encoder]
                      --out FILE [--config DIR] [--dtype D] [--force]
    tune lora resize FILE (--rank R | --energy F) --out FILE [--dtype D] [--force]

Files of every base family (SD1.x, SD2.x, SDXL) are read; inspect reports the family. convert writes
`<stem>_<format>.safetensors` beside FILE unless --out is given; merge writes a diffusers folder, or one
single-file checkpoint of the base's family when --out ends in .safetensors. A LoRA of another family
than the base is refused. extract and resize factor weight differences by SVD (`tune.lora.svd`) and
print the relative error ||delta - up @ down|| / ||delta|| per module group (resize: per module) and
overall. Nothing existing is overwritten without --force. Formats: `tune.lora`.
"""

from __future__ import annotations

import argparse
import logging

from tune.errors import ConfigError
from tune.lora import (
    DTYPES,
    FORMATS,
    convert_lora_file,
    format_report,
    inspect_lora,
    merge_loras,
    parse_lora_spec,
)
from tune.lora.svd import SvdError, extract_lora_file, resize_lora_file, summarize_errors

logger = logging.getLogger(__name__)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Subcommands of `tune lora`."""
    sub = parser.add_subparsers(dest="lora_command", metavar="COMMAND", parser_class=type(parser))
    sub.required = True

    p = sub.add_parser("inspect", help="describe a LoRA file", description="Describe a LoRA file.")
    p.add_argument("file", metavar="FILE", help="a LoRA .safetensors file (kohya, diffusers or PEFT)")

    p = sub.add_parser("convert", help="convert a LoRA file to kohya or diffusers format")
    p.add_argument("file", metavar="FILE", help="a LoRA .safetensors file (kohya, diffusers or PEFT)")
    p.add_argument("--to", choices=FORMATS, required=True, help="target format")
    p.add_argument(
        "--out", default=None, metavar="FILE", help="default: <stem>_<format>.safetensors beside FILE"
    )
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="tensor dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="DoRA to kohya only: the base model it was trained on (its kohya file is a plain LoRA of the delta)",
    )
    p.add_argument(
        "--dora-rank",
        type=int,
        default=None,
        metavar="R",
        help="rank of that plain LoRA (default: the adapter's)",
    )

    p = sub.add_parser("merge", help="merge LoRAs into a base model and save it")
    p.add_argument(
        "base", metavar="BASE", help="diffusers folder or single-file checkpoint (SD1.x, SD2.x, SDXL)"
    )
    p.add_argument("loras", nargs="+", metavar="LORA[:SCALE]", help="LoRA files, scale default 1")
    p.add_argument(
        "--out", required=True, metavar="DIR|FILE", help="a folder, or FILE.safetensors (single file)"
    )
    p.add_argument(
        "--config", default=None, metavar="DIR", help="diffusers config folder for a single-file BASE"
    )
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: as loaded (folder), fp16 (single file)"
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    p = sub.add_parser(
        "extract", help="a kohya LoRA from a full fine-tune (its difference to the base, by SVD)"
    )
    p.add_argument(
        "tuned", metavar="RUN_DIR|TUNED_MODEL", help="a dreambooth run, or a diffusers folder or single file"
    )
    p.add_argument(
        "--base", default=None, metavar="BASE", help="the base model (default for RUN_DIR: the run's)"
    )
    p.add_argument("--rank", type=int, required=True, help="rank of attention, MLP and 1x1 modules")
    p.add_argument(
        "--conv-rank",
        type=int,
        default=0,
        help="rank of the resnets' and samplers' 3x3 convs (their other modules at --rank); default 0: none",
    )
    p.add_argument("--text-encoder", action="store_true", help="also the text encoder(s), when they changed")
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--config", default=None, metavar="DIR", help="diffusers config folder for a single file")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="file dtype (default fp16)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    p = sub.add_parser("resize", help="a LoRA file at a lower rank (SVD per module)")
    p.add_argument("file", metavar="FILE", help="a LoRA .safetensors file (kohya, diffusers or PEFT)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, default=None, help="the new rank of every module")
    how.add_argument(
        "--energy",
        type=float,
        default=None,
        help="per module, the smallest rank keeping this share (0-1] of sum s^2",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="file dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run_cli(args: argparse.Namespace) -> int:
    commands = {
        "inspect": _inspect,
        "convert": _convert,
        "merge": _merge,
        "extract": _extract,
        "resize": _resize,
    }
    return commands[args.lora_command](args)


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_lora(args.file)
    print(format_report(report))
    return 1 if report.hash_ok is False else 0


def _convert(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.dora_rank is not None and args.dora_rank < 1:
        raise ConfigError(f"--dora-rank must be >= 1; got {args.dora_rank}")
    out = convert_lora_file(
        args.file, args.to, args.out, dtype=dtype, force=args.force, base=args.base, dora_rank=args.dora_rank
    )
    print(out)
    return 0


def _merge(args: argparse.Namespace) -> int:
    specs = [parse_lora_spec(spec) for spec in args.loras]
    dtype = DTYPES[args.dtype] if args.dtype else None
    print(merge_loras(args.base, specs, args.out, config=args.config, dtype=dtype, force=args.force))
    return 0


def _print_errors(errors: dict[str, SvdError]) -> None:
    for name, value in summarize_errors(errors).items():
        print(f"  {name:<25} relative error {value:.4g}")


def _extract(args: argparse.Namespace) -> int:
    out, lora, errors = extract_lora_file(
        args.tuned,
        args.out,
        rank=args.rank,
        base=args.base,
        conv_rank=args.conv_rank,
        text_encoder=args.text_encoder,
        config=args.config,
        dtype=DTYPES[args.dtype],
        force=args.force,
    )
    print(f"{out}: {len(lora.modules)} modules")
    _print_errors(errors)
    return 0


def _resize(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    out, lora, errors = resize_lora_file(
        args.file, args.out, rank=args.rank, energy=args.energy, dtype=dtype, force=args.force
    )
    print(f"{out}: {len(lora.modules)} modules")
    for target, pair in lora.modules.items():
        print(f"  {target:<70} rank {pair.rank:>4}  relative error {errors[target].relative:.4g}")
    _print_errors(errors)
    return 0
