"""LoHa, LoKr and DoRA files: reading PEFT-named run adapters, kohya/LyCORIS export, what ComfyUI and
A1111 compute from our files (emulated from the reference), merging, sampling."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lycoris_files import CASES, UNET_PATTERN, inject_random, peft_deltas, peft_layers, write_adapter_file
from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file
from test_lora_export import PROMPT, STEPS, image, model_names
from tool_rules import a1111_delta, a1111_load, a1111_module_type, comfy_delta, comfy_key_map, comfy_load

from tune import lora as lora_io
from tune import sampling
from tune.cli import main
from tune.errors import ConfigError
from tune.lora.inject import TEXT_ENCODER_TARGETS
from tune.models import build_pipeline, load_pipeline
from tune.runs import RunDir

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
def adapted(request, tiny_pipeline_dir: str, tmp_path_factory) -> tuple[str, Path, StableDiffusionPipeline]:
    """(case, a finished run whose final adapter is that case's PEFT adapter, the pipeline holding the
    adapter in memory), for each adapter type."""
    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    inject_random(pipe, request.param)
    run_dir = tmp_path_factory.mktemp("runs") / f"{request.param}-run"
    run = RunDir.create(run_dir, "lora", f'base_model = "{tiny_pipeline_dir}"\n')
    run.update_info(base_model=tiny_pipeline_dir, instance_prompt=PROMPT)
    write_adapter_file(pipe, request.param, lora_io.final_adapter_path(run_dir))
    run.finish()
    return request.param, run_dir, pipe


@pytest.fixture(scope="module")
def adapter(adapted) -> tuple[str, Path, dict[str, torch.Tensor]]:
    """(case, the run adapter file, PEFT's delta per module)."""
    case, run_dir, pipe = adapted
    return case, lora_io.final_adapter_path(run_dir), peft_deltas(pipe)


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
        assert any(key.endswith(".lora_magnitude_vector.weight") for key in tensors)
        assert json.loads(metadata["lora_adapter_metadata"])["unet.use_dora"] is True
        return
    with pytest.raises(ConfigError, match="diffusers cannot load") as err:
        lora_io.convert_lora_file(path, "diffusers", tmp_path / "d.safetensors")
    assert "\n" not in str(err.value)


def sample(model: str, out: Path, *extra: str) -> np.ndarray:
    argv = ["sample", "--model", model, "--prompt", PROMPT, "--steps", str(STEPS), "--seed", "0"]
    assert main([*argv, "--device", "cpu", "--out", str(out), *extra]) == 0
    return image(out)


def test_sample_with_the_exported_kohya_file_matches_the_in_memory_adapter(
    adapted, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    case, run_dir, pipe = adapted
    exported = lora_io.export_run(run_dir, "kohya", dtype=torch.float32, out=tmp_path / "k.safetensors")
    [in_memory] = sampling.generate(pipe, PROMPT, 0, steps=STEPS, guidance=7.5, progress=False)
    expected = np.asarray(in_memory.image, dtype=np.float64)
    diff = np.abs(sample(tiny_pipeline_dir, tmp_path / "k.png", "--lora", str(exported)) - expected).mean()
    plain = np.abs(sample(tiny_pipeline_dir, tmp_path / "plain.png") - expected).mean()
    _, metadata = read(exported)
    note = f"; SVD error {metadata['tune_dora_svd_error']}" if case == "dora" else ""
    print(f"{case}: sample --lora kohya file vs in-memory adapter {diff:.3f}/255 (base {plain:.1f}){note}")
    assert plain > 5.0  # the adapter does change the image
    if case != "dora":
        assert diff < 1.0
        # The run adapter file itself samples the same (our loader reads PEFT names).
        own = sample(
            tiny_pipeline_dir, tmp_path / "own.png", "--lora", str(lora_io.final_adapter_path(run_dir))
        )
        assert np.abs(own - expected).mean() < 1.0
        return
    # DoRA: the diffusers file is exact; the kohya file approximates by SVD at the adapter's rank.
    assert "tune_dora_svd_error" in metadata and metadata["ss_network_module"] == "networks.lora"
    exact = lora_io.export_run(run_dir, "diffusers", dtype=torch.float32, out=tmp_path / "d.safetensors")
    exact_diff = np.abs(sample(tiny_pipeline_dir, tmp_path / "d.png", "--lora", str(exact)) - expected).mean()
    diffusers_pipe = load_pipeline(tiny_pipeline_dir)
    diffusers_pipe.set_progress_bar_config(disable=True)
    diffusers_pipe.load_lora_weights(str(exact.parent), weight_name=exact.name)
    [loaded] = sampling.generate(diffusers_pipe, PROMPT, 0, steps=STEPS, guidance=7.5, progress=False)
    diffusers_diff = np.abs(np.asarray(loaded.image, dtype=np.float64) - expected).mean()
    wider = lora_io.export_run(
        run_dir, "kohya", dtype=torch.float32, out=tmp_path / "k16.safetensors", dora_rank=16
    )
    wider_diff = np.abs(
        sample(tiny_pipeline_dir, tmp_path / "k16.png", "--lora", str(wider)) - expected
    ).mean()
    print(
        f"dora: diffusers file vs in-memory adapter: tune sample --lora {exact_diff:.3f}/255, diffusers "
        f"load_lora_weights {diffusers_diff:.3f}/255; kohya file at rank 16: {wider_diff:.3f}/255, SVD error "
        f"{read(wider)[1]['tune_dora_svd_error']}"
    )
    assert exact_diff < 1.0 and diffusers_diff < 1.0
    # `tune lora convert` makes the same kohya file from the adapter file and the base model.
    adapter_file = lora_io.final_adapter_path(run_dir)
    with pytest.raises(ConfigError, match="is DoRA: its kohya file is a plain LoRA"):
        lora_io.convert_lora_file(adapter_file, "kohya", tmp_path / "c.safetensors")
    converted = lora_io.convert_lora_file(
        adapter_file, "kohya", tmp_path / "c.safetensors", base=tiny_pipeline_dir, dtype=torch.float32
    )
    assert read(converted)[0].keys() == read(exported)[0].keys()
    assert all(torch.equal(read(converted)[0][k], t) for k, t in read(exported)[0].items())


def test_inspect_names_the_type(adapter, tmp_path: Path, capsys) -> None:
    case, path, deltas = adapter
    name = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}[CASES[case][0]]
    report = lora_io.inspect_lora(path)
    assert report.type == name and report.problem is None and sum(report.modules.values()) == len(deltas)
    assert main(["lora", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"type:          {name}" in out
    if name != "DoRA":
        kohya = lora_io.convert_lora_file(path, "kohya", tmp_path / "k.safetensors")
        report = lora_io.inspect_lora(kohya)
        assert (report.type, report.format, report.hash_ok) == (name, "kohya", True)
        assert any("diffusers' load_lora_weights cannot" in note for note in report.notes)


@pytest.mark.parametrize("adapted", ["dora"], indirect=True)
def test_kohya_dora_files_read_in_both_orientations(
    adapted, adapter, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    """LyCORIS's dora_scale: [out, 1(, 1, 1)] (wd_on_out, = PEFT's magnitude) or [1, in(, 1, 1)] (older
    files: each input column normalized, as ComfyUI and A1111 compute it)."""
    _, _, pipe = adapted
    deltas = adapter[2]
    base = load_pipeline(tiny_pipeline_dir)
    rows, columns, expected_columns = {}, {}, {}
    generator = torch.Generator().manual_seed(1)
    for target, layer in peft_layers(pipe).items():
        stem = lora_io.kohya_stem(target)
        down, up = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        magnitude = layer.lora_magnitude_vector["default"].weight.detach().flatten()
        shared = {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": torch.tensor(3.0),
        }
        ones = (1,) * (down.ndim - 2)
        rows |= shared | {f"{stem}.dora_scale": magnitude.reshape(-1, 1, *ones)}
        w0 = base_weight(base, target).float()
        merged = w0 + (3.0 / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *ones)
        column = norm * (0.8 + 0.4 * torch.rand(norm.shape, generator=generator))
        columns |= shared | {f"{stem}.dora_scale": column}
        expected_columns[target] = merged * (column / norm) - w0
    save_file(rows, tmp_path / "rows.safetensors")
    save_file(columns, tmp_path / "columns.safetensors")
    for name, expected in (("rows", deltas), ("columns", expected_columns)):
        lora = lora_io.load_lora(tmp_path / f"{name}.safetensors", base)
        assert lora.kinds == {"dora"} and lora.formats == {"kohya"}
        worst = max(
            rel_error(lora.modules[t].delta(d.shape, base=base_weight(base, t)), d)
            for t, d in expected.items()
        )
        assert worst < 1e-5, name


@pytest.mark.parametrize(
    "config", [LoHaConfig(r=2, alpha=3.0), LoKrConfig(r=2, alpha=3.0)], ids=["loha", "lokr"]
)
def test_sdxl_lycoris_files_export_with_sgm_names_and_load_back(config, tmp_path: Path) -> None:
    pipe = build_pipeline("tiny-sdxl-shallow", seed=0)
    tensors = {}
    for component, pattern in (
        ("unet", UNET_PATTERN),
        ("text_encoder", TEXT_ENCODER_TARGETS),
        ("text_encoder_2", TEXT_ENCODER_TARGETS),
    ):
        model = getattr(pipe, component)
        inject_adapter_in_model(replace(config, target_modules=pattern), model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "hada_" in name or "lokr_" in name:
                    param.copy_(torch.randn_like(param) * 0.3)
        state = get_peft_model_state_dict(model)
        tensors |= {f"{component}.{key}": value.contiguous() for key, value in state.items()}
    deltas = peft_deltas(pipe, ("unet", "text_encoder", "text_encoder_2"))
    config_json = json.dumps({"r": config.r, "alpha": config.alpha})
    source = tmp_path / "adapter.safetensors"
    save_file(
        tensors,
        source,
        metadata={"tune_adapter_type": config.peft_type.value.lower(), "tune_adapter_config": config_json},
    )
    kohya = lora_io.convert_lora_file(source, "kohya", tmp_path / "k.safetensors", dtype=torch.float32)
    keys = read(kohya)[0]
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)
    assert any(key.startswith("lora_te2_text_model_") for key in keys)
    clean = build_pipeline("tiny-sdxl-shallow", seed=0)
    lora = lora_io.load_lora(kohya, clean)
    assert lora.family == "sdxl" and set(lora.modules) == set(deltas)
    worst = max(
        rel_error(lora.modules[t].delta(d.shape, base=base_weight(clean, t)), d) for t, d in deltas.items()
    )
    assert worst < 1e-5


@pytest.mark.parametrize("adapted", ["dora"], indirect=True)
def test_tune_lora_convert_makes_a_dora_kohya_file_with_the_base(
    adapted, tiny_pipeline_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tune.cli import main

    _, run_dir, _ = adapted
    source = lora_io.final_adapter_path(run_dir)
    out = tmp_path / "cli.safetensors"
    args = ["lora", "convert", str(source), "--to", "kohya", "--dtype", "fp32"]
    assert main([*args, "--out", str(out), "--base", tiny_pipeline_dir, "--dora-rank", "16"]) == 0
    expected = lora_io.export_run(
        run_dir, "kohya", dtype=torch.float32, out=tmp_path / "run.safetensors", dora_rank=16
    )
    ours, theirs = read(out)[0], read(expected)[0]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "no-base.safetensors")]) == 2  # DoRA needs its base
    err = capsys.readouterr().err.strip()
    assert "is DoRA" in err and "name the base model" in err and len(err.splitlines()) == 1
    assert (
        main(
            [
                *args,
                "--out",
                str(tmp_path / "r0.safetensors"),
                "--base",
                tiny_pipeline_dir,
                "--dora-rank",
                "0",
            ]
        )
        == 2
    )
    assert not (tmp_path / "no-base.safetensors").exists() and not (tmp_path / "r0.safetensors").exists()
