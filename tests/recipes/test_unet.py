"""The unet recipe end to end on tiny stand-ins: run-dir contract, determinism, resume, export, configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from recipes import unet as recipe
from tune import PROJECT_ROOT
from tune.config import load_config
from tune.errors import ConfigError, DataError, ModelError
from tune.models.scratch import clip_paths
from tune.runs import read_run
from tune.world.dataset import write_imagefolder

from recipe_testkit import crash_then_resume, losses

CONFIGS = PROJECT_ROOT / "recipes" / "configs" / "unet"
TINY_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, str]:
    """Stand-ins in the layouts the data, vae and clip recipes write (32 px, VAE factor 4)."""
    root = tmp_path_factory.mktemp("unet-inputs")
    data = write_imagefolder(root / "world", count=12, split="train", resolution=32, seed=0)
    tiny = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    tiny.vae.save_pretrained(root / "vae")
    # The clip recipe's export: a whole CLIPModel, its text tower in text_encoder/, and tokenizer/.
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=tiny.text_encoder.config.to_dict(), vision_config=TINY_VISION))
    clip.save_pretrained(root / "clip")
    clip.text_model.save_pretrained(root / "clip" / "text_encoder")
    tiny.tokenizer.save_pretrained(root / "clip" / "tokenizer")
    return {"data_dir": str(data), "vae": str(root / "vae"), "clip": str(root / "clip")}


def tiny_config(inputs: dict[str, str], out: Path, *extra: str) -> recipe.Config:
    overrides = [f"{k}={v}" for k, v in inputs.items()] + [f"output_dir={out}", *extra]
    return load_config(recipe.Config, CONFIGS / "tiny.toml", overrides)


@pytest.fixture(scope="module")
def first_run(inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recipe.main(tiny_config(inputs, tmp_path_factory.mktemp("runs") / "a")).path


def test_run_directory_contract(first_run: Path) -> None:
    info = read_run(first_run)
    assert info.status == "done" and (first_run / "config.toml").is_file()
    assert sorted(losses(first_run)) == [1, 2, 3, 4]
    numbers = [v for m in info.metrics for k, v in m.items() if k not in ("step", "time")]
    assert numbers and all(math.isfinite(v) for v in numbers)
    val = [m for m in info.metrics if "val_cls" in m]
    assert [m["step"] for m in val] == [2, 4]
    assert {"val_cls", "val_background", "val_style", "val_size", "val_all"} <= set(val[0])
    assert info.sample_steps == [2, 4]
    assert (info.samples_at(4) / "grid.png").is_file() and (info.samples_at(4) / "p01_s0.png").is_file()
    assert info.checkpoint_steps == [2, 4]
    assert all((first_run / "checkpoints" / f"step_{s:06d}" / "COMPLETE").is_file() for s in (2, 4))
    report = json.loads((first_run / "eval" / "unet.json").read_text())
    for split in ("seen", "heldout"):  # judged by the world judge, per style and overall
        overall = report[split]["overall"]
        assert {"cls", "background", "style", "all"} <= set(overall)
        assert all(0 <= v <= 1 for v in overall.values())
    assert set(report["odd_prompts"]) == {"toy", "unknown_word"}
    assert (first_run / "eval" / "unet.md").is_file()
    assert report["train_time_s"] > 0 and (first_run / "eval" / "unet_grid.png").is_file()


def test_export_loads_in_plain_diffusers(first_run: Path) -> None:
    path = first_run / "export" / "pipeline"
    index = json.loads((path / "model_index.json").read_text())
    # Only diffusers/transformers classes (or nothing): loadable without tune installed.
    libraries = {v[0] for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    assert libraries <= {"diffusers", "transformers", None}
    assert index["safety_checker"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.cross_attention_dim == 32
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a large red ball on a blue background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 0


def test_exported_unet_holds_the_ema_weights(first_run: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    exported = UNet2DConditionModel.from_pretrained(first_run / "export" / "pipeline" / "unet")
    ckpt = first_run / "checkpoints" / "step_000004"
    trained = load_file(str(next(ckpt.glob("model*.safetensors"))))
    ema = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=False)["shadow_params"]
    names = [n for n, _ in exported.named_parameters()]
    exported_params = dict(exported.named_parameters())
    assert all(torch.equal(exported_params[n], e) for n, e in zip(names, ema, strict=True))
    # ...and not the raw weights (the EMA lags behind them).
    assert any(not torch.equal(exported_params[n], trained[n]) for n in names)


def test_same_seed_same_numbers(first_run: Path, inputs: dict[str, str], tmp_path: Path) -> None:
    again = recipe.main(tiny_config(inputs, tmp_path / "b"))
    assert losses(again.path) == losses(first_run)
    other = recipe.main(tiny_config(inputs, tmp_path / "c", "seed=1", "eval_prompts=0"))
    assert losses(other.path) != losses(first_run)


def test_resume_latest_continues_exactly(
    first_run: Path, inputs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left, resumed = crash_then_resume(
        recipe, monkeypatch, lambda out, *extra: tiny_config(inputs, out, *extra), tmp_path / "r"
    )
    assert left == [2]
    assert read_run(resumed.path).status == "done"
    whole, parts = losses(first_run), losses(resumed.path)
    assert parts == whole  # steps 1-2 from the first attempt, 3-4 after the resume
    assert (resumed.path / "export" / "pipeline" / "model_index.json").is_file()


def test_shipped_configs_load_strictly() -> None:
    for name in ("tiny", "default"):
        cfg = load_config(recipe.Config, CONFIGS / f"{name}.toml")
        assert cfg.max_steps > 0
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_config(recipe.Config, CONFIGS / "tiny.toml", ["max_step=3"])
    with pytest.raises(ConfigError, match="unet_block_out_channels"):
        recipe.Config(unet_block_out_channels=(30, 60, 120, 120))
    with pytest.raises(ConfigError, match="v_prediction"):
        load_config(recipe.Config, None, ["diffusion.prediction_type=epsilon"])


def test_missing_inputs_say_what_to_do_and_leave_no_run(inputs: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tune data world .*nowhere --count \d+ --split train"):
        recipe.main(tiny_config({**inputs, "data_dir": str(tmp_path / "nowhere")}, tmp_path / "d"))
    with pytest.raises(ModelError, match="tune run vae"):
        recipe.main(tiny_config({**inputs, "vae": str(tmp_path / "novae")}, tmp_path / "v"))
    with pytest.raises(ModelError, match="tune run clip"):
        recipe.main(tiny_config({**inputs, "clip": str(tmp_path / "noclip")}, tmp_path / "t"))
    assert not any((tmp_path / name).exists() for name in "dvt")


def test_text_tower_loads_from_a_bare_clipmodel_folder(inputs: dict[str, str], tmp_path: Path) -> None:
    """Without text_encoder/, the text tower is read out of the CLIPModel folder itself, weights intact."""
    torch.manual_seed(1)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=1280,
            ),
            vision_config=TINY_VISION,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    text_dir, tokenizer_dir = clip_paths(str(tmp_path / "clip"))
    assert text_dir == tokenizer_dir == tmp_path / "clip"
    loaded = CLIPTextModel.from_pretrained(text_dir)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.parameters(), clip.text_model.parameters(), strict=True)
    )
    assert clip_paths(inputs["clip"]) == (
        Path(inputs["clip"]) / "text_encoder",
        Path(inputs["clip"]) / "tokenizer",
    )


def test_schedule_free_without_ema_resumes_exactly_and_exports_its_average(
    inputs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from recipe_testkit import check_exact_resume

    extra = ("optim.name=adamw_schedulefree", "optim.schedule=constant", "ema=false", "eval_prompts=0")
    make = lambda out, *more: tiny_config(inputs, out, *more)  # noqa: E731
    whole, _ = check_exact_resume(recipe, monkeypatch, make, tmp_path, *extra)
    # The checkpoint holds the optimizer's averaged weights; the export is those, not the training point.
    saved = load_file(str(whole.path / "checkpoints" / "step_000004" / "model.safetensors"))
    exported = load_file(
        str(whole.path / "export" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    )
    assert saved.keys() == exported.keys()
    for k in saved:
        torch.testing.assert_close(exported[k], saved[k].to(exported[k].dtype))


def test_init_unet_starts_from_a_unet_and_new_attention_starts_as_identity(
    first_run: Path, inputs: dict[str, str], tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel

    from tune.models.scratch import init_unet_from

    folder = first_run / "export" / "pipeline" / "unet"
    trained = UNet2DConditionModel.from_pretrained(folder).eval()
    wider = dict(trained.config)
    assert wider["down_block_types"][3] == "DownBlock2D"
    wider["down_block_types"] = ["CrossAttnDownBlock2D"] * 4  # attention on the innermost level too
    wider["up_block_types"] = ["CrossAttnUpBlock2D"] * 4
    grown = UNet2DConditionModel.from_config(wider).eval()
    new = init_unet_from(grown, folder)
    assert new and all(k.startswith(("down_blocks.3.attentions", "up_blocks.0.attentions")) for k in new)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    text = torch.randn(2, 77, trained.config.cross_attention_dim)
    with torch.no_grad():
        # The identity up to rounding: on some CPUs (an AMD EPYC here) the two graphs take different kernels
        # and differ in the last bit (1e-7); a new attention whose proj_out is not zero but N(0, 0.02) moves
        # the shipped base U-Net's output by 0.87.
        torch.testing.assert_close(grown(x, t, text).sample, trained(x, t, text).sample, rtol=1e-5, atol=1e-5)

    # The recipe: a run from the export trains on from it; a folder without weights is refused up front.
    run = recipe.main(tiny_config(inputs, tmp_path / "on", f"init_unet={folder}", "max_steps=2")).path
    assert read_run(run).status == "done"
    with pytest.raises(ModelError, match="init_unet: no diffusion_pytorch_model"):
        recipe.main(tiny_config(inputs, tmp_path / "bad", f"init_unet={tmp_path}"))
    assert not (tmp_path / "bad").exists()
    narrow = dict(trained.config, block_out_channels=[16, 16, 32, 32])
    with pytest.raises(ModelError, match="do not fit this U-Net"):
        init_unet_from(UNet2DConditionModel.from_config(narrow), folder)


def test_attention_weight_adds_the_world_attention_loss_and_needs_masks(
    inputs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.attention_loss import WordAttentionLoss

    with pytest.raises(DataError, match="has no masks; write the data with `tune data world DIR --masks`"):
        recipe.main(tiny_config(inputs, tmp_path / "nomasks", "attention_weight=1.0"))
    assert not (tmp_path / "nomasks").exists()

    masked = write_imagefolder(tmp_path / "world", count=12, split="train", resolution=32, seed=0, masks=True)
    calls: list[float] = []
    real = WordAttentionLoss.__call__

    def spy(self, batch, latent_hw):  # noqa: ANN001, ANN202 - WordAttentionLoss.__call__'s own
        loss = real(self, batch, latent_hw)
        calls.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(WordAttentionLoss, "__call__", spy)
    plain = recipe.main(tiny_config({**inputs, "data_dir": str(masked)}, tmp_path / "plain")).path
    assert calls == []  # off by default, even with masks
    run = recipe.main(
        tiny_config({**inputs, "data_dir": str(masked)}, tmp_path / "att", "attention_weight=1.0")
    ).path
    assert len(calls) == 4 and all(0 < c < 1 for c in calls)  # every step: each batch names an object
    with_loss, without = losses(run), losses(plain)
    assert all(with_loss[s] > without[s] for s in (1, 2, 3, 4))  # the same draws, plus the maps' term
    pipe = StableDiffusionPipeline.from_pretrained(run / "export" / "pipeline")
    assert all(type(p).__name__ != "RecordingProcessor" for p in pipe.unet.attn_processors.values())
    with pytest.raises(ConfigError, match="attention_weight must be >= 0"):
        tiny_config(inputs, tmp_path / "neg", "attention_weight=-1")
