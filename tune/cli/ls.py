"""`tune ls`: the shipped recipes with their configs, and the example concepts (no arguments)."""

from __future__ import annotations

import argparse

from tune import PROJECT_ROOT
from tune.cli.recipe_files import recipe_configs, recipe_names, recipe_summary


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """`tune ls` takes no arguments."""


def run_cli(args: argparse.Namespace) -> int:
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
