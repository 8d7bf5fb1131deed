"""scripts/score_vae.py: a finished vae run scored again on the current renderer and judge."""

import json
import sys
from pathlib import Path

import pytest
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import score_vae  # noqa: E402


def test_a_run_is_scored_again_and_keeps_its_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    vae = AutoencoderKL(
        block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, sample_size=64, norm_num_groups=32,
    )  # fmt: skip
    vae.save_pretrained(run / "export" / "vae")
    (run / "eval").mkdir()
    old = {"eval_images": 8, "eval_seed": 3, "psnr_db": 99.0, "steps": 123, "latent_std": 0.5}
    (run / "eval" / "vae.json").write_text(json.dumps(old))

    assert score_vae.main([str(run)]) == 0

    report = json.loads((run / "eval" / "vae.json").read_text())
    assert report["steps"] == 123 and report["latent_std"] == 0.5  # the training record stays
    assert report["previous"] == {"psnr_db": 99.0}
    assert 0 < report["psnr_db"] < 99.0  # an untrained VAE: measured, not copied
    assert set(report["psnr_db_by_style"]) == {"photo", "drawing", "sketch", "pixel"}
    assert report["rescored"]


def test_a_folder_that_is_not_a_vae_run_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        score_vae.main([str(tmp_path)])
    assert exit_info.value.code == 2
