"""Property-based tests (hypothesis): the config parser and the LoRA file loader, fed random input, either
succeed or raise one of our clear errors (`TuneError` subclasses), never anything else (issue 10)."""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from recipes import lora as recipe
from tune import lora as lora_io
from tune.config import all_keys, load_config
from tune.errors import TuneError

# TUNE_FUZZ_EXAMPLES=2000 for a longer hunt; the default keeps the suite quick.
FUZZ = settings(
    max_examples=int(os.environ.get("TUNE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KEYS = all_keys(recipe.Config)

# ---------------------------------------------------------------------------------------------------
# Config: random TOML files and key=value overrides
# ---------------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),  # tests flush denormals
    st.text(max_size=12),
    st.sampled_from(["fp16", "attn2", "cosine", "latest", "center", "", "adamw", "none"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS + ["x", "rank"]), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(alphabet=string.ascii_letters + "._-= ", max_size=12))


def _literal(value: Any) -> str:
    """A value as a command line writes it: a TOML literal where there is one, else raw text."""
    try:
        return tomli_w.dumps({"v": value}).partition("=")[2].strip()
    except (TypeError, ValueError):
        return str(value)


overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={_literal(v)}", keys, values),
        st.text(max_size=20),  # anything at all, '=' or not
    ),
    max_size=4,
)


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = table
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[leaf] = value
    return table


files = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=5).map(_nested),
    st.text(max_size=40),  # raw text, usually not TOML
    st.binary(max_size=40),  # not even UTF-8
)


def _write_config(content: Any, folder: Path) -> Path | None:
    if content is None:
        return None
    path = folder / "config.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        try:
            path.write_text(tomli_w.dumps(content), encoding="utf-8")
        except (TypeError, ValueError):  # e.g. a NaN inside a list tomli_w refuses: write it raw
            path.write_text(str(content), encoding="utf-8", errors="surrogatepass")
    return path


@FUZZ
@given(content=files, items=overrides)
def test_config_parser_raises_only_config_errors(content: Any, items: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = _write_config(content, Path(folder))
        except UnicodeEncodeError:  # a lone surrogate cannot be a file's text
            return
        try:
            cfg = load_config(recipe.Config, path, items)
        except TuneError:
            return
    assert isinstance(cfg, recipe.Config)


# ---------------------------------------------------------------------------------------------------
# LoRA files: random keys, shapes, dtypes, metadata
# ---------------------------------------------------------------------------------------------------

STEMS = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
    "lora_unet_mid_block_attentions_0_proj_in",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_0_mlp_fc1",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "unet.up_blocks.1.resnets.0.conv1",
    "text_encoder.text_model.encoder.layers.0.self_attn.v_proj",
    "base_model.model.down_blocks.1.attentions.0.proj_out",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora",
    "something_else",
]
SUFFIXES = [
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora.down.weight",
    ".lora_linear_layer.up.weight",
    ".weight",
    "",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]
shapes = st.lists(st.integers(min_value=0, max_value=5), max_size=4)
tensors = st.dictionaries(
    st.one_of(
        st.builds(str.__add__, st.sampled_from(STEMS), st.sampled_from(SUFFIXES)), st.text(max_size=10)
    ),
    st.tuples(shapes, st.sampled_from(DTYPES), st.sampled_from([0.0, 1.0, float("nan"), 1e30])),
    max_size=6,
)
metadata = st.dictionaries(
    st.sampled_from(
        ["ss_network_dim", "ss_network_alpha", "lora_adapter_metadata", "modelspec.architecture", "x"]
    ),
    st.one_of(
        st.text(max_size=12), st.sampled_from(['{"unet.r": 4}', "{", "stable-diffusion-xl-v1-base/lora"])
    ),
    max_size=3,
)


def _tensor(shape: list[int], dtype: torch.dtype, fill: float) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype)
    if not dtype.is_floating_point:
        fill = 1.0 if fill != fill or abs(fill) > 1e3 else fill
    return torch.full(shape, fill, dtype=torch.float64).to(dtype)  # 1e30 becomes inf in fp16


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir: str) -> Any:
    from tune.models import load_pipeline

    return load_pipeline(tiny_pipeline_dir)


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=tensors, meta=metadata, garbage=st.booleans())
def test_lora_loader_raises_only_model_errors(
    content: dict, meta: dict, garbage: bool, tiny_pipe: Any
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        state = {key: _tensor(*spec) for key, spec in content.items()}
        try:
            save_file(state, str(path), metadata=meta)
        except Exception:  # safetensors refuses some of our random states (e.g. empty names): write bytes
            path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + bytes(range(8)))
        if garbage:  # a truncated file
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        readers = (
            lora_io.read_lora,
            lora_io.inspect_lora,
            lambda p: lora_io.apply_loras(tiny_pipe, [(p, 1.0)]).clear(),  # merged, then restored
        )
        for read in readers:
            try:
                read(path)
            except TuneError:
                pass
