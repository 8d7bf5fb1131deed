"""Every shipped recipe config loads strictly, and the keys every recipe shares are spelled the same."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from tune import PROJECT_ROOT
from tune.cli.recipe_files import recipe_names
from tune.config import load_config

SHARED_KEYS = (
    "output_dir",
    "seed",
    "resume",
    "max_steps",
    "batch_size",
    "checkpoint_every",
    "checkpoints_keep",
)
CONFIGS = sorted((PROJECT_ROOT / "recipes" / "configs").glob("*/*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_strictly(path) -> None:
    recipe = importlib.import_module(f"recipes.{path.parent.name}")
    cfg = load_config(recipe.Config, path, [])
    assert cfg.max_steps > 0


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_spells_the_shared_keys_the_same(name: str) -> None:
    fields = {f.name for f in dataclasses.fields(importlib.import_module(f"recipes.{name}").Config)}
    assert set(SHARED_KEYS) <= fields, sorted(set(SHARED_KEYS) - fields)
