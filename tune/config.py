"""Strict configs: frozen dataclasses filled from TOML files and `a.b=value` command-line overrides.

A recipe's `Config` is a frozen dataclass; its field defaults are the only defaults, and each field
carries a docstring (a string literal on the line after it). Values come, in increasing precedence,
from the dataclass defaults, a TOML file (values only), and `key=value` overrides whose values are
parsed as TOML literals (`lr=1e-4`, `flip=true`, `prompts=["a", "b"]`); a value that is not a TOML
literal is taken as a plain string (`instance_prompt=a photo of sks toy`).

Unknown keys, wrong types and bad choices raise `ConfigError` naming the key, with a suggestion.
Nested dataclass fields are TOML tables (`[optim]` in a file, `optim.lr=...` on the command line).

`TrainConfig` holds the run keys every recipe takes (output_dir, seed, resume, max_steps, ...), each with
one meaning and one docstring; a recipe's `Config` extends it and may re-declare a field only to change
its default (its docstring stays TrainConfig's).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w

from tune.errors import ConfigError

T = TypeVar("T")
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------------------------------------
# The run keys every recipe shares.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Keys every training recipe takes; each recipe's `Config` extends this. A recipe re-declares a field
    only to give it its own default (`max_steps: int = 3200`), never another meaning or docstring."""

    output_dir: str = ""
    """Run directory; "" means runs/<recipe>-<timestamp>."""
    seed: int = 0
    """Seed of everything training draws: initial weights, data order, noise and timesteps. Per-step
    draws depend on (seed, step) only, so a resumed run repeats an uninterrupted one."""
    resume: str = ""
    """"" (start fresh), "latest" (newest complete checkpoint of output_dir) or a checkpoint folder."""
    max_steps: int = 400
    """Optimizer steps."""
    batch_size: int = 1
    """Training examples per step (per micro-batch where the recipe has gradient accumulation)."""
    mixed_precision: MixedPrecision = "no"
    """bf16/fp16 autocast on a GPU (a fine-tuned base keeps its frozen weights in that type); "auto" picks
    bf16 where the GPU has it, else fp16; "no" trains in fp32, as every CPU run does."""
    sample_every: int = 200
    """Validation (grids, metrics) every this many steps and at the last step (fine-tunes also at step 0,
    showing the base model); 0 = never."""
    checkpoint_every: int = 200
    """Checkpoint every this many steps and at the last step; 0 = only at the last step."""
    checkpoints_keep: int = 2
    """Newest checkpoints kept (0 keeps all)."""
    max_nonfinite_steps: int = 5
    """A step whose loss is NaN or infinite is skipped (no update) and logged; this many in a row stop the
    run with an error, its checkpoints untouched."""

    def __post_init__(self) -> None:
        check_at_least(self, ("max_steps", "batch_size", "max_nonfinite_steps"), 1)
        check_at_least(self, ("sample_every", "checkpoint_every", "checkpoints_keep"), 0)


def check_at_least(config: object, keys: typing.Iterable[str], minimum: int) -> None:
    """ConfigError "<key> must be >= <minimum>; got <value>" for the first of `keys` below `minimum`: the
    bound checks of TrainConfig and the recipes' configs, in one wording."""
    for key in keys:
        if getattr(config, key) < minimum:
            raise ConfigError(f"{key} must be >= {minimum}; got {getattr(config, key)}")


# ---------------------------------------------------------------------------------------------
# Field documentation: the attribute docstrings written under each field.
# ---------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written on the line after it in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for stmt, nxt in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


# ---------------------------------------------------------------------------------------------
# Conversion of plain values (from TOML) into typed dataclass fields, with clear errors.
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "nothing"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists to tuples, int to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        names = ", ".join(str(c) for c in choices)
        hint = suggest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{key} must be one of {names}; got {value!r}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of settings; got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a recipe author used an annotation this module does not support
        raise TypeError(f"config field {key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for name in values:
        if name not in fields:
            raise ConfigError(f"unknown key '{prefix}{name}'{suggest(name, fields)}")
    values = dict(values)
    for name, value in values.items():
        # A partial table (`optim.lr=...`) overrides the recipe's own default for that table
        # (e.g. its OptimConfig(lr=1e-3, schedule="cosine")), not the sub-config class defaults.
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            values[name] = {**_plain(default), **value}
    kwargs = {name: _convert(v, hints[name], prefix + name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (tables included), for suggestions."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], f"{prefix}{f.name}."))
    return keys


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value parsed as a TOML literal, or the raw text if it is not one)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from None


def load_config(cls: type[T], file: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then `file` (TOML), then `overrides` (`a.b=value` strings)."""
    values: dict[str, Any] = read_toml(file) if file is not None else {}
    file_values = copy.deepcopy(values)
    hints_by_key = _leaf_types(cls)
    for item in overrides:
        key, value = parse_override(item)
        if key not in hints_by_key:
            if key not in all_keys(cls):
                raise ConfigError(f"unknown key '{key}'{suggest(key, all_keys(cls))}")
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key} is a table of settings: set {key}.<name>=value or {key}={{name=value}}"
                )
        # A value typed on the command line for a text field is text, even if it looks like a number.
        elif _accepts_str(hints_by_key[key]) and not isinstance(value, str):
            value = item.partition("=")[2].strip()
        *parents, leaf = key.split(".")
        table = values
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{part} is not a table of settings")
        table[leaf] = value
    try:
        return _build(cls, values)
    except ConfigError as err:
        if file is None:
            raise
        if overrides:
            # Blame the file only if it is wrong on its own; otherwise a command-line value is.
            try:
                _build(cls, file_values)
            except ConfigError:
                pass
            else:
                raise ConfigError(f"{err} (from the command line)") from None
        raise ConfigError(f"{err} (in {file})") from None


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def _plain(instance: Any) -> dict[str, Any]:
    """A dataclass instance as the plain values a TOML table would hold (None kept)."""
    return {
        f.name: _plain(v) if dataclasses.is_dataclass(v := getattr(instance, f.name)) else v
        for f in dataclasses.fields(instance)
    }


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain TOML-ready values (tuples become lists; None fields are left out)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {
                f.name: plain(getattr(v, f.name))
                for f in dataclasses.fields(v)
                if getattr(v, f.name) is not None
            }
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def to_toml(cfg: Any, *, comments: bool = False) -> str:
    """Serialise a config; with `comments`, each key is preceded by its field docstring."""
    text = tomli_w.dumps(to_dict(cfg))
    if not comments:
        return text
    return _annotate(text, type(cfg))


def _annotate(text: str, cls: type) -> str:
    """Insert `# doc` lines above each key of a tomli_w dump (tables resolved through nested classes)."""
    docs_by_table: dict[str, dict[str, str]] = {}

    def collect(klass: type, table: str) -> None:
        docs_by_table[table] = field_docs(klass)
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if dataclasses.is_dataclass(hints[f.name]):
                collect(hints[f.name], f"{table}.{f.name}" if table else f.name)

    collect(cls, "")
    out, table = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            table = stripped.strip("[]")
        elif "=" in line and not line.startswith(" "):
            key = line.split("=", 1)[0].strip()
            doc = docs_by_table.get(table, {}).get(key)
            if doc:
                out.extend(f"# {chunk}" for chunk in textwrap.wrap(doc, 96))
        out.append(line)
    return "\n".join(out) + "\n"
