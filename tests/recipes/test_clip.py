"""The clip recipe end to end on tiny towers: run-dir contract, exports, determinism, exact resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from recipes.clip import Config, contrastive_loss, main
from tune.config import load_config
from tune.errors import ConfigError, DataError
from tune.runs import read_metrics, read_run
from tune.world.dataset import write_imagefolder

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "clip"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("world") / "train", 32, split="train", seed=0)


def train(world_dir: Path, out: Path, *overrides: str):
    cfg = load_config(
        Config, CONFIGS / "tiny.toml", [f"data_dir={world_dir}", f"output_dir={out}", *overrides]
    )
    return main(cfg)


def losses(run_path: Path) -> dict[int, float]:
    # A resumed run appends the steps it repeats; the last row of a step wins.
    return {m["step"]: m["loss"] for m in read_metrics(run_path / "metrics.jsonl") if "loss" in m}


@pytest.fixture(scope="module")
def first_run(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(world_dir, tmp_path_factory.mktemp("runs") / "a").path


def test_run_dir_contract(first_run: Path) -> None:
    info = read_run(first_run)
    assert info.status == "done" and (first_run / "config.toml").is_file()
    assert info.checkpoint_steps == [2, 4]
    assert all((first_run / "checkpoints" / f"step_00000{s}" / "COMPLETE").is_file() for s in (2, 4))
    rows = read_metrics(first_run / "metrics.jsonl")
    train_rows = [m for m in rows if "loss" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(m[k]) for m in train_rows for k in ("loss", "loss_clip", "loss_attr", "lr"))
    assert [m["step"] for m in rows if "val_t2i_top1" in m] == [2, 4]
    report = json.loads((first_run / "eval" / "clip.json").read_text())
    for split in ("heldout", "train"):
        assert 0 <= report[split]["t2i_top1"] <= 1 and 0 <= report[split]["i2t_top1"] <= 1


def test_exports_load_and_agree(first_run: Path) -> None:
    clip_dir = first_run / "export" / "clip"
    clip = CLIPModel.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    assert CLIPTokenizer.from_pretrained(clip_dir).get_vocab() == tokenizer.get_vocab()
    ids = tokenizer(
        ["a photo of a small red ball on a blue background in the top left"],
        padding="max_length",
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (1, 77)  # SD's prompt length: the U-Net sees 77 token states
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
        assert hidden.shape == (1, 77, 32)
        assert torch.equal(hidden, clip.text_model(ids).last_hidden_state)
    # The world's words are whole tokens: the tokenizer was trained on the captions.
    assert len(tokenizer.tokenize("a photo of")) == 3


def test_same_seed_same_losses_and_exact_resume(world_dir: Path, first_run: Path, tmp_path: Path) -> None:
    second = train(world_dir, tmp_path / "b").path
    assert losses(second) == losses(first_run)  # bit-identical: same seed, same numbers

    # "Crash" after step 2: drop the newer checkpoint, then continue from the latest one.
    shutil.rmtree(second / "checkpoints" / "step_000004")
    (second / "DONE").unlink()
    train(world_dir, tmp_path / "b", "resume=latest")
    steps = [m["step"] for m in read_metrics(second / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4, 3, 4]  # resumed at step 3, not from scratch
    assert losses(second) == losses(first_run)
    assert read_run(second).status == "done"


def test_missing_data_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tune data world .* --count 30000 --split train"):
        main(Config(data_dir=str(tmp_path / "nope"), output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_contrastive_loss_masks_same_spec_pairs() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0], [4.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    masked = contrastive_loss(logits, same)
    assert masked < contrastive_loss(logits, torch.eye(3, dtype=torch.bool))
    # Texts 0 and 1 describe the same spec: each competes with pair 2 only; pair 2 with both.
    two, three = math.log1p(math.exp(-5)), math.log1p(2 * math.exp(-5))
    expected = torch.tensor((2 * two + three) / 3)
    assert torch.allclose(masked, expected)


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_shipped_configs_load_strictly(name: str) -> None:
    cfg = load_config(Config, CONFIGS / f"{name}.toml")
    assert cfg.max_steps > 0 and cfg.optim.lr > 0


def test_bad_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        load_config(Config, None, ["batch_size=1"])
    with pytest.raises(ConfigError, match="resolution must be a multiple of patch_size"):
        load_config(Config, None, ["patch_size=12"])
    with pytest.raises(ConfigError, match="unknown key 'optim.warmup' .*did you mean 'optim.warmup_steps'"):
        load_config(Config, None, ["optim.warmup=10"])


def test_schedule_free_exports_its_averaged_weights(world_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run = train(world_dir, tmp_path / "sf", "optim.name=adamw_schedulefree", "checkpoints_keep=1")
    # The last checkpoint holds the optimizer's averaged weights (the CLIPModel under "model.", beside the
    # attribute heads, which are not exported); the export is those.
    saved = load_file(str(run.path / "checkpoints" / "step_000004" / "model.safetensors"))
    exported = load_file(str(run.path / "export" / "clip" / "model.safetensors"))
    model = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert set(model) == set(exported)
    for k, v in model.items():
        torch.testing.assert_close(exported[k], v.to(exported[k].dtype))
