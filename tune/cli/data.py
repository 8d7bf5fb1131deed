"""`tune data check | world`: look at a photo folder before training; write the built-in toy world.

    tune data check PATH [--resolution N] [--min-side N]
    tune data world OUT_DIR [--count N] [--split train|heldout|all] [--resolution N] [--seed S] [--workers N]
                    [--masks]

check prints the usable image count, every skipped file with its reason, caption coverage and the
bucket histogram (`tune.data.check`); exit code 0 when at least one image is usable, else 2 with one
line on stderr. It reads only. world writes renders of the toy world as a Hugging Face imagefolder
(`tune.world.dataset.write_imagefolder`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from tune.data.config import DataConfig
from tune.world.spec import SPLITS


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Subcommands of `tune data`."""
    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=type(parser))
    sub.required = True
    help_text = "check a photo folder: usable images, skipped files, captions, buckets"
    configure_check(sub.add_parser("check", help=help_text, description=help_text))
    help_text = "write renders of the built-in toy world as a captioned imagefolder"
    configure_world(sub.add_parser("world", help=help_text, description=help_text))


def run_cli(args: argparse.Namespace) -> int:
    return {"check": run_check, "world": run_world}[args.data_command](args)


def configure_check(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tune data check`."""
    parser.add_argument("path", metavar="PATH", help="photo folder, metadata.jsonl folder or saved dataset")
    parser.add_argument(
        "--resolution", type=int, default=None, help=f"training resolution (default {DataConfig.resolution})"
    )
    parser.add_argument(
        "--min-side",
        type=int,
        default=None,
        help=f"skip images whose shorter side is below this (default {DataConfig.min_side})",
    )


def run_check(args: argparse.Namespace) -> int:
    """Print the report; 0 when at least one image is usable, else 2 (one line on stderr)."""
    from tune.data.check import check_data, format_report  # imports torch

    overrides = {
        key: value
        for key, value in (("resolution", args.resolution), ("min_side", args.min_side))
        if value is not None
    }
    cfg = dataclasses.replace(DataConfig(), **overrides)
    report = check_data(args.path, cfg)
    print(format_report(report))
    if report.usable == 0:
        counts = (
            ", ".join(f"{n} {reason}" for reason, n in report.reason_counts().items()) or "no image files"
        )
        print(f"tune: error: no usable images in {report.source} ({counts})", file=sys.stderr)
        return 2
    return 0


def configure_world(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tune data world`."""
    parser.description = "Write renders of the built-in toy world as a Hugging Face imagefolder."
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="new or empty output folder")
    parser.add_argument("--count", type=int, default=30_000, help="number of images (default: 30000)")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help="train: no held-out pairs or looks; heldout: only the held-out (colour, class) pairs; "
        "all: everything but the example subjects' looks (default: train)",
    )
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="render processes (default: 2)"
    )
    parser.add_argument(
        "--masks",
        action="store_true",
        help="also write each object's mask (masks/, the mask_file_name column): the unet recipe's "
        "attention loss needs them",
    )


def run_world(args: argparse.Namespace) -> int:
    from tune.world.dataset import write_imagefolder

    out = write_imagefolder(
        args.out_dir,
        args.count,
        args.split,
        args.seed,
        args.resolution,
        workers=args.workers,
        progress=True,
        masks=args.masks,
    )
    masks = " and their masks" if args.masks else ""
    print(f"wrote {args.count} {args.split} images{masks} ({args.resolution}px, seed {args.seed}) to {out}")
    return 0
