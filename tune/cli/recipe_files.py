"""Where recipes and their configs are: `tune ls`, `tune run` and `tune cp` look them up here.

A recipe is a module with a `Config` dataclass and `main(cfg)`: a shipped one is `recipes/<name>.py`
(run by name), a recipe file is any `.py` path (e.g. one written by `tune cp`). Both name their recipe
in `RECIPE = "<name>"`, so `--config NAME` finds `recipes/configs/<name>/NAME.toml` for a copy too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import re
import sys
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


def recipe_source(name: str) -> Path:
    """The file of a shipped recipe, found without importing it (recipes import torch)."""
    check_recipe_name(name)
    spec = importlib.util.find_spec(f"recipes.{name}")
    if spec is None or spec.origin is None:
        raise TuneError(f"recipe '{name}' has no source file to read")
    return Path(spec.origin)


def load_recipe_file(path: str | Path) -> ModuleType:
    """Import a recipe file from its path (not from the `recipes` package) and check it is a recipe."""
    file = Path(path)
    if not file.is_file():
        raise TuneError(f"recipe file {file} not found; `tune cp <recipe> {file}` writes one to edit")
    # A name of its own in sys.modules: dataclasses and typing.get_type_hints look a class's module up
    # by name, and a plain stem could shadow a real module (a recipe file called json.py).
    name = "_tune_recipe_file_" + re.sub(r"\W", "_", file.stem)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise TuneError(f"cannot import {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    missing = [attr for attr in ("Config", "main") if not hasattr(module, attr)]
    if missing:
        raise TuneError(f"{file} is not a recipe: it has no {' and no '.join(missing)} (see `tune cp`)")
    return module


def configs_folder(name: str) -> Path:
    """Where recipe `name`'s shipped configs are: recipes/configs/<name>/."""
    return PROJECT_ROOT / "recipes" / "configs" / name


def recipe_configs(name: str) -> list[Path]:
    folder = configs_folder(name)
    return sorted(folder.glob("*.toml")) if folder.is_dir() else []


def resolve_config(config: str, recipe: str | None) -> str:
    """--config: a TOML file, else the name of one of `recipe`'s shipped configs (e.g. tiny)."""
    if Path(config).is_file():
        return config
    if recipe is None:
        raise ConfigError(
            f'config file {config} not found; this recipe file has no RECIPE = "<name>" line, so '
            "--config must be the path of a TOML file"
        )
    shipped = configs_folder(recipe) / config
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
