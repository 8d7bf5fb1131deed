"""Where recipes and their configs are: `tune ls` and `tune run` look them up here.

A recipe is a module `recipes/<name>.py` with a `Config` dataclass and `main(cfg)`; its shipped configs
are `recipes/configs/<name>/*.toml`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType

from tune import PROJECT_ROOT
from tune.config import suggest
from tune.errors import ConfigError, TuneError


def recipe_names() -> list[str]:
    import recipes

    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def check_recipe_name(name: str) -> None:
    names = recipe_names()
    if name not in names:
        listed = ", ".join(names) or "none installed"
        raise TuneError(f"unknown recipe '{name}'{suggest(name, names)}; recipes: {listed}")


def load_recipe(name: str) -> ModuleType:
    check_recipe_name(name)
    return importlib.import_module(f"recipes.{name}")


def recipe_configs(name: str) -> list[Path]:
    folder = PROJECT_ROOT / "recipes" / "configs" / name
    return sorted(folder.glob("*.toml")) if folder.is_dir() else []


def resolve_config(config: str, recipe: str) -> str:
    """--config: a TOML file, else the name of one of `recipe`'s shipped configs (e.g. tiny)."""
    if Path(config).is_file():
        return config
    shipped = PROJECT_ROOT / "recipes" / "configs" / recipe / config
    shipped = shipped if shipped.suffix else shipped.with_suffix(".toml")
    if not shipped.is_file():
        names = [p.stem for p in recipe_configs(recipe)]
        raise ConfigError(f"config file {config} not found{suggest(Path(config).stem, names)}")
    return str(shipped)


def recipe_summary(name: str) -> str:
    """First line of a recipe's docstring, read without importing it (recipes import torch)."""
    spec = importlib.util.find_spec(f"recipes.{name}")  # locates the file; does not run it
    if spec is None or spec.origin is None:
        return ""
    source = Path(spec.origin).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
