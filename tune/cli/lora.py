"""`tune lora inspect | convert | merge`: look at, convert and bake in LoRA files.

    tune lora inspect FILE                  format, architecture, modules, ranks/alphas per group, targets,
                                            trigger, metadata, sshs_model_hash check (exit 1 on mismatch)
    tune lora convert FILE --to kohya|diffusers [--out FILE] [--dtype D] [--force]
    tune lora merge BASE LORA[:SCALE] ... --out DIR|FILE.safetensors [--config DIR] [--dtype D] [--force]

Files of every base family (SD1.x, SD2.x, SDXL) are read; inspect reports the family. convert writes
`<stem>_<format>.safetensors` beside FILE unless --out is given; merge writes a diffusers folder, or one
single-file checkpoint of the base's family when --out ends in .safetensors. A LoRA of another family
than the base is refused. Nothing existing is overwritten without --force. Formats: `tune.lora`.
"""

from __future__ import annotations

import argparse
import logging

from tune.lora import (
    DTYPES,
    FORMATS,
    convert_lora_file,
    format_report,
    inspect_lora,
    merge_loras,
    parse_lora_spec,
)

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


def run_cli(args: argparse.Namespace) -> int:
    return {"inspect": _inspect, "convert": _convert, "merge": _merge}[args.lora_command](args)


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_lora(args.file)
    print(format_report(report))
    return 1 if report.hash_ok is False else 0


def _convert(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    print(convert_lora_file(args.file, args.to, args.out, dtype=dtype, force=args.force))
    return 0


def _merge(args: argparse.Namespace) -> int:
    specs = [parse_lora_spec(spec) for spec in args.loras]
    dtype = DTYPES[args.dtype] if args.dtype else None
    print(merge_loras(args.base, specs, args.out, config=args.config, dtype=dtype, force=args.force))
    return 0
