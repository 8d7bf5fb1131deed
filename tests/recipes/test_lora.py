"""The lora recipe end to end on the tiny pipeline: run-dir contract, zero-init no-op, trainable set,
exports that diffusers loads, exact resume, latent cache reuse, pivotal tuning, prior preservation."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recipes import lora as recipe
from tune import PROJECT_ROOT
from tune import lora as lora_io
from tune.config import load_config
from tune.embeddings import EMBEDDINGS_FILE
from tune.errors import ConfigError, ModelError
from tune.models import load_pipeline
from tune.personalize import trigger
from tune.runs import read_run
from tune.sampling import sample_grid

from recipe_testkit import check_exact_resume, crash_then_resume, losses, make_concept

CONFIGS = PROJECT_ROOT / "recipes" / "configs" / "lora"
ATTN2 = re.compile(r".+\.attn2\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.default\.weight")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("lora")
    return {"concept": make_concept(root / "concept"), "cache": root / "cache", "base": tiny_pipeline_dir}


def config(setup: dict, out: Path, *extra: str) -> recipe.Config:
    overrides = [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"output_dir={out}",
        f"data.cache_dir={setup['cache']}",
        *extra,
    ]
    return load_config(recipe.Config, CONFIGS / "tiny.toml", overrides)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def first_run(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recipe.main(config(setup, tmp_path_factory.mktemp("runs") / "a")).path


def test_run_directory_contract(first_run: Path, setup: dict) -> None:
    run = read_run(first_run)
    assert run.status == "done" and run.recipe == "lora" and (first_run / "config.toml").is_file()
    assert sorted(losses(first_run)) == [1, 2, 3, 4]
    numbers = [v for m in run.metrics for k, v in m.items() if k in ("loss", "lr", "s_per_step")]
    assert len(numbers) == 12 and all(math.isfinite(v) for v in numbers)
    assert run.sample_steps == [0, 2, 4]
    index = json.loads((run.samples_at(2) / "prompts.json").read_text())
    assert index["prompts"] == ["a photo of sks toy", "a photo of toy"] and index["seeds"] == [0]
    assert run.checkpoint_steps == [2, 4]
    for step in (2, 4):
        assert (lora_io.checkpoint_adapter_path(first_run, step)).is_file()
    export = first_run / "export"
    assert {p.name for p in export.iterdir()} == {
        "pytorch_lora_weights.safetensors",
        f"{first_run.name}.safetensors",
    }
    assert all(
        t.dtype == torch.float16 for t in load_file(str(export / "pytorch_lora_weights.safetensors")).values()
    )
    base = load_pipeline(setup["base"])
    info = run.info
    assert info["base_model_hash"] == lora_io.base_model_hash(base.unet, base.text_encoder)
    assert (info["instance_prompt"], info["trigger"], info["max_steps"]) == ("a photo of sks toy", "sks", 4)
    assert info["concept"] == str(Path(setup["concept"]).resolve()) and info["photos"] == 4


def test_step0_grid_is_the_base_model(first_run: Path, setup: dict, tmp_path: Path) -> None:
    base = load_pipeline(setup["base"])
    base.set_progress_bar_config(disable=True)
    sample_grid(
        base, ["a photo of sks toy", "a photo of toy"], [0], tmp_path, steps=2, guidance=6.0, progress=False
    )
    for name in ("p00_s0.png", "p01_s0.png"):
        step0 = pixels(first_run / "samples" / "step_000000" / name)
        assert np.array_equal(step0, pixels(tmp_path / name))  # the zero-initialised adapter is a no-op
        assert not np.array_equal(
            step0, pixels(first_run / "samples" / "step_000004" / name)
        )  # ...then learns


def test_only_cross_attention_adapters_train(first_run: Path, setup: dict) -> None:
    checkpoint = first_run / "checkpoints" / "step_000004"
    trained = set(load_file(str(checkpoint / "trainable_0.safetensors")))
    assert not (checkpoint / "trainable_1.safetensors").exists()  # the text encoder is not trained
    assert not list(checkpoint.glob("model*.safetensors"))  # no copy of the frozen U-Net
    unet = load_pipeline(setup["base"]).unet
    attn2 = [n for n, _ in unet.named_modules() if re.fullmatch(r".+\.attn2\.(to_q|to_k|to_v|to_out\.0)", n)]
    assert len(attn2) == 64 and all(ATTN2.fullmatch(n) for n in trained)
    assert {n.rsplit(".lora_", 1)[0] for n in trained} == set(attn2) and len(trained) == 2 * len(attn2)


def test_blocks_keep_the_adapters_to_those_blocks(first_run: Path, setup: dict, tmp_path: Path) -> None:
    run = recipe.main(
        config(setup, tmp_path / "up", 'lora.blocks=["mid", "up"]', "max_steps=2", "sample_every=0")
    ).path
    trained = set(load_file(str(run / "checkpoints" / "step_000002" / "trainable_0.safetensors")))
    everywhere = set(load_file(str(first_run / "checkpoints" / "step_000004" / "trainable_0.safetensors")))
    assert trained == {n for n in everywhere if n.startswith(("mid_block.", "up_blocks."))}
    assert trained and any(n.startswith("down_blocks.") for n in everywhere)
    kohya = lora_io.read_lora(run / "export" / f"{run.name}.safetensors")  # the files name those blocks only
    assert kohya.modules and not [m for m in kohya.modules if "down_blocks" in m]
    with pytest.raises(ConfigError, match="lora.blocks needs at least one of down, mid, up"):
        load_config(recipe.Config, None, ["lora.blocks=[]"])
    with pytest.raises(ConfigError, match="lora.blocks"):
        load_config(recipe.Config, None, ['lora.blocks=["middle"]'])
    with pytest.raises(ConfigError, match="at least one U-Net group"):  # at load, before any run directory
        load_config(recipe.Config, None, ['lora.targets=["text_encoder"]'])


def test_exports_load_in_diffusers(first_run: Path, setup: dict) -> None:
    trained = lora_io.read_lora(lora_io.checkpoint_adapter_path(first_run, 4))
    for path in (
        first_run / "export" / "pytorch_lora_weights.safetensors",
        first_run / "export" / f"{first_run.name}.safetensors",
    ):
        shipped = lora_io.read_lora(path)
        assert set(shipped.modules) == set(trained.modules)
        for name, pair in trained.modules.items():
            shape = (pair.up.shape[0], pair.down.shape[1])
            torch.testing.assert_close(
                shipped.modules[name].delta(shape), pair.delta(shape), atol=2e-4, rtol=1e-2
            )
    pipe = load_pipeline(setup["base"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    before = pipe.unet(latents, 500, hidden).sample
    pipe.load_lora_weights(str(first_run / "export"), weight_name="pytorch_lora_weights.safetensors")
    assert not torch.equal(pipe.unet(latents, 500, hidden).sample, before)


def test_resume_is_exact_and_reuses_the_latent_cache(
    first_run: Path, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left, resumed = crash_then_resume(
        recipe, monkeypatch, lambda out, *extra: config(setup, out, *extra), tmp_path / "r"
    )
    assert left == [2]
    resumed = resumed.path
    assert losses(resumed) == losses(first_run)  # steps 1-2 before the crash, 3-4 after the resume
    final = "checkpoints/step_000004/trainable_0.safetensors"
    whole, parts = load_file(str(first_run / final)), load_file(str(resumed / final))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    assert (
        read_run(resumed).status == "done"
        and (resumed / "export" / "pytorch_lora_weights.safetensors").is_file()
    )
    # The photos were encoded by the first run: later runs on them load every latent from the cache.
    assert read_run(first_run).info["cache"]["latent"] == {"encoded": 4, "loaded": 0}
    assert read_run(resumed).info["cache"]["latent"] == {"encoded": 0, "loaded": 4}


@pytest.mark.slow  # torch.compile of the training step: ~35 s
def test_compiled_training_matches_eager(
    first_run: Path, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # compile=true skips dynamo's guards on module attributes; the grids sampled at steps 0 and 2 (eval
    # mode, then train mode again) must not leave the compiled forward training anything else. Dynamo
    # with the aot_eager backend traces and guards as with inductor, without minutes of C++ compiling.
    calls: list[dict] = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        calls.append({**kwargs, "options": dict(kwargs.get("options") or {})})  # torch.compile pops from it
        return real_compile(model, **{k: v for k, v in kwargs.items() if k != "mode"}, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    run = recipe.main(config(setup, tmp_path / "c", "compile=true")).path
    assert len(calls) == 1
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):
        assert "guard_filter_fn" in calls[0]["options"]
    eager, compiled = losses(first_run), losses(run)
    assert eager.keys() == compiled.keys() == {1, 2, 3, 4}
    assert all(math.isclose(eager[k], compiled[k], rel_tol=1e-4) for k in eager), (eager, compiled)
    final = "export/pytorch_lora_weights.safetensors"
    a, b = load_file(str(first_run / final)), load_file(str(run / final))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=2e-3) for k in a)


def test_pivotal_text_encoder_accumulation_checkpointing(
    first_run: Path, setup: dict, tmp_path: Path
) -> None:
    # The command contract without a concept: photos, prompt and token given explicitly.
    run = recipe.main(
        config(
            setup,
            tmp_path / "p",
            "concept=",
            f"instance_dir={Path(setup['concept']) / 'photos'}",
            "instance_prompt=a photo of sks toy",
            "token=sks",
            "pivotal.enabled=true",
            "pivotal.initializer_token=toy",
            'lora.targets=["attn2", "text_encoder"]',
            "grad_accum=2",
            "gradient_checkpointing=true",
            "seed=1",
        )
    ).path
    assert sorted(losses(run)) == [1, 2, 3, 4] and losses(run) != losses(first_run)
    checkpoint = run / "checkpoints" / "step_000004"
    text_trained = set(load_file(str(checkpoint / "trainable_1.safetensors")))
    assert "embeddings.token_embedding.weight" in {n.removeprefix("text_model.") for n in text_trained}
    assert any(".self_attn.q_proj.lora_A." in n for n in text_trained)
    # Each optimizer step consumed two micro-batches of the 4-photo epoch: 4 steps = 4 epochs.
    position = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert position == {"epoch": 3, "position": 2, "seed": 1}
    pipe = load_pipeline(setup["base"])
    toy = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("toy</w>")]
    pipe.load_textual_inversion(str(run / "export" / "learned_embeds.safetensors"))
    learned = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("sks")]
    assert not torch.equal(learned, toy) and torch.allclose(learned, toy, atol=0.05)
    assert len(lora_io.read_lora(run / "export" / "pytorch_lora_weights.safetensors").modules) == 64 + 2 * 6


def test_prior_preservation_generates_and_reuses_class_images(
    first_run: Path, setup: dict, tmp_path: Path
) -> None:
    extra = (
        "prior.enabled=true",
        "prior.num_class_images=2",
        "prior.steps=1",
        "max_steps=2",
        "sample_every=0",
        "optim.name=lion8bit",
    )
    first = read_run(recipe.main(config(setup, tmp_path / "c1", *extra)).path)
    again = read_run(recipe.main(config(setup, tmp_path / "c2", *extra)).path)
    assert first.info["class_images"] == 2 and first.info["class_prompt"] == "a photo of toy"
    assert first.info["cache"]["latent"]["encoded"] == 2  # the photos' latents were cached by earlier runs
    assert again.info["cache"]["latent"] == {"encoded": 0, "loaded": 6}
    assert losses(first.path) == losses(again.path) and first.sample_steps == []
    assert len(list((Path(setup["cache"]) / "class_images").rglob("*.png"))) == 2  # generated once


def test_shipped_configs_load_strictly() -> None:
    tiny = load_config(recipe.Config, CONFIGS / "tiny.toml")
    assert tiny.max_steps > 0 and tiny.lora.targets == ("attn2",)
    default = load_config(recipe.Config, CONFIGS / "default.toml")  # the values measured on the shipped base
    assert default.lora.targets == ("attn1", "attn2", "ff") and default.lora.rank == 16
    assert default.optim.lr == 1e-3 and default.prior.enabled and default.max_steps == 1200
    assert (default.pivotal.enabled, default.pivotal.lr, default.pivotal.lora_lr) == ("auto", 5e-3, 0.0)
    sd15 = load_config(recipe.Config, CONFIGS / "sd15.toml")  # diffusers' documented SD1.x values
    assert (sd15.resolution, sd15.lora.rank, sd15.optim.lr) == (512, 4, 1e-4)
    with pytest.raises(ConfigError, match="did you mean 'lora.rank'"):
        load_config(recipe.Config, CONFIGS / "tiny.toml", ["lora.rnak=3"])
    with pytest.raises(ConfigError, match="lora.targets"):
        load_config(recipe.Config, None, ['lora.targets=["attn3"]'])


def test_bad_inputs_fail_before_the_run_directory_exists(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trigger, "BLANK_TRIGGER", 0.0)  # the base reads every word it has as a word
    with pytest.raises(ConfigError, match="instance_dir is required"):
        recipe.main(load_config(recipe.Config, None, [f"output_dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="must be in the instance prompt"):
        recipe.main(config(setup, tmp_path / "x", "pivotal.enabled=true", "token=zwx"))
    taken = ("pivotal.enabled=true", "token=w", "instance_prompt=a photo of w toy")  # a letter is a token
    with pytest.raises(ConfigError, match="'w' is already in the tokenizer's vocabulary"):
        recipe.main(config(setup, tmp_path / "x", *taken))
    with pytest.raises(ModelError, match="no model file or folder"):
        recipe.main(config({**setup, "base": str(tmp_path / "no-model")}, tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # all checked before the run directory is made


def test_pivotal_auto_makes_a_new_word_a_token_and_leaves_a_known_one(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = ("pivotal.enabled=auto", "pivotal.lora_lr=3e-5", "max_steps=2", "sample_every=0")
    photos = f"instance_dir={Path(setup['concept']) / 'photos'}"
    new = recipe.main(config(setup, tmp_path / "new", *short)).path  # the concept's trigger, "sks"
    as_known = (*short, "concept=", photos, "instance_prompt=a photo of w toy")  # a letter: a word it has
    monkeypatch.setattr(trigger, "BLANK_TRIGGER", 0.0)  # the base reads "w" as a word: left alone
    known = recipe.main(config(setup, tmp_path / "known", *as_known)).path
    assert (new / "export" / EMBEDDINGS_FILE).is_file() and not (known / "export" / EMBEDDINGS_FILE).exists()
    assert [read_run(r).config["pivotal"]["enabled"] for r in (new, known)] == [True, False]  # as it ran
    monkeypatch.setattr(trigger, "BLANK_TRIGGER", float("inf"))  # ...as next to nothing: its row trains
    blank = recipe.main(config(setup, tmp_path / "blank", *as_known)).path
    assert list(load_file(str(blank / "export" / EMBEDDINGS_FILE))) == ["w"]
    # The adapters learn at pivotal.lora_lr beside the token, at optim.lr (tiny: 1e-3) alone; after warmup:
    assert [[m["lr"] for m in read_run(r).metrics if "loss" in m][-1] for r in (new, known)] == [3e-5, 1e-3]


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree"])
def test_resume_is_exact_with_prodigy_and_schedule_free(
    optimizer: str, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = lambda out, *extra: config(setup, out, *extra)  # noqa: E731
    # with pivotal tuning, as the default config trains a new trigger: the token's group at the default's 5e-3,
    # beside optim.lr (prodigyopt refused that at its first step until every group got its one multiplier)
    overrides = (f"optim.name={optimizer}", "pivotal.enabled=true", "pivotal.lr=5e-3")
    whole, _ = check_exact_resume(recipe, monkeypatch, make, tmp_path, *overrides)
    assert (whole.path / "export" / EMBEDDINGS_FILE).is_file()
    rows = [m for m in read_run(whole.path).metrics if "loss" in m]
    if optimizer == "prodigy":  # its own step size: lr is the multiplier 1, d its estimate (from d0 = 1e-6)
        assert all(m["lr"] == 1.0 and m["d"] >= 1e-6 for m in rows)
    # the export (fp16) holds the weights the last checkpoint holds (a schedule-free run's averaged ones)
    exported = lora_io.read_lora(whole.path / "export" / "pytorch_lora_weights.safetensors")
    saved = lora_io.read_lora(lora_io.checkpoint_adapter_path(whole.path, 4))
    for name, pair in saved.modules.items():
        shape = (pair.up.shape[0], pair.down.shape[1])
        torch.testing.assert_close(
            exported.modules[name].delta(shape), pair.delta(shape), atol=1e-3, rtol=1e-2
        )


def test_validation_loss_on_held_out_photos(setup: dict, tmp_path: Path) -> None:
    make = lambda out: recipe.main(config(setup, out, "val_every=2", "sample_every=0"))  # noqa: E731
    run = read_run(make(tmp_path / "a").path)
    rows = [m for m in run.metrics if "val_loss" in m]
    assert [m["step"] for m in rows] == [0, 2, 4] and all(math.isfinite(m["val_loss"]) for m in rows)
    assert run.info["photos"] == 3  # one of the four photos is held out (val_share 0.2, at least one)
    assert sorted(losses(run.path)) == [1, 2, 3, 4]  # training rows are unchanged
    # fixed noise and timesteps: the base model's loss (step 0) is the same in every run
    again = [m for m in read_run(make(tmp_path / "b").path).metrics if "val_loss" in m]
    assert again == [{**m, "time": a["time"]} for m, a in zip(rows, again, strict=True)]


@pytest.mark.slow  # torch.compile (aot_eager) of two runs' training steps: ~40 s
def test_compiled_training_with_the_trigger_attention_loss(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compiled forward skips guards on module attributes, so it runs the attention processors it was
    # traced with: the loss's recording processors must be in place before it is traced and never change
    # (narrowing them after step 1 crashed step 2), and a graph traced in this process for an earlier
    # run's U-Net (here without the loss, so without recording) must not be reused.
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        return real_compile(model, **{k: v for k, v in kwargs.items() if k != "mode"}, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    masked = {**setup, "concept": masked_concept(tmp_path)}
    steps = ("max_steps=3", "sample_every=0")
    recipe.main(config(masked, tmp_path / "plain", *steps, "compile=true"))
    extra = (*steps, "data.mask_attention_weight=0.5")
    eager = losses(recipe.main(config(masked, tmp_path / "a", *extra)).path)
    compiled = losses(recipe.main(config(masked, tmp_path / "b", *extra, "compile=true")).path)
    assert eager.keys() == compiled.keys() == {1, 2, 3}
    assert all(math.isclose(eager[k], compiled[k], rel_tol=1e-4) for k in eager), (eager, compiled)


def masked_concept(tmp_path: Path) -> Path:
    """make_concept's two photos, each with its subject mask from the renderer."""
    from tune.world.render import object_mask
    from tune.world.subjects import SUBJECTS

    concept = make_concept(tmp_path / "masked", count=2)
    for i in range(2):  # make_concept's draws: the renderer says where the toy is
        spec = SUBJECTS["sks-toy"].spec(("wooden table", "grey")[i])
        mask = object_mask(spec, np.random.default_rng(i), 64 + 16 * i, 64)
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
            concept / "photos" / f"toy_{i}-masklabel.png"
        )
    return concept


def test_the_photos_masks_weigh_the_loss(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.personalize import loading as photo_loading

    concept = masked_concept(tmp_path)
    seen: list[torch.Tensor | None] = []
    real = photo_loading.diffusion_step

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - diffusion_step's own signature
        seen.append(kwargs.get("pixel_weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(photo_loading, "diffusion_step", spy)
    masked = {**setup, "concept": concept}
    recipe.main(
        config(masked, tmp_path / "a", "max_steps=2", "sample_every=0", "data.mask_background_weight=0.2")
    )
    assert len(seen) == 2 and all(w is not None for w in seen)
    for weights in seen:
        assert weights.shape[1] == 1 and float(weights.min()) == pytest.approx(0.2)
        assert (
            float(weights.max()) == pytest.approx(1.0) and 0.02 < float((weights > 0.9).float().mean()) < 0.5
        )
    seen.clear()
    recipe.main(
        config(masked, tmp_path / "b", "max_steps=2", "sample_every=0", "data.mask_background_weight=1")
    )
    assert seen == [None, None]


def test_the_trigger_attention_loss_joins_the_denoising_loss(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tune.personalize.attention_loss import TriggerAttentionLoss

    terms: list[float] = []
    real = TriggerAttentionLoss.__call__

    def spy(self, batch, latent_hw):  # noqa: ANN001, ANN202 - TriggerAttentionLoss.__call__'s own
        term = real(self, batch, latent_hw)
        assert term.requires_grad  # it trains the adapters, not only reports
        terms.append(float(term.detach()) / self.weight)
        return term

    monkeypatch.setattr(TriggerAttentionLoss, "__call__", spy)
    masked = {**setup, "concept": masked_concept(tmp_path)}
    extra = ("max_steps=2", "sample_every=0", "data.mask_attention_weight=0.5", "gradient_checkpointing=true")
    recipe.main(config(masked, tmp_path / "a", *extra))
    assert len(terms) == 2 and all(0.0 < t < 1.0 for t in terms)  # an MSE of maps in [0, 1]
    recipe.main(config(masked, tmp_path / "b", "max_steps=2", "sample_every=0"))
    assert len(terms) == 2  # weight 0, the default: off
    with caplog.at_level(logging.WARNING):
        recipe.main(config(setup, tmp_path / "c", *extra))  # photos without masks
    assert len(terms) == 2 and "no photo has a mask" in caplog.text


def test_caption_dropout_trains_some_samples_with_the_empty_caption(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.personalize import loading as photo_loading

    captions: list[str] = []
    real = photo_loading.encode_batch

    def spy(batch, **kwargs):  # noqa: ANN001, ANN003, ANN202 - encode_batch's own signature
        captions.extend(batch.captions)
        return real(batch, **kwargs)

    monkeypatch.setattr(photo_loading, "encode_batch", spy)
    recipe.main(config(setup, tmp_path / "a", "max_steps=8", "sample_every=0", "data.caption_dropout=0.5"))
    assert "" in captions and any("sks" in c for c in captions)  # both branches of guidance trained
    captions.clear()
    recipe.main(config(setup, tmp_path / "b", "max_steps=8", "sample_every=0"))
    assert captions and "" not in captions  # 0, the default: every sample keeps its caption
    with pytest.raises(ConfigError, match="caption_dropout"):
        config(setup, tmp_path / "c", "data.caption_dropout=1")
