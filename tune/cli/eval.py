"""`tune eval`: score a personalization run's base model and checkpoints on one suite of prompts.

    tune eval RUN_DIR [--suite default|FILE] [--checkpoints all|last] [--guidance G] [--clip PATH] [--dino PATH]

Writes the suite's report.json and report.md (`evaluate_run`): RUN_DIR/eval/ for the default suite,
RUN_DIR/eval/<suite name>/ for any other, so every suite keeps its report. Prints the verdict
(`format_summary`) and the report.md path. The images are drawn at the suite's guidance; the world suites
say "run", the run's own (its config's `sample.guidance`); --guidance G draws at G instead.
"""

from __future__ import annotations

import argparse

from tune.errors import ConfigError
from tune.evaluation.report import format_summary
from tune.evaluation.run_dir import evaluate_run
from tune.evaluation.suites import DEFAULT_SUITE, suite_eval_dir


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tune eval`."""
    from tune.metrics import DEFAULT_CLIP

    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a lora, dreambooth or textual_inversion run directory"
    )
    parser.add_argument(
        "--suite",
        default=DEFAULT_SUITE,
        metavar="FILE",
        help="suite file or name in eval/ (default: default)",
    )
    parser.add_argument(
        "--checkpoints", choices=["all", "last"], default="all", help="which checkpoints (default: all)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="G",
        help="classifier-free guidance to draw at (default: the suite's; \"run\" in a suite: the run's own)",
    )
    parser.add_argument(
        "--clip", default=DEFAULT_CLIP, metavar="PATH", help=f"CLIPModel folder (default: {DEFAULT_CLIP})"
    )
    parser.add_argument("--dino", default=None, metavar="PATH", help="ViT/Dinov2 folder for DINO fidelity")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to run (default: cuda if available)",
    )


def run_cli(args: argparse.Namespace) -> int:
    """`tune eval`: write the report, print its verdict."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    report = evaluate_run(
        args.run_dir,
        args.suite,
        checkpoints=args.checkpoints,
        guidance=args.guidance,
        clip=args.clip,
        dino=args.dino,
        device=None if args.device == "auto" else args.device,
    )
    print(format_summary(report))
    print(suite_eval_dir(args.run_dir, report["suite"]) / "report.md")
    return 0
