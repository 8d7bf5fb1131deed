"""Every shipped recipe config loads strictly, and the keys every recipe shares mean the same in each:
they come from `tune.config.TrainConfig` (one type, one docstring, one validation), only defaults differ."""

from __future__ import annotations

import dataclasses
import importlib
import textwrap
import typing

import pytest

from tune import PROJECT_ROOT
from tune.cli.recipe_files import recipe_names
from tune.config import TrainConfig, field_docs, load_config, to_toml
from tune.errors import ConfigError

SHARED_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
CONFIGS = sorted((PROJECT_ROOT / "recipes" / "configs").glob("*/*.toml"))


def config_class(name: str) -> type:
    return importlib.import_module(f"recipes.{name}").Config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_strictly(path) -> None:
    recipe = importlib.import_module(f"recipes.{path.parent.name}")
    cfg = load_config(recipe.Config, path, [])
    assert cfg.max_steps > 0


def test_the_shared_keys_are_the_run_keys() -> None:
    assert set(SHARED_KEYS) == {
        "output_dir",
        "seed",
        "resume",
        "max_steps",
        "batch_size",
        "mixed_precision",
        "sample_every",
        "checkpoint_every",
        "checkpoints_keep",
        "max_nonfinite_steps",
    }


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_takes_the_shared_keys_from_train_config(name: str) -> None:
    cls = config_class(name)
    assert issubclass(cls, TrainConfig)
    hints, base_hints = typing.get_type_hints(cls), typing.get_type_hints(TrainConfig)
    docs, base_docs = field_docs(cls), field_docs(TrainConfig)
    for key in SHARED_KEYS:
        assert hints[key] == base_hints[key], key  # same type (and choices) everywhere
        assert docs[key] == base_docs[key], key  # a recipe changes a default, never the meaning


@pytest.mark.parametrize("name", recipe_names())
def test_shared_keys_are_validated_the_same(name: str) -> None:
    cls = config_class(name)
    # 0 = never (sample_every), only at the last step (checkpoint_every), keep all (checkpoints_keep).
    cfg = load_config(cls, None, ["sample_every=0", "checkpoint_every=0", "checkpoints_keep=0"])
    assert (cfg.sample_every, cfg.checkpoint_every, cfg.checkpoints_keep) == (0, 0, 0)
    for choice in ("auto", "no", "bf16", "fp16"):
        assert load_config(cls, None, [f"mixed_precision={choice}"]).mixed_precision == choice
    for key in ("max_steps", "batch_size", "max_nonfinite_steps"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 1; got 0"):
            load_config(cls, None, [f"{key}=0"])
    for key in ("sample_every", "checkpoint_every", "checkpoints_keep"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 0; got -1"):
            load_config(cls, None, [f"{key}=-1"])
    with pytest.raises(ConfigError, match="did you mean 'sample_every'"):
        load_config(cls, None, ["sample_evry=3"])


@pytest.mark.parametrize(
    ("name", "key"),
    [("unet", "resolution"), ("unet", "sample_steps"), ("clip", "patch_size"), ("clip", "text_num_heads")],
)
def test_recipe_bounds_are_worded_as_the_shared_keys_are(name: str, key: str) -> None:
    # tune.config.check_at_least: max_steps' words (clip's patch_size=0 or *_num_heads=0 divided by zero before).
    with pytest.raises(ConfigError, match=f"{key} must be >= 1; got 0"):
        load_config(config_class(name), None, [f"{key}=0"])


@pytest.mark.parametrize("name", recipe_names())
def test_shared_keys_are_documented_in_the_saved_config(name: str) -> None:
    text = to_toml(config_class(name)(), comments=True)
    for key, doc in field_docs(TrainConfig).items():
        comment = "\n".join(f"# {line}" for line in textwrap.wrap(doc, 96))
        assert f"{comment}\n{key} =" in text, key
