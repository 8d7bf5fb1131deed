"""`tune export`: a LoRA run's adapter as a file other tools load.

    tune export RUN_DIR [--format kohya|diffusers] [--dtype fp16|bf16|fp32] [--step N] [--out FILE] [--force]

Source: the run's final adapter (`export/pytorch_lora_weights.safetensors`), else its newest complete
checkpoint's; `--step N` picks `checkpoints/step_NNNNNN/lora.safetensors`. Target (without --out):
`<run>/export/<run name>[-step_NNNNNN].safetensors` (kohya) or
`<run>/export/diffusers[-step_NNNNNN]/pytorch_lora_weights.safetensors` (diffusers). An existing file
is never overwritten without --force. Key names and metadata follow the run's base model family (SDXL:
SGM U-Net names, lora_te1_/lora_te2_, sdxl_base_v1-0). Prints the written path. Formats: `tune.lora`.
"""

from __future__ import annotations

import argparse
import logging

from tune.errors import ConfigError
from tune.lora import DTYPES, FORMATS, export_run

logger = logging.getLogger(__name__)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tune export`."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a LoRA run directory")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="kohya",
        help="kohya (A1111, ComfyUI, kohya, diffusers) or diffusers",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="tensor dtype (default: fp16)")
    parser.add_argument(
        "--step", type=int, default=None, help="export this checkpoint instead of the final adapter"
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="where to write (.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run_cli(args: argparse.Namespace) -> int:
    """`tune export`: write the file, print its path."""
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step must be >= 0; got {args.step}")
    path = export_run(
        args.run_dir, args.format, dtype=DTYPES[args.dtype], step=args.step, out=args.out, force=args.force
    )
    print(path)
    return 0
