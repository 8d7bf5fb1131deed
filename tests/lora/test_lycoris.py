"""LoHa, LoKr and DoRA files: reading PEFT-named run adapters, kohya/LyCORIS export, what ComfyUI and
A1111 compute from our files (emulated from the reference), merging, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lycoris_files import CASES, inject_random, peft_deltas, write_adapter_file
from safetensors import safe_open
from tool_rules import a1111_delta, a1111_load, a1111_module_type, comfy_delta, comfy_key_map, comfy_load
from test_lora_export import model_names

from tune import lora as lora_io
from tune.errors import ConfigError, ModelError
from tune.models import load_pipeline

LYCORIS_CASES = [case for case in CASES if CASES[case][0] in ("loha", "lokr")]


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata())


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert expected.norm() > 0
    return float((got - expected).norm() / expected.norm())


def base_weight(pipe: StableDiffusionPipeline, target: str) -> torch.Tensor:
    component, path = target.split(".", 1)
    layer = getattr(pipe, component).get_submodule(path)
    return getattr(layer, "base_layer", layer).weight.detach()


@pytest.fixture(scope="module", params=list(CASES))
def adapter(request, tiny_pipeline_dir: str, tmp_path_factory) -> tuple[str, Path, dict[str, torch.Tensor]]:
    """(case, the run adapter file, PEFT's delta per module) for each adapter type."""
    pipe = load_pipeline(tiny_pipeline_dir)
    inject_random(pipe, request.param)
    path = write_adapter_file(pipe, request.param, tmp_path_factory.mktemp("adapters") / "lora.safetensors")
    return request.param, path, peft_deltas(pipe)


def test_run_adapter_files_read_as_peft_trained_them(adapter, tiny_pipeline_dir: str) -> None:
    case, path, deltas = adapter
    pipe = load_pipeline(tiny_pipeline_dir)
    lora = lora_io.load_lora(path, pipe)
    assert lora.kinds == {CASES[case][0]} and set(lora.modules) == set(deltas)
    errors = {}
    for target, expected in deltas.items():
        base = base_weight(pipe, target)
        errors[target] = rel_error(lora.modules[target].delta(base.shape, base=base), expected)
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda kv: kv[1])
    # Without a model too (export, inspect): the same modules.
    assert lora_io.read_lora(path).modules.keys() == lora.modules.keys()


def test_merge_and_unmerge_restore_the_base_exactly(adapter, tiny_pipeline_dir: str) -> None:
    case, path, deltas = adapter
    pipe = load_pipeline(tiny_pipeline_dir)
    before = {target: base_weight(pipe, target).clone() for target in deltas}
    stack = lora_io.apply_loras(pipe, [(path, 1.0)])
    worst = max(rel_error(base_weight(pipe, t) - before[t], d) for t, d in deltas.items())
    assert worst < 1e-4
    stack.set_scale(next(iter(stack.scales)), 0.5)
    stack.clear()
    assert all(torch.equal(base_weight(pipe, t), before[t]) for t in deltas)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_comfyui_and_a1111_compute_the_trained_delta_from_our_kohya_files(
    adapter, tiny_pipeline_dir: str, tmp_path: Path, dtype: torch.dtype
) -> None:
    case, path, deltas = adapter
    if CASES[case][0] == "dora":
        pytest.skip("DoRA's kohya file is a plain LoRA by SVD: see test_dora_exports")
    out = lora_io.convert_lora_file(path, "kohya", tmp_path / "k.safetensors", dtype=dtype)
    tensors, metadata = read(out)
    assert not any(key.endswith(("_t1", "_t2")) for key in tensors)  # plain layouts only
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == CASES[case][0]
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, part = key.split(".", 1)
        stems.setdefault(stem, {})[part] = tensor
    assert all("alpha" in parts for parts in stems.values())

    base = load_pipeline(tiny_pipeline_dir)
    comfy_keys, a1111_names = model_names(base.unet, base.text_encoder)
    patches, not_loaded = comfy_load(set(tensors), comfy_key_map(comfy_keys))
    assert not not_loaded and set(patches.values()) == set(stems)
    matched, failed, _ = a1111_load(set(tensors), a1111_names)
    assert not failed and len(matched) == len(stems)
    assert {a1111_module_type(parts) for parts in matched.values()} == {"hada" if case == "loha" else "lokr"}

    worst = {"comfy": 0.0, "a1111": 0.0}
    for target, expected in deltas.items():
        parts = stems[lora_io.kohya_stem(target)]
        shape = tuple(expected.shape)
        worst["comfy"] = max(worst["comfy"], rel_error(comfy_delta(parts, shape), expected))
        worst["a1111"] = max(worst["a1111"], rel_error(a1111_delta(parts, shape), expected))
    print(
        f"{case}: {len(deltas)} modules, worst relative error ComfyUI {worst['comfy']:.2e}, A1111 {worst['a1111']:.2e}"
    )
    assert max(worst.values()) < 1e-3
    # Our own reader gets the same deltas back from the kohya file.
    again = lora_io.load_lora(out, base)
    assert (
        max(
            rel_error(again.modules[t].delta(d.shape, base=base_weight(base, t)), d)
            for t, d in deltas.items()
        )
        < 1e-5
    )


def test_diffusers_export_of_loha_and_lokr_is_refused(adapter, tmp_path: Path) -> None:
    case, path, _ = adapter
    if CASES[case][0] == "dora":
        out = lora_io.convert_lora_file(path, "diffusers", tmp_path / "d.safetensors", dtype=torch.float32)
        tensors, metadata = read(out)
        assert any(key.endswith(".lora_magnitude_vector") for key in tensors)
        assert json.loads(metadata["lora_adapter_metadata"])["unet.use_dora"] is True
        return
    with pytest.raises(ConfigError, match="diffusers cannot load") as err:
        lora_io.convert_lora_file(path, "diffusers", tmp_path / "d.safetensors")
    assert "\n" not in str(err.value)
