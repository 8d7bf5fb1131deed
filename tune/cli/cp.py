"""`tune cp`: copy a shipped recipe to a file of your own, to read, edit and run.

    tune cp lora mine.py
    tune run mine.py --config tiny output_dir=runs/mine

The copy is the recipe's file byte for byte, including its `RECIPE = "lora"` line, which tells
`tune run mine.py --config NAME` to use the shipped `recipes/configs/lora/NAME.toml`. An existing
file is never overwritten.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tune.cli.recipe_files import recipe_source
from tune.errors import ConfigError

log = logging.getLogger("tune")


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a shipped recipe (see `tune ls`)")
    parser.add_argument("dest", metavar="DEST.py", help="the new file (a folder: DEST/<recipe>.py)")


def run_cli(args: argparse.Namespace) -> int:
    """Write the copy, print its path."""
    source = recipe_source(args.recipe)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.suffix != ".py":
        raise ConfigError(f"DEST must end in .py, so that `tune run` can import it; got {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with dest.open("xb") as f:  # "x": fails if the file exists, even if it appeared just now
            f.write(source.read_bytes())
    except FileExistsError:
        raise ConfigError(
            f"{dest} already exists; tune cp never overwrites a file: choose another name"
        ) from None
    print(dest)
    log.info(
        "run it with: tune run %s --config tiny   (or any config in recipes/configs/%s/)", dest, args.recipe
    )
    return 0
