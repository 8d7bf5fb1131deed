"""The `tune` command line: `main()` and the argparse wiring. Each command is one module here:

    tune ls                                         ls.py         recipes, their configs, concepts
    tune run <recipe>|FILE.py [--config NAME|FILE] [key=value ...] [--print-config] [--dry-run]
                                                    run.py        train with a recipe
    tune cp <recipe> DEST.py                        cp.py         copy a shipped recipe to edit and run
    tune sample --model PATH --prompt TEXT --out FILE.png [...]
                                                    sample.py     images from a model (+ LoRAs)
    tune eval RUN_DIR [...]                         eval.py       score a run's checkpoints
    tune export RUN_DIR [...]                       export.py     a run's LoRA as a file other tools load
    tune lora inspect | convert | merge ...         lora.py       LoRA files
    tune data check PATH | world OUT_DIR            data.py       photo folders, the toy world dataset
    tune dashboard [--runs DIR] [--port N]          dashboard.py  the Streamlit app

Every command module has `configure_cli(parser)` (its arguments) and `run_cli(args) -> exit code`;
only argument parsing and printing live here, the work is done by the library (tune.sampling,
tune.lora, tune.evaluation, ...). `recipe_files.py` finds recipes and their shipped configs.

User errors (`tune.errors.TuneError`) print one line and exit with code 2; anything else is a bug
and keeps its traceback. Only the module of the command being run is imported, so `tune --help` and
`tune ls` stay quick (torch and diffusers are imported by the commands that need them).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from tune import __version__
from tune.config import suggest
from tune.errors import TuneError

COMMANDS: dict[str, str] = {
    "ls": "list recipes, their configs and concepts",
    "run": "run a training recipe (a shipped one, or a recipe file made by `tune cp`)",
    "cp": "copy a shipped recipe to a file of your own, to edit and `tune run`",
    "sample": "generate images (prompt, seed, scheduler, LoRA, img2img, trajectory)",
    "export": "export a run's LoRA as kohya or diffusers files",
    "lora": "inspect, convert, merge, extract and resize LoRA files (kohya, LyCORIS, diffusers, PEFT)",
    "dashboard": "open the Streamlit dashboard over a runs folder",
    "eval": "evaluate a run: subject and prompt fidelity per checkpoint",
    "data": "inspect photo folders, write the built-in toy world dataset",
}
"""Command -> its help line; the command's code is the module `tune.cli.<command>`."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, exit code 2 and a 'did you mean' for unknown choices."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.search(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            argument, value = m.group(1), m.group(2)
            choices = re.findall(r"'([^']*)'", m.group(3))
            what = "command" if argument in ("COMMAND", "command") else f"value for {argument}"
            message = f"unknown {what} '{value}'{suggest(value, choices)}; choose from {', '.join(choices)}"
        raise TuneError(f"{message} (see '{self.prog} --help')")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in argv gets its module imported and its arguments added."""
    parser = _Parser(prog="tune", description="Fine-tune and personalize Stable Diffusion-family models.")
    parser.add_argument("--version", action="version", version=f"tune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    wanted = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if name == wanted:  # other commands' (heavy) modules stay unimported
            module = importlib.import_module(f"tune.cli.{name}")
            module.configure_cli(p)
            p.set_defaults(func=module.run_cli)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # The libraries' own chatter (download hints, deprecation notes) is noise for our users.
    for noisy in ("diffusers", "transformers", "accelerate", "huggingface_hub", "datasets", "peft"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv)
        # `tune run lora --dry-run seed=1 lr=2`: settings may come before or after the options.
        args, extra = parser.parse_known_args(argv)
        if extra:
            if args.command != "run" or any(x.startswith("-") for x in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
        _setup_logging(args.verbose, args.quiet)
        return int(args.func(args) or 0)
    except TuneError as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tune: interrupted", file=sys.stderr)
        return 130
