"""The vae recipe end to end on tiny widths and 32 px world renders: run-dir contract, determinism, resume."""

from __future__ import annotations

import json
import math

import pytest
from diffusers import AutoencoderKL
from PIL import Image

import recipes.vae as vae_recipe
from tune import PROJECT_ROOT
from tune.config import load_config
from tune.errors import ConfigError, DataError
from tune.runs import read_run
from tune.world.dataset import write_imagefolder

CONFIGS = PROJECT_ROOT / "recipes" / "configs" / "vae"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_imagefolder(tmp_path_factory.mktemp("world") / "train", 32, resolution=32, seed=0))


def run_tiny(world_dir: str, out, *overrides: str):
    cfg = load_config(
        vae_recipe.Config, CONFIGS / "tiny.toml", [f"data_dir={world_dir}", f"output_dir={out}", *overrides]
    )
    return vae_recipe.main(cfg)


def losses(run_path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_run(run_path).metrics if "loss" in m}


@pytest.fixture(scope="module")
def first_run(world_dir: str, tmp_path_factory: pytest.TempPathFactory):
    return run_tiny(world_dir, tmp_path_factory.mktemp("runs") / "a")


def test_run_directory_contract(first_run) -> None:
    info = read_run(first_run.path)
    assert info.status == "done" and (first_run.path / "config.toml").is_file()
    train_rows = [m for m in info.metrics if "loss" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(m[k]) for m in train_rows for k in ("loss", "l1", "edge", "kl", "lr"))
    psnr = [m["val_psnr_db"] for m in info.metrics if "val_psnr_db" in m]
    assert len(psnr) == 2 and all(math.isfinite(p) and p > 0 for p in psnr)
    assert info.sample_steps == [2, 4]
    with Image.open(info.samples_at(4) / "recon.png") as grid:
        assert grid.size == (8 * 32, 2 * 32)  # 8 originals over their 8 reconstructions
    assert info.checkpoint_steps == [2, 4]

    vae = AutoencoderKL.from_pretrained(first_run.path / "export" / "vae")
    assert (first_run.path / "export" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert tuple(vae.config.block_out_channels) == (8, 16, 16) and vae.config.latent_channels == 4

    report = json.loads((first_run.path / "eval" / "vae.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert vae.config.scaling_factor != pytest.approx(0.18215)
    assert report["scaling_factor"] == pytest.approx(1 / report["latent_std"])
    assert report["latent_shape"] == [4, 8, 8]  # 32 px / factor 4
    for key in ("psnr_db", "train_seconds"):
        assert math.isfinite(report[key])
    assert set(report["psnr_db_by_style"]) == {"photo", "drawing", "sketch", "pixel"}
    assert report["steps"] == 4 and report["start_step"] == 0 and report["batch_size"] == 4
    assert report["eval_images"] == 16
    assert report["param_count"] == sum(p.numel() for p in vae.parameters())
    # The example subjects' photos through the VAE (what personalization on this base can learn).
    for name in ("sks-toy", "w-person"):
        assert report[f"{name}_photos"] == 10 and math.isfinite(report[f"{name}_psnr_db"])


def test_same_seed_same_losses_and_exact_resume(world_dir, first_run, tmp_path, monkeypatch) -> None:
    again = run_tiny(world_dir, tmp_path / "again")
    assert losses(again.path) == losses(first_run.path)

    class Crash(Exception):
        pass

    real_save = vae_recipe.save_checkpoint

    def save_then_crash(accelerator, run, step, keep=0):
        real_save(accelerator, run, step, keep=keep)
        run.close()  # the lock a dead process would have left behind is released by the kernel
        raise Crash

    monkeypatch.setattr(vae_recipe, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run_tiny(world_dir, tmp_path / "crashed")
    monkeypatch.setattr(vae_recipe, "save_checkpoint", real_save)
    assert read_run(tmp_path / "crashed").checkpoint_steps == [2]

    resumed = run_tiny(world_dir, tmp_path / "crashed", "resume=latest")
    assert read_run(resumed.path).status == "done"
    # Steps 3 and 4 come from the resumed process and match the uninterrupted run exactly.
    assert losses(resumed.path) == losses(first_run.path)
    report = json.loads((resumed.path / "eval" / "vae.json").read_text())
    assert (report["start_step"], report["steps"]) == (2, 4)  # its train_seconds covers steps 3-4


def test_zero_cadences_mean_never_and_only_at_the_end(world_dir, tmp_path) -> None:
    """sample_every=0 and checkpoint_every=0 mean what they mean in every recipe (TrainConfig)."""
    run = run_tiny(world_dir, tmp_path / "z", "max_steps=2", "sample_every=0", "checkpoint_every=0")
    info = read_run(run.path)
    assert info.status == "done" and info.sample_steps == [] and info.checkpoint_steps == [2]
    assert not [m for m in info.metrics if "val_psnr_db" in m]


def test_shipped_configs_load_strictly() -> None:
    for name in ("tiny", "default"):
        cfg = load_config(vae_recipe.Config, CONFIGS / f"{name}.toml")
        assert cfg.optim.schedule == "cosine"
    default = load_config(vae_recipe.Config, CONFIGS / "default.toml")
    assert default.resolution == 64 and len(default.block_out_channels) == 3  # 64 px -> 16x16 latents


def test_bad_settings_and_missing_data(tmp_path) -> None:
    with pytest.raises(ConfigError, match="norm_num_groups must divide"):
        vae_recipe.Config(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ConfigError, match="resolution must be a multiple"):
        vae_recipe.Config(resolution=50)
    with pytest.raises(ConfigError, match="max_steps must be >= 1"):
        vae_recipe.Config(max_steps=0)
    with pytest.raises(ConfigError, match="crops_per_image must be >= 1"):
        vae_recipe.Config(crops_per_image=0)
    with pytest.raises(ConfigError, match="latent_channels must be >= 1; got 0"):
        vae_recipe.Config(latent_channels=0)
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"tune data world {missing} --count 30000 --split train"):
        vae_recipe.main(vae_recipe.Config(data_dir=str(missing), output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before a run directory was made


def test_decoder_fine_tune_keeps_the_encoder_and_its_latents(world_dir, first_run, tmp_path) -> None:
    start = first_run.path / "export" / "vae"
    run = run_tiny(world_dir, tmp_path / "dec", f"init_vae={start}", "train_encoder=false", "max_steps=2")
    before = AutoencoderKL.from_pretrained(start)
    after = AutoencoderKL.from_pretrained(run.path / "export" / "vae")
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(old[k].equal(new[k]) for k in frozen)  # so the latents are the same
    assert any(not old[k].equal(new[k]) for k in old if k.startswith("decoder."))
    assert after.config.scaling_factor == before.config.scaling_factor  # the U-Net's latent scale
    report = json.loads((run.path / "eval" / "vae.json").read_text())
    assert report["train_encoder"] is False and report["init_vae"] == str(start)


def test_decoder_fine_tune_needs_a_vae_to_start_from(world_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="train_encoder=false fine-tunes a decoder: it needs init_vae"):
        vae_recipe.Config(train_encoder=False)
    with pytest.raises(ConfigError, match="is not a diffusers AutoencoderKL folder"):
        run_tiny(world_dir, tmp_path / "x", f"init_vae={tmp_path}", "train_encoder=false")
    assert not (tmp_path / "x").exists()


def test_several_crops_per_loaded_image(world_dir, tmp_path, monkeypatch) -> None:
    seen, crop = [], vae_recipe.random_crops

    def spy(pixels, size, generator):
        out = crop(pixels, size, generator)
        seen.append((pixels.shape[0], tuple(out.shape)))
        return out

    monkeypatch.setattr(vae_recipe, "random_crops", spy)
    run_tiny(world_dir, tmp_path / "run", "max_steps=2", "batch_size=2", "train_crop=16", "crops_per_image=3")
    assert seen == [(6, (6, 3, 16, 16))] * 2  # two images, three crops of each, every step


def test_color_augment_recolours_the_chosen_share_only():
    import torch

    from recipes.vae import augment_colors

    pixels = torch.rand(64, 3, 16, 16) * 2 - 1
    same = augment_colors(pixels, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, pixels)
    out = augment_colors(pixels, 0.5, torch.Generator().manual_seed(0))
    changed = (out != pixels).flatten(1).any(dim=1)
    assert 16 < int(changed.sum()) < 48 and out.min() >= -1 and out.max() <= 1
    again = augment_colors(pixels, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_nonfinite_loss_skips_the_step_and_keeps_the_weights(world_dir, tmp_path, monkeypatch) -> None:
    import torch
    from safetensors.torch import load_file

    calls = []
    real = vae_recipe.edge_l1

    def edge_nan_at_step_2(recon, target):  # its weight is 0, but 0 * NaN is NaN: the loss is NaN
        calls.append(1)
        out = real(recon, target)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(vae_recipe, "edge_l1", edge_nan_at_step_2)
    run = run_tiny(world_dir, tmp_path / "nan")
    rows = [m for m in read_run(run.path).metrics if m["step"] == 2 and "val_psnr_db" not in m]
    assert rows and "skipped" in rows[0] and "loss" not in rows[0]
    weights = load_file(str(run.path / "export" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_schedule_free_exports_its_averaged_weights(world_dir, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    run = run_tiny(world_dir, tmp_path / "sf", "optim.name=adamw_schedulefree", "optim.schedule=constant")
    # The last checkpoint holds the optimizer's averaged weights (its RoundTrip wrapper adds "vae.").
    saved = load_file(str(run.path / "checkpoints" / "step_000004" / "model.safetensors"))
    exported = load_file(str(run.path / "export" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {f"vae.{k}" for k in exported} == set(saved)
    for k, v in exported.items():
        torch.testing.assert_close(v, saved[f"vae.{k}"].to(v.dtype))
