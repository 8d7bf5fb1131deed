"""The `tune` command line.

    tune ls                                   recipes, their configs, concepts
    tune run <recipe> [--config FILE] [key=value ...] [--print-config] [--dry-run]
    tune sample --model PATH --prompt TEXT --out FILE.png [...]
    tune export | eval | dashboard | data | lora ...

User errors (`tune.errors.TuneError`) print one line and exit with code 2; anything else is a bug
and keeps its traceback. Heavy modules (torch, diffusers) are imported only by the command that
needs them, so `tune --help` and `tune ls` stay quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType

from tune import PROJECT_ROOT, __version__
from tune.config import load_config, suggest, to_toml
from tune.errors import ConfigError, TuneError

log = logging.getLogger("tune")


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


# ---------------------------------------------------------------------------------------------
# Recipes: modules of the `recipes` package, each with a `Config` dataclass and `main(cfg)`.
# ---------------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    import recipes

    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def load_recipe(name: str) -> ModuleType:
    names = recipe_names()
    if name not in names:
        listed = ", ".join(names) or "none installed"
        raise TuneError(f"unknown recipe '{name}'{suggest(name, names)}; recipes: {listed}")
    return importlib.import_module(f"recipes.{name}")


def recipe_configs(name: str) -> list[Path]:
    folder = PROJECT_ROOT / "recipes" / "configs" / name
    return sorted(folder.glob("*.toml")) if folder.is_dir() else []


def recipe_summary(name: str) -> str:
    """First line of a recipe's docstring, read without importing it (recipes import torch)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(f"recipes.{name}")  # locates the file; does not run it
    if spec is None or spec.origin is None:
        return ""
    source = Path(spec.origin).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def cmd_ls(args: argparse.Namespace) -> int:
    print("recipes:")
    for name in recipe_names():
        print(f"  {name:<20} {recipe_summary(name)}")
        for cfg in recipe_configs(name):
            print(f"  {'':<20}   config: {cfg.relative_to(PROJECT_ROOT)}")
    print("concepts:")
    concepts = sorted((PROJECT_ROOT / "concepts").glob("*/concept.toml"))
    for c in concepts:
        print(f"  {c.parent.name:<20} {c.parent.relative_to(PROJECT_ROOT)}")
    if not concepts:
        print("  (none)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    module = load_recipe(args.recipe)
    config_file = args.config
    if config_file is not None and not Path(config_file).is_file():
        shipped = PROJECT_ROOT / "recipes" / "configs" / args.recipe / config_file
        shipped = shipped if shipped.suffix else shipped.with_suffix(".toml")
        if not shipped.is_file():
            names = [p.stem for p in recipe_configs(args.recipe)]
            raise ConfigError(f"config file {config_file} not found{suggest(Path(config_file).stem, names)}")
        config_file = str(shipped)
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"unexpected argument '{item}': settings look like key=value, e.g. seed=1")
    cfg = load_config(module.Config, config_file, args.overrides)
    if args.print_config:
        sys.stdout.write(to_toml(cfg, comments=True))
        return 0
    if args.dry_run:
        sys.stdout.write(to_toml(cfg))
        log.info("dry run: config for recipe '%s' is valid; nothing was run", args.recipe)
        return 0
    run = module.main(cfg)
    log.info("run finished: %s", getattr(run, "path", run))
    return 0


# ---------------------------------------------------------------------------------------------
# Commands implemented in their own modules: each exposes configure_cli(parser) and run_cli(args).
# ---------------------------------------------------------------------------------------------

MODULE_COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("tune.sampling", "generate images (prompt, seed, scheduler, LoRA, img2img, trajectory)"),
    "export": ("tune.export_cli", "export a run's LoRA as kohya or diffusers files"),
    "lora": ("tune.lora_cli", "inspect, convert and merge LoRA files (kohya, diffusers, PEFT)"),
    "dashboard": ("tune.dashboard_cli", "open the Streamlit dashboard over a runs folder"),
    "eval": ("tune.evaluation.cli", "evaluate a run: subject and prompt fidelity per checkpoint"),
}
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("tune.data.check", "check a photo folder: usable images, skipped files, captions, buckets"),
    "world": ("tune.world.dataset", "write renders of the built-in toy world as a captioned imagefolder"),
}


def _module_command(module_name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(module_name), None
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return None, f"this version of tune has no {module_name}"
        raise


def _wanted(argv: list[str]) -> list[str]:
    """The command words of argv (e.g. ['data', 'check']): only their modules get imported."""
    return [a for a in argv if not a.startswith("-")][:2]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="tune", description="Fine-tune and personalize Stable Diffusion-family models.")
    parser.add_argument("--version", action="version", version=f"tune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("ls", help="list recipes, their configs and concepts")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("run", help="run a training recipe", description="Run a training recipe.")
    p.add_argument("recipe", help="recipe name (see `tune ls`)")
    p.add_argument("--config", help="TOML file, or the name of a shipped config (e.g. tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. optim.lr=1e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config with docs and exit")
    p.add_argument("--dry-run", action="store_true", help="validate the config and exit without running")
    p.set_defaults(func=cmd_run)

    wanted = _wanted(argv or [])
    for name, (module_name, help_text) in MODULE_COMMANDS.items():
        _add_module_command(sub, name, module_name, help_text, load=wanted[:1] == [name])

    data = sub.add_parser("data", help="inspect photo folders, write the built-in toy world dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", parser_class=_Parser)
    data_sub.required = True
    for name, (module_name, help_text) in DATA_COMMANDS.items():
        _add_module_command(data_sub, name, module_name, help_text, load=wanted == ["data", name])

    return parser


def _add_module_command(
    sub: argparse._SubParsersAction, name: str, module_name: str, help_text: str, *, load: bool
) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    if not load:  # not the command being run: keep its (heavy) module unimported
        return
    module, missing = _module_command(module_name)
    if module is None:
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=_planned(name, missing))
        return
    module.configure_cli(p)
    p.set_defaults(func=module.run_cli)


def _planned(name: str, why: str | None = None):  # noqa: ANN202
    def run(args: argparse.Namespace) -> int:
        raise TuneError(f"'tune {name}' is not available in this version of tune{f' ({why})' if why else ''}")

    return run


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


if __name__ == "__main__":
    sys.exit(main())
