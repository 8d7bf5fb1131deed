"""`tune run`: train with a recipe, a shipped one by name or a recipe file by path.

    tune run <recipe> [--config NAME|FILE] [key=value ...] [--print-config] [--dry-run]
    tune run mine.py --config tiny output_dir=runs/mine     a file made by `tune cp lora mine.py`

The recipe's `Config` is loaded from its dataclass defaults < the --config TOML < the key=value
settings (`tune.config.load_config`), then `main(cfg)` runs. `--config NAME` is one of the recipe's
shipped configs, `recipes/configs/<recipe>/NAME.toml`; a recipe file says which recipe it is in its
`RECIPE = "<name>"` line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tune.cli.recipe_files import load_recipe, load_recipe_file, resolve_config
from tune.config import load_config, to_toml
from tune.errors import ConfigError

log = logging.getLogger("tune")


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (see `tune ls`) or a recipe file (.py, see `tune cp`)")
    parser.add_argument("--config", help="TOML file, or the name of a shipped config (e.g. tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. optim.lr=1e-4")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config with docs and exit"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate the config and exit without running")


def run_cli(args: argparse.Namespace) -> int:
    if args.recipe.endswith(".py"):
        module = load_recipe_file(args.recipe)
        recipe = getattr(module, "RECIPE", None)
    else:
        module = load_recipe(args.recipe)
        recipe = args.recipe
    config_file = None if args.config is None else resolve_config(args.config, recipe)
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
