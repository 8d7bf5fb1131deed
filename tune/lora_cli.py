"""`tune lora inspect | convert | merge`: look at, convert and bake in LoRA files.

    tune lora inspect FILE                  format, architecture, modules, ranks/alphas per group, targets,
                                            trigger, metadata, sshs_model_hash check (exit 1 on mismatch)
    tune lora convert FILE --to kohya|diffusers [--out FILE] [--dtype D] [--force]
    tune lora merge BASE LORA[:SCALE] ... --out DIR|FILE.safetensors [--config DIR] [--dtype D] [--force]

convert writes `<stem>_<format>.safetensors` beside FILE unless --out is given; merge writes a diffusers
folder, or one SD1.x checkpoint when --out ends in .safetensors. Nothing existing is overwritten
without --force. Formats and conventions: `tune.lora`.
"""

from __future__ import annotations

import argparse
import logging
import textwrap

from tune.lora import (
    DTYPES,
    FORMATS,
    LoraReport,
    convert_lora_file,
    inspect_lora,
    merge_loras,
    parse_lora_spec,
)

logger = logging.getLogger(__name__)

# Long metadata values (the resolved TOML config, adapter configs) are summarised, not printed whole.
_MAX_VALUE_CHARS = 80


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Subcommands of `tune lora` (the lead's tune/cli.py calls this)."""
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
    p.add_argument("base", metavar="BASE", help="diffusers folder or single-file SD1.x checkpoint")
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


def _numbers(values: tuple[float, ...] | tuple[int, ...]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _value(value: str) -> str:
    lines = value.splitlines()
    if len(lines) > 1:
        return f"<{len(lines)} lines, {len(value)} chars>"
    return value if len(value) <= _MAX_VALUE_CHARS else value[: _MAX_VALUE_CHARS - 3] + "..."


def format_report(report: LoraReport) -> str:
    """The text `tune lora inspect` prints for a `tune.lora.LoraReport`."""
    modules = sum(report.modules.values())
    per_component = ", ".join(f"{name} {count}" for name, count in sorted(report.modules.items()))
    lines = [
        f"file:          {report.path}",
        f"format:        {report.format} ({report.keys} tensors, {'/'.join(report.dtypes)})",
        f"architecture:  {report.architecture}",
    ]
    if report.problem:
        lines.append(f"problem:       {report.problem}")
    else:
        lines.append(f"modules:       {modules} ({per_component})")
        lines.append("groups:        group                     modules  rank      alpha     scale (alpha/r)")
        for group in report.groups:
            lines.append(
                f"               {group.name:<25} {group.modules:>7}  {_numbers(group.ranks):<9} "
                f"{_numbers(group.alphas):<9} {_numbers(group.scales)}"
            )
        for component, names in sorted(report.targets.items()):
            lines.append(f"targets:       {component}: {', '.join(names)}")
    lines.append(f"trigger:       {report.trigger or '(none recorded)'}")
    if report.hash_ok is None:
        lines.append(f"sshs hash:     not recorded (A1111 hashes the file itself); data {report.data_hash}")
    elif report.hash_ok:
        lines.append(f"sshs hash:     ok {report.data_hash}")
    else:
        lines.append(
            f"sshs hash:     MISMATCH: metadata says {report.recorded_hash}, data is {report.data_hash}"
        )
    lines.append(f"metadata:      {len(report.metadata)} keys")
    for key in sorted(report.metadata):
        lines.append(f"  {key} = {_value(report.metadata[key])}")
    for note in report.notes:
        lines.extend(
            textwrap.wrap(note, width=100, initial_indent="note:          ", subsequent_indent=" " * 15)
        )
    return "\n".join(lines)
