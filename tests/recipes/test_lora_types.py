"""The lora recipe with each adapter type (lora.type = lora | dora | loha | lokr) on the tiny pipeline:
training on Linear and conv layers (LoCon) and the text encoder, exact resume after a crash, the
checkpoint's adapter file (PEFT tensors + tune_adapter_* metadata), the step-0 grid of the base model,
the DoRA file exact in diffusers, and the type options' config errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from recipes import lora as recipe
from tune import PROJECT_ROOT
from tune import lora as lora_io
from tune.config import load_config
from tune.errors import ConfigError
from tune.models import load_pipeline
from tune.runs import read_run
from tune.sampling import sample_grid

from recipe_testkit import crash_then_resume, losses, make_concept

CONFIG = PROJECT_ROOT / "recipes" / "configs" / "lora" / "tiny.toml"
TYPES = ("lora", "dora", "loha", "lokr")
# Linear layers (attn2), convs (resnets: LoCon) and the text encoder; fp32 files to compare every bit.
TARGETS = ('lora.targets=["attn2", "resnets", "text_encoder"]', "export_dtype=fp32")
# The tensors each type's adapter file holds per module.
LEAVES = {
    "lora": {"lora_A.weight", "lora_B.weight"},
    "dora": {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2"},  # w2 is full where r >= half its side
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict:
    root = tmp_path_factory.mktemp("lora-types")
    return {"concept": make_concept(root / "concept"), "cache": root / "cache", "base": tiny_pipeline_dir}


def config(setup: dict, out: Path, type: str, *extra: str) -> recipe.Config:
    overrides = [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"output_dir={out}",
        f"data.cache_dir={setup['cache']}",
        f"lora.type={type}",
        *TARGETS,
        *extra,
    ]
    return load_config(recipe.Config, CONFIG, overrides)


def train(cfg: recipe.Config) -> SimpleNamespace:
    """Run the recipe to the end (its last act is the kohya/LyCORIS export)."""
    return SimpleNamespace(path=recipe.main(cfg).path)


def check_kohya_export(run: SimpleNamespace, type: str) -> None:
    """The kohya-format file exists and the run is done, for every type."""
    kohya = run.path / "export" / f"{run.path.name}.safetensors"
    assert kohya.is_file() and read_run(run.path).status == "done", type


@pytest.fixture(scope="module", params=TYPES)
def first_run(request: pytest.FixtureRequest, setup: dict, tmp_path_factory: pytest.TempPathFactory):
    type = request.param
    return type, train(config(setup, tmp_path_factory.mktemp("runs") / type, type))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_resume_after_a_crash_is_bit_identical(
    first_run: tuple[str, SimpleNamespace], setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    type, first = first_run
    runner = SimpleNamespace(main=lambda cfg: train(cfg))  # the recipe, with train()'s export rule
    left, resumed = crash_then_resume(
        runner, monkeypatch, lambda out, *extra: config(setup, out, type, *extra), tmp_path / "r"
    )
    assert left == [2]
    assert losses(resumed.path) == losses(first.path) and sorted(losses(first.path)) == [1, 2, 3, 4]
    final = first.path / "checkpoints" / "step_000004"
    for name in ("trainable_0.safetensors", "trainable_1.safetensors", "lora.safetensors"):
        whole, parts = (
            load_file(str(final / name)),
            load_file(str(resumed.path / final.relative_to(first.path) / name)),
        )
        assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole), name
    exported = load_file(str(lora_io.final_adapter_path(resumed.path)))
    assert all(torch.equal(exported[k], parts[k]) for k in parts)  # the final adapter is step 4's
    check_kohya_export(first, type)
    check_kohya_export(resumed, type)


def test_adapter_file_holds_the_trained_tensors(first_run: tuple[str, SimpleNamespace]) -> None:
    type, run = first_run
    checkpoint = run.path / "checkpoints" / "step_000004"
    path = checkpoint / "lora.safetensors"
    adapter = load_file(str(path))
    # Every trained tensor of the U-Net (trainable_0) and the text encoder (trainable_1), under its
    # component and file module path, PEFT's tensor name without the adapter name.
    trained = {}
    for i, component in enumerate(("unet", "text_encoder")):
        for key, tensor in load_file(str(checkpoint / f"trainable_{i}.safetensors")).items():
            parts = key.split(".")
            at = parts.index("default")
            stem = lora_io.diffusers_stem(".".join([component, *parts[: at - 1]]))
            name = ".".join([stem, parts[at - 1], *parts[at + 1 :]])
            trained[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = tensor
    assert adapter.keys() == trained.keys()
    if type != "lora":  # a LoRA's file has its scale baked into lora_B
        assert all(torch.equal(adapter[k], trained[k]) for k in trained)
    modules = {k.removesuffix(".weight").rsplit(".", 1)[0] for k in adapter}
    leaves = {k.removeprefix(m + ".") for k in adapter for m in modules if k.startswith(m + ".")}
    assert leaves <= LEAVES[type] and len(leaves) >= 2
    convs = {m for m in modules if ".resnets." in m}
    assert {m.rsplit(".", 1)[1] for m in convs} == {"conv1", "conv2", "conv_shortcut"}  # LoCon: 3x3 and 1x1
    assert any(m.startswith("text_encoder.text_model.") for m in modules)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["tune_step"] == "4"
    if type == "lora":
        assert "tune_adapter_type" not in metadata
        return
    assert metadata["tune_adapter_type"] == type
    described = json.loads(metadata["tune_adapter_config"])
    assert (described["type"], described["r"], described["alpha"]) == (type, 4, 4)
    assert described["target_modules"] == sorted(modules)
    if type == "lokr":
        assert (described["decompose_factor"], described["decompose_both"]) == (-1, False)


def test_step0_grid_is_the_base_model_and_the_last_is_not(
    first_run: tuple[str, SimpleNamespace], setup: dict, tmp_path: Path
) -> None:
    _, run = first_run
    base = load_pipeline(setup["base"])
    base.set_progress_bar_config(disable=True)
    prompts = ["a photo of sks toy", "a photo of toy"]
    sample_grid(base, prompts, [0], tmp_path, steps=2, guidance=6.0, progress=False)
    for name in ("p00_s0.png", "p01_s0.png"):
        step0 = pixels(run.path / "samples" / "step_000000" / name)
        assert np.array_equal(step0, pixels(tmp_path / name))  # zero-initialised: a no-op
        assert not np.array_equal(step0, pixels(run.path / "samples" / "step_000004" / name))


def test_dora_file_is_exact_in_diffusers(first_run: tuple[str, SimpleNamespace], setup: dict) -> None:
    type, run = first_run
    if type != "dora":
        pytest.skip("DoRA only: diffusers cannot load LoHa/LoKr; LoRA files are tested in test_lora.py")
    # The trained U-Net adapter, live: the base with the same injection and the step-4 weights. (The
    # text encoder's DoRA magnitudes do not load through diffusers 0.42 + transformers 5: their loader
    # expects `lora_magnitude_vector.weight` where PEFT's state dict, and so the file, has none.)
    live = load_pipeline(setup["base"]).unet
    options = config(setup, run.path, type).lora.type_options()
    lora_io.inject_lora(live, None, ["attn2", "resnets"], 4, 4.0, type="dora", options=options)
    trained = load_file(str(run.path / "checkpoints" / "step_000004" / "trainable_0.safetensors"))
    assert not live.load_state_dict(trained, strict=False).unexpected_keys
    loaded = load_pipeline(setup["base"])
    loaded.load_lora_weights(str(run.path / "export"), weight_name=lora_io.FINAL_ADAPTER)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = live(latents, 500, hidden).sample, loaded.unet(latents, 500, hidden).sample
        plain = load_pipeline(setup["base"]).unet(latents, 500, hidden).sample
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(want, plain, atol=1e-4)


def test_type_options_are_checked(setup: dict, tmp_path: Path) -> None:
    cfg = load_config(recipe.Config, CONFIG, ["lora.type=lokr", "lora.decompose_factor=4"])
    assert cfg.lora.type_options()["decompose_factor"] == 4
    with pytest.raises(ConfigError, match="lora.decompose_factor applies to lora.type = lokr; .* 'loha'"):
        load_config(recipe.Config, CONFIG, ["lora.type=loha", "lora.decompose_factor=4"])
    with pytest.raises(ConfigError, match="lora.rank_dropout applies to lora.type = loha or lokr"):
        load_config(recipe.Config, CONFIG, ["lora.rank_dropout=0.1"])
    with pytest.raises(ConfigError, match="lora.type = 'lokr' takes lora.rank_dropout"):
        load_config(recipe.Config, CONFIG, ["lora.type=lokr", "lora.dropout=0.1"])
    with pytest.raises(ConfigError, match="lora.type"):
        load_config(recipe.Config, CONFIG, ["lora.type=oft"])


def test_lokr_options_shape_the_factors(setup: dict, tmp_path: Path) -> None:
    extra = ("lora.decompose_factor=4", "lora.decompose_both=true", "lora.rank=1", "max_steps=2")
    run = train(config(setup, tmp_path / "k", "lokr", "sample_every=0", *extra))
    adapter = load_file(str(lora_io.checkpoint_adapter_path(run.path, 2)))
    to_k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # [8, 32]: factors 4x4 (rank 1), 2x8 (rank 1)
    assert {k.rsplit(".", 1)[1]: tuple(v.shape) for k, v in adapter.items() if k.startswith(to_k + ".")} == {
        "lokr_w1_a": (4, 1),
        "lokr_w1_b": (1, 4),
        "lokr_w2_a": (2, 1),
        "lokr_w2_b": (1, 8),
    }


@pytest.mark.parametrize("type", ["dora", "loha", "lokr"])
def test_sdxl_adapters_train_on_both_text_encoders(type: str, setup: dict, tmp_path: Path) -> None:
    from tune.models import build_pipeline

    base = tmp_path / "sdxl"
    build_pipeline("tiny-sdxl-shallow", seed=0).save_pretrained(base)
    extra = ("resolution=64", "max_steps=2", "sample_every=0")
    run = train(config({**setup, "base": str(base)}, tmp_path / "run", type, *extra))
    assert sorted(losses(run.path)) == [1, 2]
    path = lora_io.checkpoint_adapter_path(run.path, 2)
    with safe_open(str(path), framework="pt") as f:
        components = {key.split(".", 1)[0] for key in f.keys()}
        assert f.metadata()["tune_adapter_type"] == type
    assert components == {"unet", "text_encoder", "text_encoder_2"}
