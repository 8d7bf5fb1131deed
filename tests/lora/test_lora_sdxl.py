"""SDXL and SD2 LoRA files: kohya names (SGM U-Net, lora_te1_/lora_te2_), metadata, every key mapped by
diffusers' own loader, ComfyUI's and A1111's key rules; reading, converting, exporting a run, family errors.

The adapter is PEFT-injected into tiny-sdxl (SDXL's full depth: every one of the 560 attention modules the
real model has) plus its down/upsampler convs, and into both text encoders (kohya's text set: q/k/v/out,
fc1, fc2), with random non-zero weights and two alphas. The truth a file must reproduce is PEFT's own
`get_delta_weight` of the in-memory adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from tool_rules import (
    SD1_COMFY_UNET_CONFIG,
    SDXL_COMFY_UNET_CONFIG,
    a1111_load,
    comfy_key_map,
    comfy_load,
    comfy_unet_to_diffusers,
    kohya_targets,
    random_rank1_pairs,
)

from tune import lora as lora_io
from tune.errors import ModelError
from tune.models import build_pipeline, load_pipeline
from tune.models.single_file import pipeline_to_ldm
from tune.runs import RunDir

ADAPTER = "exported"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "downsamplers.0.conv", "upsamplers.0.conv"],
    rank_pattern={"downsamplers.0.conv": 2, "upsamplers.0.conv": 2},
    alpha_pattern={"to_k": 2},  # folded into the up weights: one alpha per file
)
TEXT_LORA = LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
)


def randomize(*models: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.1)


def adapter_of(pipe, components: tuple[str, ...]) -> tuple[lora_io.Lora, dict[str, torch.Tensor]]:
    """(the injected adapter as a Lora, PEFT's delta W per module)."""
    modules, truth = {}, {}
    for component in components:
        model = getattr(pipe, component)
        # lora_from_peft names a text encoder "text_encoder"; the second one is renamed here.
        part = lora_io.lora_from_peft(
            model if component == "unet" else None, None if component == "unet" else model
        )
        for target, pair in part.modules.items():
            modules[component + "." + target.split(".", 1)[1]] = pair
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                truth[f"{component}.{name}"] = layer.get_delta_weight("default").detach().float()
    return lora_io.Lora(modules=modules, formats=frozenset({"peft"})), truth


def weights(pipe, components: tuple[str, ...] = COMPONENTS) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{name}": param.detach().clone()
        for component in components
        for name, param in getattr(pipe, component).named_parameters()
    }


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata())


def check_fused(before: dict, after: dict, expected: dict[str, torch.Tensor], bound: float) -> float:
    """Every targeted weight moved by its expected delta (relative error < bound), nothing else moved."""
    worst = 0.0
    for target, delta in expected.items():
        got = after[f"{target}.weight"] - before[f"{target}.weight"]
        worst = max(worst, float((got - delta).norm() / delta.norm()))
    assert worst < bound
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert moved == {f"{target}.weight" for target in expected}
    return worst


def fuse_with_diffusers(
    pipeline_class, folder: str, file: Path, components: tuple[str, ...]
) -> tuple[dict, dict]:
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True)
    before = weights(pipe, components)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    pipe.fuse_lora(lora_scale=1.0, components=list(components), adapter_names=[ADAPTER])
    pipe.unload_lora_weights()
    return before, weights(pipe, components)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_pipeline("tiny-sdxl", seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sdxl_adapter(sdxl_dir: str) -> tuple[lora_io.Lora, dict[str, torch.Tensor]]:
    pipe = load_pipeline(sdxl_dir)
    pipe.unet.add_adapter(UNET_LORA)
    inject_adapter_in_model(TEXT_LORA, pipe.text_encoder)
    inject_adapter_in_model(TEXT_LORA, pipe.text_encoder_2)
    randomize(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    return adapter_of(pipe, COMPONENTS)


@pytest.fixture(scope="module")
def sdxl_file(sdxl_adapter, tmp_path_factory) -> Path:
    lora, _ = sdxl_adapter
    folder = tmp_path_factory.mktemp("sdxl-lora")
    return lora_io.save_lora(lora, folder / "sdxl.safetensors", "kohya", family="sdxl")


def test_sdxl_kohya_file_names_one_alpha_and_metadata(sdxl_adapter, sdxl_file: Path) -> None:
    lora, _ = sdxl_adapter
    counts = {c: sum(t.startswith(c + ".") for t in lora.modules) for c in COMPONENTS}
    attention = sum(t.endswith(("to_q", "to_k", "to_v", "to_out.0")) for t in lora.modules)
    assert attention == 560 and counts == {"unet": 560 + 4, "text_encoder": 72, "text_encoder_2": 192}
    tensors, metadata = read(sdxl_file)
    stems = {key.split(".", 1)[0] for key in tensors}
    assert len(tensors) == 3 * len(lora.modules) == 3 * len(stems)
    for stem in (
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0",
        "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_v",
        "lora_unet_input_blocks_3_0_op",  # down block 0's downsampler
        "lora_unet_output_blocks_2_2_conv",  # up block 0's upsampler: slot 2 in SDXL
        "lora_unet_output_blocks_5_2_conv",
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    ):
        assert stem in stems, stem
    assert all(
        s.startswith(("lora_unet_input_blocks", "lora_unet_middle", "lora_unet_output")) or "_te" in s
        for s in stems
    )
    assert {float(t) for k, t in tensors.items() if k.endswith(".alpha")} == {8.0}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.resolution"] == "1024x1024"
    assert metadata["sshs_model_hash"] == lora_io.safetensors_data_hash(sdxl_file)


def test_diffusers_loads_the_sdxl_kohya_file_at_every_module_scale(
    sdxl_adapter, sdxl_file: Path, sdxl_dir: str, no_library_warnings
) -> None:
    _, truth = sdxl_adapter
    before, after = fuse_with_diffusers(StableDiffusionXLPipeline, sdxl_dir, sdxl_file, COMPONENTS)
    worst = check_fused(before, after, truth, 1e-2)
    print(f"SDXL kohya file in diffusers: {len(truth)} modules, worst relative error {worst:.1e}")


def test_apply_loras_gives_diffusers_fused_weights(sdxl_file: Path, sdxl_dir: str) -> None:
    ours = load_pipeline(sdxl_dir)
    stack = lora_io.apply_loras(ours, [(sdxl_file, 1.0)])
    _, fused = fuse_with_diffusers(StableDiffusionXLPipeline, sdxl_dir, sdxl_file, COMPONENTS)
    mine = weights(ours)
    for key, tensor in fused.items():
        torch.testing.assert_close(mine[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    stack.clear()


def sdxl_tool_names(pipe) -> tuple[set[str], set[str]]:
    """(ComfyUI state-dict keys, A1111 network_layer_mapping names) of an SDXL model in SGM layout, from
    tune's single-file converter (independent of the LoRA writer's SGM rule, and of ComfyUI's map)."""
    checkpoint = pipeline_to_ldm(pipe)
    unet = {k.removeprefix("model.") for k in checkpoint if k.startswith("model.diffusion_model.")}
    te1 = {
        k.removeprefix("conditioner.embedders.0.")
        for k in checkpoint
        if k.startswith("conditioner.embedders.0.")
    }
    te2 = {
        k.removeprefix("conditioner.embedders.1.")
        for k in checkpoint
        if k.startswith("conditioner.embedders.1.")
    }
    comfy = unet | {f"clip_l.{k}" for k in te1}
    comfy |= {f"clip_g.transformer.text_model.{k}" for k in pipe.text_encoder_2.text_model.state_dict()}
    a1111 = {k.rsplit(".", 1)[0].replace(".", "_") for k in unet}
    a1111 |= {"0_" + k.rsplit(".", 1)[0].replace(".", "_") for k in te1}
    a1111 |= {"1_" + k.rsplit(".", 1)[0].replace(".", "_") for k in te2}
    return comfy, a1111


def check_a1111(file_keys: set[str], names: set[str], *, is_sd2: bool) -> int:
    matched, failed, fused = a1111_load(file_keys, names, is_sd2=is_sd2)
    assert not failed, f"A1111: didn't match keys: {failed[:5]}"
    assert all(parts == {"lora_up.weight", "lora_down.weight", "alpha"} for parts in matched.values())
    for module, projections in fused.items():  # A1111 applies none of q/k/v unless all four are there
        assert projections == {"q_proj", "k_proj", "v_proj"} and f"{module}_out_proj" in matched, module
    return len(matched)


def test_comfyui_and_a1111_map_every_key_of_the_sdxl_file(sdxl_file: Path, sdxl_dir: str) -> None:
    file_keys = set(read(sdxl_file)[0])
    modules = {key.split(".", 1)[0] for key in file_keys}
    comfy_keys, a1111_names = sdxl_tool_names(build_pipeline("tiny-sdxl", seed=0))
    patches, not_loaded = comfy_load(file_keys, comfy_key_map(comfy_keys, SDXL_COMFY_UNET_CONFIG))
    assert not not_loaded, f"ComfyUI: lora key not loaded: {sorted(not_loaded)[:5]}"
    assert set(patches) <= comfy_keys and set(patches.values()) == modules
    assert check_a1111(file_keys, a1111_names, is_sd2=False) == len(modules)
    print(f"SDXL file: ComfyUI {len(patches)}/{len(modules)}, A1111 {len(modules)}/{len(modules)} modules")


def test_read_convert_and_diffusers_format(
    sdxl_adapter, sdxl_file: Path, sdxl_dir: str, tmp_path: Path
) -> None:
    lora, truth = sdxl_adapter
    read_back = lora_io.read_lora(sdxl_file)
    assert read_back.family == "sdxl" and read_back.modules.keys() == lora.modules.keys()
    loaded = lora_io.load_lora(sdxl_file, load_pipeline(sdxl_dir))
    assert loaded.family == "sdxl" and loaded.formats == {"kohya"}
    for target, pair in loaded.modules.items():
        delta = pair.delta(truth[target].shape)
        assert float((delta - truth[target]).norm() / truth[target].norm()) < 1e-2, target

    # kohya keys with diffusers U-Net names (diffusers' convert_state_dict_to_kohya writes those): same modules.
    restyled = {}
    for target, pair in lora.modules.items():
        component, path = lora_io.canonical_path(target)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
        stem = prefix + path.replace(".", "_")
        restyled |= {f"{stem}.lora_down.weight": pair.down, f"{stem}.lora_up.weight": pair.up}
    save_file(restyled, tmp_path / "x2.safetensors")
    assert (
        lora_io.load_lora(tmp_path / "x2.safetensors", load_pipeline(sdxl_dir)).modules.keys()
        == lora.modules.keys()
    )

    converted = lora_io.convert_lora_file(
        sdxl_file, "diffusers", tmp_path / "pytorch_lora_weights.safetensors"
    )
    tensors, metadata = read(converted)
    assert any(key.startswith("text_encoder_2.text_model.encoder.layers.31.") for key in tensors)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(metadata["lora_adapter_metadata"])["text_encoder_2.r"] == 4
    assert lora_io.read_lora(converted).family == "sdxl"
    before, after = fuse_with_diffusers(StableDiffusionXLPipeline, sdxl_dir, converted, COMPONENTS)
    check_fused(before, after, truth, 1e-2)


def test_a_lora_of_another_family_is_one_line_naming_both(
    sdxl_file: Path, sdxl_dir: str, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    sd1 = load_pipeline(tiny_pipeline_dir)
    with pytest.raises(ModelError, match="is for SDXL but the base model is Stable Diffusion 1.x") as err:
        lora_io.load_lora(sdxl_file, sd1)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="is for SDXL but the base model is Stable Diffusion 1.x"):
        lora_io.apply_loras(sd1, [(lora_io.read_lora(sdxl_file), 1.0)])
    shape = sd1.unet.get_submodule("down_blocks.0.attentions.0.proj_in").weight.shape
    pair = lora_io.LoraModule(down=torch.ones(1, *shape[1:]), up=torch.ones(shape[0], 1, 1, 1), alpha=1.0)
    sd1_lora = lora_io.Lora({"unet.down_blocks.0.attentions.0.proj_in": pair}, frozenset({"peft"}))
    sd1_file = lora_io.save_lora(sd1_lora, tmp_path / "sd1.safetensors", "kohya")
    with pytest.raises(ModelError, match="is for Stable Diffusion 1.x but the base model is SDXL"):
        lora_io.load_lora(sd1_file, load_pipeline(sdxl_dir))


def test_export_of_an_sdxl_run_and_merge_into_a_single_file(
    sdxl_adapter, sdxl_dir: str, tmp_path: Path
) -> None:
    lora, _ = sdxl_adapter
    run_dir = tmp_path / "sdxl-run"
    run = RunDir.create(run_dir, "lora", f'base_model = "{sdxl_dir}"\ntrigger = "sks"\n')
    run.update_info(base_model=sdxl_dir, trigger="sks")
    # The recipe's adapter file: diffusers keys, no family metadata (U-Net names alone do not say SDXL
    # when the text encoders are not trained; the run's base model does).
    unet_only = lora_io.Lora(
        {t: p for t, p in lora.modules.items() if t.startswith("unet.")}, frozenset({"peft"})
    )
    lora_io.save_lora(unet_only, lora_io.final_adapter_path(run_dir), "diffusers", dtype=torch.float32)
    run.finish()
    exported = lora_io.export_run(run_dir)
    tensors, metadata = read(exported)
    assert (
        metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        and metadata["modelspec.trigger_phrase"] == "sks"
    )
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in tensors

    expected = load_pipeline(sdxl_dir)
    lora_io.apply_loras(expected, [(exported, 0.5)])
    components = ("unet", "text_encoder", "text_encoder_2", "vae")
    for out in (tmp_path / "merged.safetensors", tmp_path / "merged"):  # a single file, a diffusers folder
        merged = lora_io.merge_loras(sdxl_dir, [(exported, 0.5)], out, dtype=torch.float32)
        reloaded = weights(load_pipeline(merged, config=sdxl_dir if out.suffix else None), components)
        for key, tensor in weights(expected, components).items():
            assert torch.equal(reloaded[key], tensor), f"{out.name}: {key}"


# ---------------------------------------------------------------------------------------------------
# SD2: sd_v2_v metadata, all four OpenCLIP projections, diffusers and the tools' key rules
# ---------------------------------------------------------------------------------------------------


def test_sd2_kohya_file(tmp_path: Path, no_library_warnings) -> None:
    folder = tmp_path / "tiny-sd2"
    build_pipeline("tiny-sd2", seed=0).save_pretrained(folder)
    pipe = load_pipeline(folder)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    )
    # Only q and v of the text encoder: the file must carry k and out_proj too (zero), or A1111 applies none.
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"]), pipe.text_encoder
    )
    randomize(pipe.unet, pipe.text_encoder)
    lora, truth = adapter_of(pipe, ("unet", "text_encoder"))
    file = lora_io.save_lora(
        lora_io.Lora(lora.modules, lora.formats, family="sd2"),
        tmp_path / "sd2.safetensors",
        "kohya",
        v_prediction=True,
    )
    tensors, metadata = read(file)
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    layers = pipe.text_encoder.config.num_hidden_layers
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te_text_model_encoder_layers_{i}_self_attn_{proj}.lora_up.weight" in tensors
        assert not tensors[f"lora_te_text_model_encoder_layers_{i}_self_attn_k_proj.lora_up.weight"].any()
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in tensors  # diffusers names
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 2  # Linear in SD2
    assert lora_io.read_lora(file).family == "sd2"

    before, after = fuse_with_diffusers(StableDiffusionPipeline, str(folder), file, ("unet", "text_encoder"))
    check_fused(before, after, truth, 1e-2)

    # The tools' key rules on SD2's layout: OpenCLIP-H in A1111 (is_sd2), clip_h in ComfyUI.
    checkpoint = pipeline_to_ldm(load_pipeline(folder))
    unet = {k.removeprefix("model.") for k in checkpoint if k.startswith("model.diffusion_model.")}
    text = {k.removeprefix("cond_stage_model.") for k in checkpoint if k.startswith("cond_stage_model.")}
    comfy = unet | {
        f"clip_h.transformer.text_model.{k}" for k in pipe.text_encoder.state_dict() if "lora" not in k
    }
    comfy = {k.replace(".base_layer.", ".") for k in comfy}
    a1111 = {k.rsplit(".", 1)[0].replace(".", "_") for k in unet | text}
    a1111 |= {"model_transformer_resblocks"}  # what A1111 tests is_sd2 by
    file_keys = set(tensors)
    modules = {key.split(".", 1)[0] for key in file_keys}
    patches, not_loaded = comfy_load(file_keys, comfy_key_map(comfy, SD1_COMFY_UNET_CONFIG))
    assert not not_loaded and set(patches.values()) == modules
    assert check_a1111(file_keys, a1111, is_sd2=True) == len(modules)


def test_inspect_reports_the_sdxl_family(sdxl_file: Path, capsys) -> None:
    from tune.cli import main

    assert main(["lora", "inspect", str(sdxl_file)]) == 0
    out = capsys.readouterr().out
    assert (
        "architecture:  SDXL topology, cross-attention width 40; declared stable-diffusion-xl-v1-base/lora"
        in out
    )
    assert "modules:       828 (text_encoder 72, text_encoder_2 192, unet 564)" in out
    assert "text_encoder_2 self_attn" in out and "unet samplers" in out
    assert "targets:       text_encoder_2: mlp.fc1, mlp.fc2, self_attn.k_proj" in out
    assert "lora_te1_" not in out  # the SD1-only note about kohya's SD1 loader
    report = lora_io.inspect_lora(sdxl_file)
    assert report.family == "sdxl" and report.problem is None


@pytest.mark.parametrize("conv, unet_count", [(False, 722), (True, 788)])
def test_real_sdxl_kohya_module_list_maps_in_comfyui_and_a1111(
    conv: bool, unet_count: int, tmp_path: Path
) -> None:
    """kohya's SDXL target set on the real SDXL (meta device): every Linear of the Transformer2DModels
    (+ resnet and sampler convs with conv_dim), CLIPAttention/CLIPMLP of both text encoders."""
    from tune.lora.sgm import unet_key_to_sgm
    from tune.lora.skeleton import module_skeleton
    from tune.models.single_file import _open_clip_state_dict

    skeleton = module_skeleton("sdxl")
    targets = kohya_targets(skeleton, conv=conv)
    counts = {c: sum(t.startswith(c + ".") for t in targets) for c in COMPONENTS}
    assert counts == {"unet": unet_count, "text_encoder": 72, "text_encoder_2": 192}
    modules = random_rank1_pairs(skeleton, targets)
    file = lora_io.save_lora(
        lora_io.Lora(modules, frozenset({"peft"}), family="sdxl"), tmp_path / "x.safetensors", "kohya"
    )
    assert lora_io.read_lora(file).modules.keys() == modules.keys()

    unet, te1, te2 = (skeleton[c] for c in COMPONENTS)
    ours = {k: unet_key_to_sgm(k, unet.config) for k in unet.state_dict()}
    # The SGM rule agrees with ComfyUI's own map for every SDXL U-Net tensor it lists (all but label_emb).
    theirs = comfy_unet_to_diffusers(SDXL_COMFY_UNET_CONFIG)
    assert all(ours[k] == v for k, v in theirs.items() if k in ours)  # it also lists keys SDXL lacks
    assert set(ours) - set(theirs) == {
        f"add_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    }
    sgm = {"diffusion_model." + name for name in ours.values()}
    te1_keys = {f"transformer.text_model.{k}" for k in te1.state_dict()}
    open_clip = {f"model.{k}" for k in _open_clip_state_dict(te2.state_dict())}
    comfy = sgm | {f"clip_l.{k}" for k in te1_keys} | {f"clip_g.transformer.{k}" for k in te2.state_dict()}
    a1111 = {k.rsplit(".", 1)[0].replace(".", "_") for k in sgm}
    a1111 |= {"0_" + k.rsplit(".", 1)[0].replace(".", "_") for k in te1_keys}
    a1111 |= {"1_" + k.rsplit(".", 1)[0].replace(".", "_") for k in open_clip}
    file_keys = set(read(file)[0])
    stems = {key.split(".", 1)[0] for key in file_keys}
    patches, not_loaded = comfy_load(file_keys, comfy_key_map(comfy, SDXL_COMFY_UNET_CONFIG))
    assert not not_loaded and set(patches.values()) == stems and len(stems) == unet_count + 264
    assert check_a1111(file_keys, a1111, is_sd2=False) == len(stems)


def test_export_of_an_sd2_run_says_v_prediction(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-sd2"
    pipe = build_pipeline("tiny-sd2", seed=0)
    pipe.save_pretrained(folder)
    shape = pipe.unet.get_submodule("down_blocks.0.attentions.0.proj_in").weight.shape
    pair = lora_io.LoraModule(down=torch.ones(2, shape[1]), up=torch.ones(shape[0], 2), alpha=2.0)
    run_dir = tmp_path / "sd2-run"
    run = RunDir.create(run_dir, "lora", f'base_model = "{folder}"\n')
    run.update_info(base_model=str(folder))
    adapter = lora_io.Lora({"unet.down_blocks.0.attentions.0.proj_in": pair}, frozenset({"peft"}))
    lora_io.save_lora(adapter, lora_io.final_adapter_path(run_dir), "diffusers", dtype=torch.float32)
    run.finish()
    tensors, metadata = read(lora_io.export_run(run_dir))
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (2, shape[1])
