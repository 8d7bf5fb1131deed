"""The dreambooth recipe end to end on the tiny pipeline: run-dir contract, class images generated once
and reused, EMA export that plain diffusers loads and samples like the run, its LoRA by SVD, exact
resume, 8-bit state, pivotal tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from recipes import dreambooth as recipe
from tune import PROJECT_ROOT
from tune import lora as lora_io
from tune.cli import main
from tune.config import load_config
from tune.embeddings import EMBEDDINGS_FILE
from tune.errors import ConfigError
from tune.models import build_pipeline, load_pipeline
from tune.personalize import apply_run_weights
from tune.runs import read_run
from tune.sampling import sample_grid

from recipe_testkit import check_exact_resume, crash_then_resume, losses, make_concept

CONFIGS = PROJECT_ROOT / "recipes" / "configs" / "dreambooth"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("dreambooth")
    return {"concept": make_concept(root / "concept"), "cache": root / "cache", "base": tiny_pipeline_dir}


def config(setup: dict, out: Path, *extra: str, base: str | None = None) -> recipe.Config:
    overrides = [
        f"base_model={base or setup['base']}",
        f"concept={setup['concept']}",
        f"output_dir={out}",
        f"data.cache_dir={setup['cache']}",
        *extra,
    ]
    return load_config(recipe.Config, CONFIGS / "tiny.toml", overrides)


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:06d}"


@pytest.fixture(scope="module")
def first_run(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recipe.main(config(setup, tmp_path_factory.mktemp("runs") / "a")).path


def test_run_directory_contract(first_run: Path, setup: dict) -> None:
    run = read_run(first_run)
    assert run.status == "done" and run.recipe == "dreambooth"
    assert sorted(losses(first_run)) == [1, 2, 3, 4]
    assert all(math.isfinite(m[k]) for m in run.metrics if "loss" in m for k in ("loss", "lr", "s_per_step"))
    assert run.sample_steps == [0, 2, 4] and run.checkpoint_steps == [2, 4]
    assert (first_run / "export" / "pipeline" / "model_index.json").is_file()
    assert (first_run / "export" / f"{first_run.name}.safetensors").is_file()
    assert (first_run / "export" / f"{first_run.name}_lora.safetensors").is_file()
    base = load_pipeline(setup["base"])
    info = run.info
    assert info["base_model_hash"] == lora_io.base_model_hash(base.unet, base.text_encoder)
    assert (info["instance_prompt"], info["class_prompt"], info["trigger"]) == (
        "a photo of sks toy",
        "a photo of toy",
        "sks",
    )
    assert (info["photos"], info["class_images"], info["max_steps"]) == (4, 2, 4)
    assert info["optimizer_state_bytes"] == 2 * 4 * info["unet_params"] + 4 * len(
        list(base.unet.parameters())
    )


def test_class_images_are_the_base_models_and_cached(first_run: Path, setup: dict, tmp_path: Path) -> None:
    [folder] = (Path(setup["cache"]) / "class_images").glob("*/*")
    index = json.loads((folder / "index.json").read_text())
    assert (index["prompt"], index["seeds"], index["steps"]) == ("a photo of toy", [0, 1], 2)
    assert index["base_model_hash"] == read_run(first_run).info["base_model_hash"]
    base = load_pipeline(setup["base"])
    base.set_progress_bar_config(disable=True)
    sample_grid(base, "a photo of toy", [0, 1], tmp_path, steps=2, guidance=6.0, batch_size=4, progress=False)
    for seed in (0, 1):
        ours = np.asarray(Image.open(folder / f"s{seed}.png"))
        assert np.array_equal(ours, np.asarray(Image.open(tmp_path / f"p00_s{seed}.png")))


def test_export_is_the_ema_unet_and_samples_like_the_run(first_run: Path, tmp_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(first_run / "export" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    ema = torch.load(checkpoint(first_run, 4) / "custom_checkpoint_1.pkl", weights_only=False)[
        "shadow_params"
    ]
    raw = load_file(str(checkpoint(first_run, 4) / "model.safetensors"))
    exported = dict(pipe.unet.named_parameters())
    assert all(torch.equal(q, e) for q, e in zip(exported.values(), ema, strict=True))
    assert any(not torch.equal(q, raw[n]) for n, q in exported.items())  # the average lags the raw weights
    with torch.no_grad():  # weights loaded by mmap sit unaligned, which moves CPU kernels' last bits
        for q in pipe.unet.parameters():
            q.data = q.data.clone()
    sample_grid(
        pipe, ["a photo of sks toy", "a photo of toy"], [0], tmp_path, steps=2, guidance=6.0, progress=False
    )
    for name in ("p00_s0.png", "p01_s0.png"):
        ours = np.asarray(Image.open(first_run / "samples" / "step_000004" / name)).astype(int)
        # Equal up to a last-bit rounding on some CPUs (1 of 255 on 1 of 3072 values seen); step 2's
        # samples differ from step 4's by up to 20 on most values.
        assert np.abs(np.asarray(Image.open(tmp_path / name)).astype(int) - ours).max() <= 1


def test_export_lora_is_the_fine_tune_minus_the_base(
    first_run: Path, setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = first_run / "export" / f"{first_run.name}_lora.safetensors"
    lora = lora_io.read_lora(file)
    metadata = lora_io.read_lora_file(file)[1]
    errors = json.loads(metadata["tune_extract_error"])
    assert errors == pytest.approx(read_run(first_run).info["export_lora_error"], abs=1e-6)
    assert metadata["modelspec.trigger_phrase"] == "sks" and metadata["ss_network_dim"] == "32"
    tuned, base = load_pipeline(first_run / "export" / "pipeline"), load_pipeline(setup["base"])
    residual = norm = 0.0
    for target, pair in lora.modules.items():
        path = target.split(".", 1)[1]
        delta = (tuned.unet.get_submodule(path).weight - base.unet.get_submodule(path).weight).detach()
        residual += float((delta - pair.delta(delta.shape)).norm()) ** 2
        norm += float(delta.norm()) ** 2
    # Rank 32 holds every tiny module's change: what is left is the fp16 file's rounding.
    assert (residual / norm) ** 0.5 == pytest.approx(errors["overall"], rel=1e-2) and errors["overall"] < 2e-3
    assert {"unet attn1", "unet attn2", "unet ff", "unet proj"} < set(errors)

    # `tune lora extract RUN_DIR` takes the run's export and base; rank 4 loses part of the change.
    out = tmp_path / "r4.safetensors"
    assert main(["lora", "extract", str(first_run), "--rank", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    overall = float(printed.splitlines()[-1].split()[-1])
    print(f"dreambooth tiny run as a LoRA: rank 32 {errors['overall']:.2e}, rank 4 {overall:.3f}")
    assert 0.05 < overall < 1 and lora_io.read_lora(out).modules.keys() == lora.modules.keys()
    # From the single file (fp16) with the base folder as its config: the same modules.
    single, out = first_run / "export" / f"{first_run.name}.safetensors", tmp_path / "single.safetensors"
    assert (
        main(["lora", "extract", str(single), "--base", setup["base"], "--rank", "4", "--out", str(out)]) == 0
    )
    assert lora_io.read_lora(out).modules.keys() == lora.modules.keys()


def test_resume_is_exact(
    first_run: Path, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left, resumed = crash_then_resume(
        recipe, monkeypatch, lambda out, *extra: config(setup, out, *extra), tmp_path / "r"
    )
    assert left == [2]
    resumed = resumed.path
    assert losses(resumed) == losses(first_run)
    whole, parts = (load_file(str(checkpoint(r, 4) / "model.safetensors")) for r in (first_run, resumed))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    whole_ema, parts_ema = (
        torch.load(checkpoint(r, 4) / "custom_checkpoint_1.pkl", weights_only=False)["shadow_params"]
        for r in (first_run, resumed)
    )
    assert all(torch.equal(a, b) for a, b in zip(whole_ema, parts_ema, strict=True))
    # The second run drew no class images and encoded no latents: both caches were warm.
    assert len(list((Path(setup["cache"]) / "class_images").rglob("*.png"))) == 2
    assert read_run(resumed).info["cache"]["latent"] == {"encoded": 0, "loaded": 6}


def test_text_encoder_training_without_ema_min_snr_offset(setup: dict, tmp_path: Path) -> None:
    extra = (
        "train_text_encoder=true",
        "ema=false",
        "max_steps=2",
        "sample_every=0",
        "export_single_file=false",
        "diffusion.snr_gamma=5.0",  # exercised here, not judged
        "diffusion.noise_offset=0.05",
    )
    run = recipe.main(config(setup, tmp_path / "t", *extra)).path
    raw = load_file(str(checkpoint(run, 2) / "model.safetensors"))
    text = load_file(str(checkpoint(run, 2) / "model_1.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(run / "export" / "pipeline")
    assert all(
        torch.equal(q, raw[n]) for n, q in pipe.unet.named_parameters()
    )  # without EMA: the raw weights
    base = load_pipeline(setup["base"]).text_encoder.state_dict()
    exported = pipe.text_encoder.state_dict()
    assert set(text) and any(not torch.equal(exported[n], base[n]) for n in base)


def test_adamw8bit_state_is_a_fraction_of_adamw(setup: dict, tmp_path: Path) -> None:
    # The "small" preset: bitsandbytes keeps tensors under 4096 elements in 32-bit state, so the tiny
    # U-Net would show little saving; the small one's 8.8M parameters are mostly in big tensors.
    base = tmp_path / "small"
    build_pipeline("small", seed=0).save_pretrained(base)
    figures = {}
    for name in ("adamw", "adamw8bit"):
        extra = ("prior.enabled=false", "resolution=64", "max_steps=1", "sample_every=0", "ema=false")
        cfg = config(
            setup, tmp_path / name, *extra, f"optim.name={name}", "export_single_file=false", base=str(base)
        )
        figures[name] = read_run(recipe.main(cfg).path).info["optimizer_state_bytes"]
    ratio = figures["adamw8bit"] / figures["adamw"]
    print(f"dreambooth optimizer state on the small U-Net: {figures} ({ratio:.1%})")
    assert 0 < ratio <= 0.30


def test_shipped_configs_load_strictly(setup: dict, tmp_path: Path) -> None:
    for name in ("tiny", "default", "sd15"):
        assert load_config(recipe.Config, CONFIGS / f"{name}.toml").max_steps > 0
    default = load_config(recipe.Config, CONFIGS / "default.toml")  # the values measured on the shipped base
    assert (default.max_steps, default.optim.lr, default.pivotal.enabled, default.pivotal.lr) == (
        1600,
        3e-4,
        "auto",
        5e-3,
    )
    assert (default.prior.from_captions, default.prior.from_prompts, default.prior.loss_weight) == (
        True,
        True,
        0.25,
    )
    sd15 = load_config(recipe.Config, CONFIGS / "sd15.toml")  # diffusers' documented SD1.x values
    assert sd15.resolution == 512 and sd15.optim.lr == 5e-6 and sd15.pivotal.enabled is False
    with pytest.raises(ConfigError, match="did you mean 'train_text_encoder'"):
        load_config(recipe.Config, None, ["train_text_encoders=true"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(recipe.Config, None, ["ema_decay=1.5"])
    photos = Path(setup["concept"]) / "photos"
    explicit = [
        f"instance_dir={photos}",
        "instance_prompt=a photo of sks toy",
        f"output_dir={tmp_path / 'x'}",
    ]
    with pytest.raises(ConfigError, match="needs a class prompt"):
        recipe.main(load_config(recipe.Config, None, [*explicit, "prior.enabled=true"]))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree"])
def test_resume_is_exact_with_prodigy_and_schedule_free(
    optimizer: str, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = lambda out, *extra: config(setup, out, *extra)  # noqa: E731
    # with a pivotal token at its own rate, as the default config trains a new trigger (Prodigy refused it)
    pivotal = ("pivotal.enabled=true", "pivotal.lr=5e-3")
    whole, _ = check_exact_resume(
        recipe, monkeypatch, make, tmp_path, f"optim.name={optimizer}", "ema=false", *pivotal
    )
    # the export holds the weights the last checkpoint holds (a schedule-free run's averaged ones; switching
    # to the training weights and back rounds in the last bits)
    saved = load_file(str(checkpoint(whole.path, 4) / "model.safetensors"))
    exported = load_file(
        str(whole.path / "export" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    )
    for k in saved:
        torch.testing.assert_close(exported[k], saved[k])


def test_validation_loss_is_logged(setup: dict, tmp_path: Path) -> None:
    run = read_run(recipe.main(config(setup, tmp_path / "r", "val_every=4", "sample_every=0")).path)
    rows = [m for m in run.metrics if "val_loss" in m]
    assert [m["step"] for m in rows] == [0, 4] and run.info["photos"] == 3
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the trained U-Net's loss, not the base's


def test_pivotal_trains_the_token_beside_the_unet_and_resumes_exactly(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = lambda out, *extra: config(setup, out, "pivotal.enabled=auto", *extra)  # noqa: E731
    whole = recipe.main(make(tmp_path / "p")).path  # the concept's trigger, "sks", a new word
    run = read_run(whole)
    assert run.config["pivotal"]["enabled"] is True  # as it ran
    steps = [load_file(str(checkpoint(whole, s) / EMBEDDINGS_FILE))["sks"] for s in (2, 4)]
    assert not torch.equal(*steps)  # the token trains
    base = load_pipeline(setup["base"])
    rows = base.text_encoder.get_input_embeddings().weight.shape[0]
    export = StableDiffusionPipeline.from_pretrained(whole / "export" / "pipeline")
    (token_id,) = export.tokenizer("sks", add_special_tokens=False).input_ids  # one token of its own
    matrix = export.text_encoder.get_input_embeddings().weight.detach()
    assert token_id == rows and matrix.shape[0] == rows + 1
    assert torch.equal(matrix[:rows], base.text_encoder.get_input_embeddings().weight.detach())  # others kept
    assert torch.equal(matrix[rows], load_file(str(whole / "export" / EMBEDDINGS_FILE))["sks"][0])
    # The single file holds a base-shaped text encoder (A1111, ComfyUI); the token is the file beside it.
    single = load_file(str(whole / "export" / f"{whole.name}.safetensors"))
    (key,) = [k for k in single if k.endswith("token_embedding.weight")]
    assert single[key].shape[0] == rows
    # `tune eval` and `tune sample` put the token in at a checkpoint and at the export, and take it out.
    for step in (4, None):
        with apply_run_weights(base, whole, step) as applied:
            assert EMBEDDINGS_FILE in [Path(f).name for f in applied.files]
            assert base.tokenizer("sks", add_special_tokens=False).input_ids == [token_id]
        assert base.text_encoder.get_input_embeddings().weight.shape[0] == rows
    # Killed and resumed: the same losses and the same token.
    left, resumed = crash_then_resume(recipe, monkeypatch, make, tmp_path / "r")
    assert left == [2] and losses(resumed.path) == losses(whole)
    again = load_file(str(checkpoint(resumed.path, 4) / EMBEDDINGS_FILE))["sks"]
    assert torch.equal(again, steps[1])


def test_pivotal_trains_a_blank_known_word_in_its_own_row(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.personalize import trigger

    monkeypatch.setattr(trigger, "BLANK_TRIGGER", float("inf"))  # the tiny base reads any word as blank
    known = ("pivotal.enabled=auto", "token=w", "instance_prompt=a photo of w toy")
    whole = recipe.main(config(setup, tmp_path / "w", *known)).path
    assert read_run(whole).config["pivotal"]["enabled"] is True
    base = load_pipeline(setup["base"])
    matrix = base.text_encoder.get_input_embeddings().weight.detach().clone()
    (w,) = base.tokenizer("w", add_special_tokens=False).input_ids
    tuned = load_file(str(whole / "export" / EMBEDDINGS_FILE))["w"][0]
    assert not torch.equal(tuned, matrix[w])  # the word's own row trained...
    export = StableDiffusionPipeline.from_pretrained(whole / "export" / "pipeline")
    exported = export.text_encoder.get_input_embeddings().weight.detach()
    others = torch.ones(len(matrix), dtype=torch.bool)
    others[w] = False
    assert exported.shape == matrix.shape and torch.equal(exported[w], tuned)  # ...in place, nothing added
    assert torch.equal(exported[others], matrix[others])
    single = load_file(str(whole / "export" / f"{whole.name}.safetensors"))
    (key,) = [k for k in single if k.endswith("token_embedding.weight")]
    assert torch.equal(single[key], matrix.to(single[key].dtype))  # the base's row in the single file (fp16)
    with apply_run_weights(base, whole, None):
        assert torch.equal(base.text_encoder.get_input_embeddings().weight.detach()[w], tuned)
    assert torch.equal(base.text_encoder.get_input_embeddings().weight.detach(), matrix)  # taken out again
