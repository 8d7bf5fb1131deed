"""Strict configs: precedence, types, choices, unknown keys, docs, round trip through TOML."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from tune.config import field_docs, load_config, parse_override, to_dict, to_toml
from tune.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    """Optimizer name."""
    lr: float = 1e-4
    """Learning rate."""


@dataclass(frozen=True)
class Config:
    output_dir: str = ""
    """Where the run goes."""
    seed: int = 0
    """Random seed."""
    max_steps: int = 10
    """Training steps."""
    flip: bool = False
    """Random horizontal flip."""
    instance_prompt: str = "a photo of sks toy"
    """Prompt for every photo."""
    prompts: tuple[str, ...] = ("a", "b")
    """Validation prompts."""
    base_model: str | None = None
    """Optional base model."""
    optim: Optim = field(default_factory=Optim)
    """Optimizer settings."""

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ConfigError(f"max_steps must be > 0; got {self.max_steps}")


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_file_cli_precedence(tmp_path):
    f = write(tmp_path, "seed = 5\nmax_steps = 20\n[optim]\nlr = 0.5\n")
    assert load_config(Config).seed == 0
    cfg = load_config(Config, f)
    assert (cfg.seed, cfg.max_steps, cfg.optim.lr, cfg.optim.name) == (5, 20, 0.5, "adamw")
    cfg = load_config(Config, f, ["seed=7", "optim.name=adamw8bit", "optim.lr=3e-4"])
    assert (cfg.seed, cfg.max_steps, cfg.optim.lr, cfg.optim.name) == (7, 20, 3e-4, "adamw8bit")


def test_cli_values_parse_as_toml_literals():
    cfg = load_config(
        Config, None, ["flip=true", 'prompts=["x", "y z"]', "optim.lr=1", "base_model=models/x"]
    )
    assert cfg.flip is True
    assert cfg.prompts == ("x", "y z")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.base_model == "models/x"
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)


def test_text_fields_keep_text_that_looks_like_a_number():
    cfg = load_config(Config, None, ["instance_prompt=a photo of sks toy", "output_dir=123"])
    assert cfg.instance_prompt == "a photo of sks toy"
    assert cfg.output_dir == "123"
    assert load_config(Config, None, ['instance_prompt="quoted"']).instance_prompt == "quoted"


@pytest.mark.parametrize(
    "override, message",
    [
        ("sed=1", "unknown key 'sed' (did you mean 'seed'?)"),
        ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("seed=1.5", "seed must be int; got 1.5"),
        ("seed=true", "seed must be int; got True"),
        ("flip=yes", "flip must be bool; got 'yes'"),
        ("optim.name=adam", "optim.name must be one of adamw, adamw8bit; got 'adam' (did you mean 'adamw'?)"),
        ("max_steps=0", "max_steps must be > 0; got 0"),
        ("prompts=3", "prompts must be a list; got 3"),
        ("seed", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Config, None, [override])
    assert message in str(err.value)


def test_bad_file_values_name_key_and_file(tmp_path):
    f = write(tmp_path, "[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'.*c\.toml"):
        load_config(Config, f)
    with pytest.raises(ConfigError, match="optim must be a table"):
        load_config(Config, write(tmp_path, "optim = 3\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Config, write(tmp_path, "seed = = 1\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Config, tmp_path / "missing.toml")


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(Config, None, ["seed=9", "optim.lr=0.25", 'prompts=["p q"]', "base_model=m"])
    again = load_config(Config, write(tmp_path, to_toml(cfg)))
    assert again == cfg
    assert to_dict(load_config(Config)).get("base_model") is None  # None is left out of TOML


def test_docs_are_read_from_the_class_and_printed():
    assert field_docs(Config)["seed"] == "Random seed."
    text = to_toml(load_config(Config), comments=True)
    assert "# Random seed.\nseed = 0" in text
    assert "# Learning rate.\nlr = " in text


@dataclass(frozen=True)
class RecipeConfig:
    seed: int = 0
    """Seed."""
    optim: Optim = field(default_factory=lambda: Optim(name="adamw8bit", lr=1e-3))
    """This recipe's own optimizer defaults."""


def test_partial_table_keeps_the_recipes_own_nested_defaults(tmp_path):
    assert load_config(RecipeConfig).optim == Optim(name="adamw8bit", lr=1e-3)
    assert load_config(RecipeConfig, None, ["optim.lr=5e-4"]).optim == Optim(name="adamw8bit", lr=5e-4)
    f = write(tmp_path, "[optim]\nlr = 0.5\n")
    assert load_config(RecipeConfig, f).optim == Optim(name="adamw8bit", lr=0.5)
    cfg = load_config(Config, None, ["base_model=x"])
    assert load_config(Config, write(tmp_path, to_toml(cfg))) == cfg


def test_whole_table_override():
    assert load_config(RecipeConfig, None, ["optim={lr = 2.0}"]).optim == Optim(name="adamw8bit", lr=2.0)
    with pytest.raises(ConfigError, match="optim is a table of settings"):
        load_config(RecipeConfig, None, ["optim=3"])


def test_errors_name_where_the_bad_value_came_from(tmp_path):
    good = write(tmp_path, "seed = 5\n")
    with pytest.raises(ConfigError, match=r"max_steps must be > 0; got 0 \(from the command line\)"):
        load_config(Config, good, ["max_steps=0"])
    bad = tmp_path / "bad.toml"
    bad.write_text("max_steps = 0\n")
    with pytest.raises(ConfigError, match=r"max_steps must be > 0; got 0 \(in .*bad\.toml\)"):
        load_config(Config, bad, ["seed=1"])
    assert load_config(Config, bad, ["max_steps=3"]).max_steps == 3  # the command line may fix a file
