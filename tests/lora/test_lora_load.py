"""Reading LoRA files (kohya, diffusers, PEFT) and merging them into a pipeline's weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from kohya_math import expected_delta
from safetensors.torch import save_file

from tune import lora as lora_io
from tune import sampling
from tune.cli import sample as sample_cli
from tune.errors import ConfigError, ModelError, TuneError
from tune.models import load_pipeline

# Module paths in our loaded tiny pipeline (transformers 5: no `text_model.` level in the text encoder).
UNET_TARGETS = [
    "down_blocks.0.attentions.0.proj_in",  # 1x1 Conv2d in SD1.x: 4-D LoRA tensors
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_out",
    "down_blocks.1.resnets.0.conv1",  # 3x3 Conv2d
    "down_blocks.1.resnets.0.time_emb_proj",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v",
]
TEXT_TARGETS = [
    f"encoder.layers.{i}.{name}"
    for i in range(2)
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    )
]
TARGETS = [f"unet.{p}" for p in UNET_TARGETS] + [f"text_encoder.{p}" for p in TEXT_TARGETS]
ALPHAS = (1.0, 3.0, 8.0, 0.5)


@pytest.fixture
def pipe(tiny_pipeline_dir: str) -> StableDiffusionPipeline:
    """A fresh pipeline per test: these tests patch weights."""
    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_of(pipe: StableDiffusionPipeline, target: str) -> torch.Tensor:
    component, path = target.split(".", 1)
    return getattr(pipe, component).get_submodule(path).weight


def random_pairs(
    pipe: StableDiffusionPipeline, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """target -> (down, up) in the shapes kohya writes: 4-D for convs, rank 2 for 3x3 convs, else 4."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for target in TARGETS:
        shape = weight_of(pipe, target).shape
        rank = 2 if shape[2:] == (3, 3) else 4
        down = torch.randn(rank, *shape[1:], generator=generator) * 0.2
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.2
        pairs[target] = (down, up)
    return pairs


def kohya_stem(target: str) -> str:
    component, path = target.split(".", 1)
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.replace(".", "_")  # canonical (transformers 4) names


def kohya_file(
    pairs: dict, alphas: dict[str, float], dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    sd = {}
    for target, (down, up) in pairs.items():
        stem = kohya_stem(target)
        sd[f"{stem}.lora_down.weight"] = down.to(dtype)
        sd[f"{stem}.lora_up.weight"] = up.to(dtype)
        sd[f"{stem}.alpha"] = torch.tensor(alphas[target], dtype=dtype)  # 0-dim, as kohya saves it
    return sd


def diffusers_file(pairs: dict) -> dict[str, torch.Tensor]:
    """PEFT-style keys with diffusers' component prefixes and the canonical `text_model.` level."""
    sd = {}
    for target, (down, up) in pairs.items():
        component, path = target.split(".", 1)
        name = f"{component}.{'text_model.' if component == 'text_encoder' else ''}{path}"
        sd[f"{name}.lora_A.weight"] = down
        sd[f"{name}.lora_B.weight"] = up
    return sd


def snapshot(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{name}": param.detach().clone()
        for component in ("unet", "text_encoder", "vae")
        for name, param in getattr(pipe, component).named_parameters()
    }


def test_kohya_file_changes_exactly_the_targets_and_removes_bit_identically(
    pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    pairs = random_pairs(pipe)
    alphas = {target: ALPHAS[i % len(ALPHAS)] for i, target in enumerate(TARGETS)}
    sd = kohya_file(pairs, alphas)
    save_file(sd, tmp_path / "style.safetensors", metadata={"ss_network_module": "networks.lora"})

    lora = lora_io.load_lora(tmp_path / "style.safetensors", pipe)
    assert set(lora.modules) == set(TARGETS) and lora.formats == {"kohya"}
    assert lora.metadata["ss_network_module"] == "networks.lora"

    before = snapshot(pipe)
    stack = lora_io.LoraStack(pipe)
    scale = 0.6
    stack.add(lora, scale)
    after = snapshot(pipe)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"{target}.weight" for target in TARGETS}
    for target in TARGETS:
        down, up = sd[f"{kohya_stem(target)}.lora_down.weight"], sd[f"{kohya_stem(target)}.lora_up.weight"]
        alpha = float(sd[f"{kohya_stem(target)}.alpha"])
        expected = scale * expected_delta(down, up, alpha)
        got = after[f"{target}.weight"] - before[f"{target}.weight"]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=target)

    stack.set_scale(lora.name, -1.5)  # the dashboard's slider: recomputed from the originals
    got = weight_of(pipe, TARGETS[8]) - before[f"{TARGETS[8]}.weight"]
    torch.testing.assert_close(got, -1.5 * expected_delta(*_down_up(sd, TARGETS[8]), alphas[TARGETS[8]]))
    stack.remove(lora.name)
    restored = snapshot(pipe)
    assert all(torch.equal(before[name], restored[name]) for name in before)
    assert stack.scales == {}


def _down_up(sd: dict[str, torch.Tensor], target: str) -> tuple[torch.Tensor, torch.Tensor]:
    stem = kohya_stem(target)
    return sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]


def test_diffusers_file_matches_diffusers_own_loader(
    pipe: StableDiffusionPipeline, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    pairs = random_pairs(pipe, seed=1)
    save_file(diffusers_file(pairs), tmp_path / "pytorch_lora_weights.safetensors")
    base_image = sampling.generate(pipe, "a red circle", 0, steps=4)[0].image

    stack = lora_io.apply_loras(pipe, [(tmp_path / "pytorch_lora_weights.safetensors", 0.7)])
    assert stack.scales == {"pytorch_lora_weights": 0.7}
    ours = snapshot(pipe)

    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors", adapter_name="t")
    reference.fuse_lora(lora_scale=0.7, components=["unet", "text_encoder"], adapter_names=["t"])
    reference.unload_lora_weights()
    theirs = snapshot(reference)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)

    our_image = sampling.generate(pipe, "a red circle", 0, steps=4)[0].image
    their_image = sampling.generate(reference, "a red circle", 0, steps=4)[0].image
    pixels = [np.asarray(im, dtype=np.float64) for im in (base_image, our_image, their_image)]
    assert np.abs(pixels[1] - pixels[2]).mean() < 1.0
    assert np.abs(pixels[0] - pixels[1]).mean() > 1.0  # the LoRA did change the image


def test_every_key_style_gives_the_same_modules(pipe: StableDiffusionPipeline) -> None:
    pairs = random_pairs(pipe, seed=2)
    targets = lora_io.lora_targets(pipe)
    reference = lora_io.parse_lora(diffusers_file(pairs), targets).modules

    def restyle(sd: dict[str, torch.Tensor], old: str, new: str, prefix_map: dict[str, str]) -> dict:
        out = {}
        for key, value in sd.items():
            for a, b in prefix_map.items():
                if key.startswith(a):
                    key = b + key[len(a) :]
            out[key.replace(old, new)] = value
        return out

    sd = diffusers_file(pairs)
    kohya = kohya_file(pairs, dict.fromkeys(TARGETS, 0.0), dtype=torch.float32)  # alpha 0 means alpha = rank
    variants = {
        "diffusers, older .lora.down": restyle(sd, ".lora_A.weight", ".lora.down.weight", {}),
        "transformers-5 text encoder names": restyle(
            sd, "", "", {"text_encoder.text_model.": "text_encoder."}
        ),
        "kohya": kohya,
    }
    variants["diffusers, older .lora.down"] = restyle(
        variants["diffusers, older .lora.down"], ".lora_B.weight", ".lora.up.weight", {}
    )
    unet_only = {k: v for k, v in sd.items() if k.startswith("unet.")}
    text_only = {k: v for k, v in sd.items() if k.startswith("text_encoder.")}
    variants["PEFT base_model.model. (unet)"] = restyle(unet_only, "", "", {"unet.": "base_model.model."})
    variants["PEFT unprefixed (text encoder)"] = restyle(text_only, "", "", {"text_encoder.": ""})
    for style, state_dict in variants.items():
        modules = lora_io.parse_lora(state_dict, targets).modules
        subset = {k: v for k, v in reference.items() if k in modules}
        assert len(subset) == len(modules) and modules, style
        for target, pair in modules.items():
            assert torch.equal(pair.down, subset[target].down) and torch.equal(pair.up, subset[target].up), (
                style
            )
            assert pair.alpha == subset[target].alpha == pair.rank, style

    # The oldest diffusers form: attention processors.
    down, up = pairs[TARGETS[1]]
    old = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up,
    }
    assert list(lora_io.parse_lora(old, targets).modules) == [TARGETS[1]]


def test_peft_config_supplies_alpha(pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    pairs = {
        t: p for t, p in random_pairs(pipe, seed=3).items() if t.startswith("unet.") and "resnets" not in t
    }
    sd = {k.removeprefix("unet."): v for k, v in diffusers_file(pairs).items()}
    save_file(sd, tmp_path / "adapter_model.safetensors")
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_k": 2}, "use_rslora": False}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    lora = lora_io.load_lora(tmp_path / "adapter_model.safetensors", pipe)
    assert lora.formats == {"peft"}
    alphas = {target: pair.alpha for target, pair in lora.modules.items()}
    assert {a for t, a in alphas.items() if t.endswith(".to_k")} == {2.0}
    assert {a for t, a in alphas.items() if not t.endswith(".to_k")} == {8.0}

    # DoRA configs are read too (test_lycoris.py); without magnitude tensors the modules are plain LoRA.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert lora_io.load_lora(tmp_path / "adapter_model.safetensors", pipe).kinds == {"lora"}


def test_several_loras_with_their_own_scales(pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    first, second = random_pairs(pipe, seed=4), random_pairs(pipe, seed=5)
    save_file(kohya_file(first, dict.fromkeys(TARGETS, 2.0)), tmp_path / "a.safetensors")
    save_file(diffusers_file(second), tmp_path / "b.safetensors")
    before = snapshot(pipe)
    stack = lora_io.apply_loras(
        pipe, [(tmp_path / "a.safetensors", 0.5), (str(tmp_path / "b.safetensors"), -0.25)]
    )
    assert stack.scales == {"a": 0.5, "b": -0.25}
    target = TARGETS[0]
    delta_a = expected_delta(first[target][0].half(), first[target][1].half(), 2.0)
    delta_b = expected_delta(*second[target], 4.0)
    got = weight_of(pipe, target) - before[f"{target}.weight"]
    torch.testing.assert_close(got, 0.5 * delta_a - 0.25 * delta_b, rtol=1e-4, atol=1e-6)
    stack.remove("a")
    got = weight_of(pipe, target) - before[f"{target}.weight"]
    torch.testing.assert_close(got, -0.25 * delta_b, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="another LoraStack"):
        lora_io.apply_loras(pipe, [(tmp_path / "a.safetensors", 1.0)])
    stack.clear()
    after = snapshot(pipe)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_another_architecture_is_a_model_error(pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    # SDXL-style kohya keys: LDM/SGM U-Net names and a second text encoder.
    sdxl_stems = [f"lora_unet_input_blocks_4_1_transformer_blocks_{i}_attn1_to_q" for i in range(4)]
    sdxl_stems += [f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1" for i in range(3)]
    sd = {}
    for stem in sdxl_stems:
        sd[f"{stem}.lora_down.weight"] = torch.zeros(4, 32)
        sd[f"{stem}.lora_up.weight"] = torch.zeros(32, 4)
        sd[f"{stem}.alpha"] = torch.tensor(4.0)
    save_file(sd, tmp_path / "sdxl.safetensors")
    with pytest.raises(ModelError, match=r"is for SDXL but the base model is Stable Diffusion 1\.x"):
        lora_io.load_lora(tmp_path / "sdxl.safetensors", pipe)
    # Without the second encoder's keys, blocks deeper than one transformer still say SDXL.
    save_file({k: v for k, v in sd.items() if "te2" not in k}, tmp_path / "unet.safetensors")
    with pytest.raises(ModelError, match=r"is for SDXL but the base model is Stable Diffusion 1\.x"):
        lora_io.load_lora(tmp_path / "unet.safetensors", pipe)
    # LDM names of SD1.x's own modules read (ComfyUI writes them); unknown ones are listed.
    ldm = {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 16, 1, 1),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(16, 4, 1, 1),
        "lora_unet_input_blocks_1_1_proj_up.lora_up.weight": torch.zeros(16, 4, 1, 1),
    }
    save_file(ldm, tmp_path / "ldm.safetensors")
    with pytest.raises(ModelError, match=r"1 of 3 keys match no module.*proj_up"):
        lora_io.load_lora(tmp_path / "ldm.safetensors", pipe)

    # Right names, wrong widths (e.g. an SD2 LoRA on an SD1 model).
    stem = kohya_stem(TARGETS[1])
    wrong = {f"{stem}.lora_down.weight": torch.zeros(4, 1024), f"{stem}.lora_up.weight": torch.zeros(16, 4)}
    save_file(wrong, tmp_path / "wide.safetensors")
    with pytest.raises(ModelError, match=r"1 of 1 modules do not fit this model"):
        lora_io.load_lora(tmp_path / "wide.safetensors", pipe)

    with pytest.raises(ModelError, match="has no up weight"):
        lora_io.parse_lora({f"{stem}.lora_down.weight": torch.zeros(4, 16)}, lora_io.lora_targets(pipe))
    # An alpha that is not one number (an empty tensor, found by tests/test_fuzz.py) is the module's problem.
    pair = {f"{stem}.lora_down.weight": torch.zeros(4, 16), f"{stem}.lora_up.weight": torch.zeros(16, 4)}
    with pytest.raises(ModelError, match="has an alpha of 0 values, not one"):
        lora_io.parse_lora({**pair, f"{stem}.alpha": torch.zeros(0)}, lora_io.lora_targets(pipe))


def test_parse_lora_spec() -> None:
    assert lora_io.parse_lora_spec("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert lora_io.parse_lora_spec("loras/style.safetensors:0.8") == (Path("loras/style.safetensors"), 0.8)
    assert lora_io.parse_lora_spec("a.safetensors:-1") == (Path("a.safetensors"), -1.0)
    assert lora_io.parse_lora_spec(r"C:\loras\a.safetensors") == (Path(r"C:\loras\a.safetensors"), 1.0)
    for bad in ("style.safetensors:strong", ":0.5", "a.safetensors:nan"):
        with pytest.raises(ConfigError, match="bad --lora"):
            lora_io.parse_lora_spec(bad)


def _cli(tiny_pipeline_dir: str, out: Path, *lora: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sample_cli.configure_cli(parser)
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a red circle", "--steps", "3", "--device", "cpu"]
    return parser.parse_args([*argv, *(x for spec in lora for x in ("--lora", spec)), "--out", str(out)])


def test_cli_applies_loras_and_rejects_bad_specs(
    pipe: StableDiffusionPipeline, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    save_file(diffusers_file(random_pairs(pipe, seed=6)), tmp_path / "style.safetensors")
    out = tmp_path / "with_lora.png"
    assert sample_cli.run_cli(_cli(tiny_pipeline_dir, out, f"{tmp_path / 'style.safetensors'}:0.5")) == 0
    lora_io.apply_loras(pipe, [(tmp_path / "style.safetensors", 0.5)])
    [expected] = sampling.generate(pipe, "a red circle", 0, steps=3)
    from PIL import Image

    with Image.open(out) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected.image))

    for spec, error, match in [
        (f"{tmp_path / 'style.safetensors'}:loud", ConfigError, "SCALE must be a number"),
        (str(tmp_path / "missing.safetensors"), ModelError, "LoRA file not found"),
    ]:
        with pytest.raises(TuneError, match=match) as err:
            sample_cli.run_cli(_cli(tiny_pipeline_dir, tmp_path / "x.png", spec))
        assert isinstance(err.value, error)
