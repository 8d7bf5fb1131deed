"""LoRA files that load everywhere: kohya and diffusers exports, checked against the tools that read them.

The adapter under test is PEFT-injected into the tiny SD1.5-topology pipeline with random non-zero
weights, non-uniform ranks and non-uniform alphas, over every module kind a LoRA touches: attn1/attn2
q/k/v/out, ff, proj_in/proj_out (1x1 convs), resnet conv1/conv2 (3x3) and conv_shortcut (1x1),
time_emb_proj, down/upsampler convs, and the text encoder's q/k/v/out_proj/fc1/fc2. The truth a file
must reproduce is PEFT's own `get_delta_weight` of the in-memory adapter.

What diffusers 0.42.1 + transformers 5.23 do with kohya text-encoder keys (measured, see the report):
they load at the right scale when the file has one alpha, which is what we write; with per-module
alphas diffusers mis-scales attention projections and, under transformers 5, every text-encoder
module (its alpha_pattern keeps the `text_model.` level). So the text encoder is checked through
diffusers here too, and through our own loader as well.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from kohya_math import expected_delta
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from tool_rules import a1111_load, comfy_key_map, comfy_load, kohya_targets, random_rank1_pairs
from torch import nn

from tune import lora as lora_io
from tune import sampling
from tune.cli import main
from tune.models import load_pipeline
from tune.models.single_file import convert_to_ldm
from tune.runs import RunDir

PROMPT = "a photo of sks shape"
STEPS = 4
# Not a short adapter name like "t": transformers 5's load report counts every key containing the
# adapter name as an adapter key, and then lists the base weights as MISSING.
ADAPTER = "exported"
KOHYA_STEM = re.compile(
    r"lora_unet_\w+|lora_te_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])"
)
UNET_LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
    ],
    rank_pattern={"conv1": 2, "ff.net.2": 8, "downsamplers.0.conv": 2},
    alpha_pattern={"to_k": 3, "attn2.to_q": 1, "proj_in": 0.5, "conv2": 16},
)  # fmt: skip
TEXT_LORA = LoraConfig(
    r=4,
    lora_alpha=2,
    target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    rank_pattern={"fc1": 2},
    alpha_pattern={"k_proj": 6, "fc2": 1},
)


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapted(tiny_pipeline_dir: str) -> StableDiffusionPipeline:
    """The tiny pipeline with a trained-looking LoRA injected (read-only for the tests)."""
    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(UNET_LORA)
    inject_adapter_in_model(TEXT_LORA, pipe.text_encoder)  # as recipes/lora.py does
    torch.manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.1)
    return pipe


@pytest.fixture(scope="module")
def truth(adapted: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """'<component>.<module path>' -> the delta W the in-memory adapter adds (PEFT's own math)."""
    deltas = {}
    for component in ("unet", "text_encoder"):
        for name, layer in getattr(adapted, component).named_modules():
            if isinstance(layer, LoraLayer):
                deltas[f"{component}.{name}"] = layer.get_delta_weight("default").detach().float()
    return deltas


@pytest.fixture(scope="module")
def run_dir(adapted: StableDiffusionPipeline, tiny_pipeline_dir: str, tmp_path_factory) -> Path:
    """A finished LoRA run as the recipe will leave it (tune.lora's run directory contract)."""
    path = tmp_path_factory.mktemp("runs") / "sks-lora"
    config = f'base_model = "{tiny_pipeline_dir}"\ninstance_prompt = "{PROMPT}"\n\n[data]\nresolution = 32\n'
    run = RunDir.create(path, "lora", config)
    run.update_info(base_model=tiny_pipeline_dir, instance_prompt=PROMPT)
    lora_io.save_adapter(
        adapted.unet, adapted.text_encoder, lora_io.checkpoint_adapter_path(path, 5), {"tune_step": "5"}
    )
    run.mark_checkpoint_complete(5)
    lora_io.save_adapter(adapted.unet, adapted.text_encoder, lora_io.final_adapter_path(path))
    run.finish()
    return path


def weight_shape(pair: lora_io.LoraModule) -> tuple[int, ...]:
    """The target weight's shape (read pairs are 4-D for convs, 2-D for Linear)."""
    return (pair.up.shape[0], *pair.down.shape[1:])


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata())


def weights(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{name}": param.detach().clone()
        for component in ("unet", "text_encoder", "vae")
        for name, param in getattr(pipe, component).named_parameters()
    }


def fuse_with_diffusers(tiny_pipeline_dir: str, file: Path) -> tuple[dict, dict]:
    """Weights before and after diffusers' own load_lora_weights + fuse_lora(1.0) of `file`."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    before = weights(pipe)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    pipe.fuse_lora(lora_scale=1.0, components=["unet", "text_encoder"], adapter_names=[ADAPTER])
    pipe.unload_lora_weights()
    return before, weights(pipe)


def check_fused(before: dict, after: dict, expected: dict[str, torch.Tensor], bound: float) -> float:
    """Every targeted weight moved by its expected delta (relative error < bound), nothing else moved."""
    worst = 0.0
    for target, delta in expected.items():
        key = f"{target}.weight"
        worst = max(worst, rel_error(after[key] - before[key], delta))
    assert worst < bound
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert moved == {f"{target}.weight" for target in expected}
    return worst


# ---------------------------------------------------------------------------------------------------
# diffusers loads our files at every module's scale
# ---------------------------------------------------------------------------------------------------


def test_adapter_is_non_uniform(adapted: StableDiffusionPipeline, truth: dict) -> None:
    lora = lora_io.lora_from_peft(adapted.unet, adapted.text_encoder)
    assert set(lora.modules) == set(truth) and len(truth) > 250
    assert len({p.rank for p in lora.modules.values()}) >= 3
    assert len({p.alpha for p in lora.modules.values()}) >= 5
    for target, pair in lora.modules.items():
        torch.testing.assert_close(pair.delta(truth[target].shape), truth[target], rtol=1e-5, atol=1e-7)


def test_kohya_file_loads_in_diffusers_at_the_right_scale(
    adapted: StableDiffusionPipeline, truth: dict, tiny_pipeline_dir: str, tmp_path: Path, no_library_warnings
) -> None:
    file = lora_io.save_lora(
        lora_io.lora_from_peft(adapted.unet, adapted.text_encoder), tmp_path / "k.safetensors", "kohya"
    )
    tensors, metadata = read(file)

    # The layout every tool reads: 3 tensors per module, canonical names, 4-D convs, fp16, one alpha.
    stems = {key.split(".", 1)[0] for key in tensors}
    assert len(stems) == len(truth) and len(tensors) == 3 * len(truth)
    assert all(KOHYA_STEM.fullmatch(stem) for stem in stems)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert {float(tensors[f"{s}.alpha"]) for s in stems} == {float(metadata["ss_network_alpha"])}
    assert all(tensors[f"{s}.alpha"].ndim == 0 for s in stems)
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{proj_in}.lora_down.weight"].shape[2:] == (1, 1)
    assert tensors[f"{proj_in}.lora_up.weight"].ndim == 4
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)

    # The file's own math (kohya's merge_to) equals the in-memory adapter's deltas ...
    file_deltas = {}
    for target, delta in truth.items():
        stem = lora_io.kohya_stem(target)
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        file_deltas[target] = expected_delta(down, up, float(tensors[f"{stem}.alpha"])).reshape(delta.shape)
        assert rel_error(file_deltas[target], delta) < 1e-2, target

    # ... and diffusers applies exactly that, text encoder included, and nothing else.
    before, after = fuse_with_diffusers(tiny_pipeline_dir, file)
    file_error = check_fused(before, after, file_deltas, 1e-4)
    truth_error = check_fused(before, after, truth, 1e-2)
    print(
        f"kohya fp16 through diffusers: max rel delta error {truth_error:.2e} (vs file math {file_error:.2e})"
    )

    # Our own loader reads the same file (kohya text-encoder keys onto transformers 5 names) the same way.
    ours = load_pipeline(tiny_pipeline_dir)
    mine_before = weights(ours)
    lora_io.apply_loras(ours, [(file, 1.0)])
    check_fused(mine_before, weights(ours), truth, 1e-2)


def test_diffusers_file_loads_in_diffusers_at_the_right_scale(
    adapted: StableDiffusionPipeline, truth: dict, tiny_pipeline_dir: str, tmp_path: Path, no_library_warnings
) -> None:
    lora = lora_io.lora_from_peft(adapted.unet, adapted.text_encoder)
    file = lora_io.save_lora(lora, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    tensors, metadata = read(file)
    assert all(
        re.fullmatch(r"unet\.[\w.]+\.lora_[AB]\.weight", k)
        or re.fullmatch(r"text_encoder\.text_model\.encoder\.layers\.\d+\.[\w.]+\.lora_[AB]\.weight", k)
        for k in tensors
    )
    assert len(tensors) == 2 * len(truth) and {t.dtype for t in tensors.values()} == {torch.float16}
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == 4 and config["text_encoder.r"] == 4
    assert config["unet.alpha_pattern"] == config["unet.rank_pattern"] != {}
    assert all(not name.startswith("text_model.") for name in config["text_encoder.target_modules"])

    before, after = fuse_with_diffusers(tiny_pipeline_dir, file)
    error = check_fused(before, after, truth, 1e-2)
    print(f"diffusers fp16 through diffusers: max rel delta error {error:.2e}")

    ours = load_pipeline(tiny_pipeline_dir)
    mine_before = weights(ours)
    lora_io.apply_loras(ours, [(file, 1.0)])
    check_fused(mine_before, weights(ours), truth, 1e-2)


# ---------------------------------------------------------------------------------------------------
# ComfyUI's and AUTOMATIC1111's key rules (tool_rules.py) on our files
# ---------------------------------------------------------------------------------------------------


def model_names(unet: nn.Module, text_encoder: nn.Module) -> tuple[set[str], set[str]]:
    """(ComfyUI state-dict keys, A1111 network_layer_mapping names) of an SD1.x model in LDM layout.

    The LDM names come from tune's diffusers->LDM converter (the single-file export), an independent
    mapping from ComfyUI's unet_to_diffusers (tool_rules.py), so agreement checks both.
    """
    ldm = convert_to_ldm(unet.state_dict(), unet.config, {}, {}, {})
    unet_keys = {key.removeprefix("model.") for key in ldm}
    text_keys = set()
    for key in text_encoder.state_dict():
        text_keys.add(key if key.startswith("text_model.") else f"text_model.{key}")
    comfy = unet_keys | {f"clip_l.transformer.{key}" for key in text_keys}
    a1111 = {key.rsplit(".", 1)[0].replace(".", "_") for key in unet_keys}
    a1111 |= {f"transformer.{key}".rsplit(".", 1)[0].replace(".", "_") for key in text_keys}
    return comfy, a1111


def check_tools_load(file: Path, unet: nn.Module, text_encoder: nn.Module) -> tuple[int, int]:
    """Every key of the kohya file maps in ComfyUI and A1111; returns (ComfyUI, A1111) modules."""
    tensors, _ = read(file)
    file_keys = set(tensors)
    modules = {key.split(".", 1)[0] for key in file_keys}
    comfy_keys, a1111_names = model_names(unet, text_encoder)

    patches, not_loaded = comfy_load(file_keys, comfy_key_map(comfy_keys))
    assert not not_loaded, f"ComfyUI: lora key not loaded: {sorted(not_loaded)[:5]}"
    assert set(patches) <= comfy_keys and set(patches.values()) == modules

    matched, failed, _ = a1111_load(file_keys, a1111_names)
    assert not failed, f"A1111: didn't match keys: {failed[:5]}"
    assert all(parts == {"lora_up.weight", "lora_down.weight", "alpha"} for parts in matched.values())
    assert len(matched) == len(modules)  # one A1111 module per file module, none shared
    return len(patches), len(matched)


def test_comfyui_and_a1111_map_every_key_of_the_tiny_export(
    adapted: StableDiffusionPipeline, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    file = lora_io.save_lora(
        lora_io.lora_from_peft(adapted.unet, adapted.text_encoder), tmp_path / "k.safetensors", "kohya"
    )
    base = load_pipeline(tiny_pipeline_dir)
    comfy, a1111 = check_tools_load(file, base.unet, base.text_encoder)
    unet_modules = sum(1 for key in read(file)[0] if key.startswith("lora_unet_") and key.endswith(".alpha"))
    print(f"tiny export: ComfyUI {comfy}/{comfy}, A1111 {a1111}/{a1111} modules ({unet_modules} U-Net)")


@pytest.mark.parametrize("conv, unet_count", [(False, 192), (True, 278)])
def test_real_sd15_module_list_maps_in_comfyui_and_a1111(conv: bool, unet_count: int, tmp_path: Path) -> None:
    skeleton = lora_io.sd1_module_skeleton()  # SD1.5 at real size, on the meta device
    targets = kohya_targets(skeleton, conv=conv)
    assert sum(t.startswith("unet.") for t in targets) == unet_count
    assert sum(t.startswith("text_encoder.") for t in targets) == 72
    modules = random_rank1_pairs(skeleton, targets)
    lora = lora_io.Lora(modules=modules, formats=frozenset({"peft"}))
    file = lora_io.save_lora(lora, tmp_path / "sd15.safetensors", "kohya")
    assert lora_io.read_lora(file).modules.keys() == modules.keys()
    comfy, a1111 = check_tools_load(file, skeleton["unet"], skeleton["text_encoder"])
    assert comfy == a1111 == unet_count + 72
    print(
        f"real SD1.5 ({'LoCon' if conv else 'attention-only'}): ComfyUI {comfy}, A1111 {a1111} of {len(modules)}"
    )


# ---------------------------------------------------------------------------------------------------
# The run directory, tune export, sampling with the file, merging
# ---------------------------------------------------------------------------------------------------


def image(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def sample(model: str, out: Path, *extra: str) -> np.ndarray:
    argv = ["sample", "--model", model, "--prompt", PROMPT, "--steps", str(STEPS), "--seed", "0"]
    assert main([*argv, "--device", "cpu", "--out", str(out), *extra]) == 0
    return image(out)


def test_export_samples_and_merges_like_the_in_memory_adapter(
    adapted: StableDiffusionPipeline, run_dir: Path, tiny_pipeline_dir: str, tmp_path: Path, capsys
) -> None:
    assert main(["export", str(run_dir)]) == 0
    exported = Path(capsys.readouterr().out.strip())
    assert exported == run_dir / "export" / "sks-lora.safetensors"
    tensors, metadata = read(exported)
    assert metadata["sshs_model_hash"] == lora_io.safetensors_data_hash(exported)
    base = load_pipeline(tiny_pipeline_dir)
    assert metadata["tune_base_model_hash"] == lora_io.base_model_hash(base.unet, base.text_encoder)
    # The hash names the base weights: PEFT's wrappers and adapter tensors do not change it.
    assert metadata["tune_base_model_hash"] == lora_io.base_model_hash(adapted.unet, adapted.text_encoder)
    assert metadata["modelspec.trigger_phrase"] == PROMPT and metadata["tune_recipe"] == "lora"
    assert metadata["tune_config"] == (run_dir / "config.toml").read_text()
    assert metadata["ss_output_name"] == "sks-lora" and metadata["modelspec.resolution"] == "32x32"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["ss_network_module"] == "networks.lora" and "conv_dim" in metadata["ss_network_args"]

    [in_memory] = sampling.generate(adapted, PROMPT, 0, steps=STEPS, guidance=7.5, progress=False)
    expected = np.asarray(in_memory.image, dtype=np.float64)
    with_file = sample(tiny_pipeline_dir, tmp_path / "lora.png", "--lora", str(exported))
    plain = sample(tiny_pipeline_dir, tmp_path / "plain.png")
    file_diff = np.abs(with_file - expected).mean()
    assert file_diff < 1.0
    assert np.abs(plain - expected).mean() > 5.0  # the LoRA does change the image

    merged = tmp_path / "merged"
    assert main(["lora", "merge", tiny_pipeline_dir, f"{exported}:1", "--out", str(merged)]) == 0
    merge_diff = np.abs(sample(str(merged), tmp_path / "merged.png") - with_file).mean()
    assert merge_diff < 1.0
    print(f"sample --lora vs in-memory adapter: {file_diff:.3f}/255; merged vs --lora: {merge_diff:.3f}/255")


def test_run_adapter_choice_and_export_targets(run_dir: Path, tmp_path: Path) -> None:
    assert lora_io.find_run_adapter(run_dir) == (lora_io.final_adapter_path(run_dir), None)
    assert lora_io.find_run_adapter(run_dir, 5) == (lora_io.checkpoint_adapter_path(run_dir, 5), 5)
    step_file = lora_io.export_run(run_dir, "diffusers", step=5, dtype=torch.float32)
    assert step_file == run_dir / "export" / "diffusers-step_000005" / "pytorch_lora_weights.safetensors"
    tensors, metadata = read(step_file)
    assert metadata["tune_step"] == "5" and {t.dtype for t in tensors.values()} == {torch.float32}
    # The checkpoint and the final adapter hold the same weights here: same deltas, to fp32 precision.
    final = lora_io.read_lora(lora_io.final_adapter_path(run_dir))
    for target, pair in lora_io.read_lora(step_file).modules.items():
        shape = weight_shape(pair)
        torch.testing.assert_close(pair.delta(shape), final.modules[target].delta(shape))

    # A run that has only checkpoints exports the newest complete one; an incomplete one never counts.
    partial = tmp_path / "partial"
    run = RunDir.create(partial, "lora", "seed = 0\n")
    for step in (10, 20, 30):
        lora_io.write_lora_file(
            *read(lora_io.checkpoint_adapter_path(run_dir, 5)), lora_io.checkpoint_adapter_path(partial, step)
        )
    run.mark_checkpoint_complete(10)
    run.mark_checkpoint_complete(20)
    run.close()
    assert lora_io.find_run_adapter(partial) == (lora_io.checkpoint_adapter_path(partial, 20), 20)
    assert (
        lora_io.default_export_path(partial, "kohya", 20)
        == partial / "export" / "partial-step_000020.safetensors"
    )


def test_convert_round_trip_keeps_every_delta(run_dir: Path, tmp_path: Path, capsys) -> None:
    source = lora_io.final_adapter_path(run_dir)
    reference = lora_io.read_lora(source)
    kohya = tmp_path / "a.safetensors"
    assert (
        main(["lora", "convert", str(source), "--to", "kohya", "--out", str(kohya), "--dtype", "fp32"]) == 0
    )
    assert main(["lora", "convert", str(kohya), "--to", "diffusers", "--dtype", "fp32"]) == 0
    back = tmp_path / "a_diffusers_kohya.safetensors"
    assert main(["lora", "convert", str(tmp_path / "a_diffusers.safetensors"), "--to", "kohya"]) == 0
    assert capsys.readouterr().out.split() == [
        str(kohya),
        str(tmp_path / "a_diffusers.safetensors"),
        str(back),
    ]
    round_trip = lora_io.read_lora(back)
    assert round_trip.formats == {"kohya"} and round_trip.modules.keys() == reference.modules.keys()
    for target, pair in reference.modules.items():
        shape = weight_shape(pair)
        torch.testing.assert_close(
            round_trip.modules[target].delta(shape), pair.delta(shape), rtol=1e-5, atol=1e-7
        )
    assert {t.dtype for t in read(back)[0].values()} == {torch.float32}  # the source's dtype by default
