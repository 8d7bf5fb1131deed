"""Multi-process training: a 2-process CPU (gloo) lora run under torchrun, then resumed with 1 process;
the vae, clip and unet recipes under torchrun.

    torchrun --standalone --nproc_per_node 2 $(which tune) run lora ...

Checks that the processes share one run directory written by the main process only, that the data is
sharded and the gradients synchronised (2 processes x batch 2 train the same adapter as 1 process x
batch 4: each process takes its half of the batches one process would draw, and every sample draws its
own noise, so only the order of float additions differs), and that the checkpoint resumes with another
process count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes import lora
from tune import PROJECT_ROOT
from tune.config import load_config
from tune.runs import read_run
from tune.world.dataset import write_imagefolder

TINY = PROJECT_ROOT / "recipes" / "configs" / "lora" / "tiny.toml"
PHOTOS = sorted((PROJECT_ROOT / "concepts" / "sks-toy" / "photos").glob("*.jpg"))[:4]
FINAL = "checkpoints/step_000004/trainable_0.safetensors"


def overrides(base: str, photos: Path, out: Path, cache: Path) -> list[str]:
    return [
        f"base_model={base}",
        f"instance_dir={photos}",
        "instance_prompt=a photo of sks toy",
        "class_prompt=a photo of toy",
        "token=sks",
        f"output_dir={out}",
        f"data.cache_dir={cache}",
        "optim.warmup_steps=4",  # a schedule stepped once per process would show in the weights
    ]


def tune_command() -> list[str]:
    script = Path(sys.executable).parent / "tune"  # what `$(which tune)` names in the venv
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tune.cli"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    photos = root / "photos"
    photos.mkdir()
    for path in PHOTOS:
        shutil.copy(path, photos / path.name)
    runs = root / "runs"
    out = runs / "two"
    command = [
        *[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        *tune_command(),
        *["run", "lora", "--config", str(TINY), *overrides(tiny_pipeline_dir, photos, out, root / "cache")],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {"root": root, "photos": photos, "runs": runs, "run": out}


@pytest.mark.slow  # shares the 2-process torchrun run (~25 s, once per module)
def test_two_processes_write_one_run_directory(two_process_run: dict[str, Path]) -> None:
    out = two_process_run["run"]
    assert [p.name for p in two_process_run["runs"].iterdir()] == ["two"]
    run = read_run(out)
    assert run.status == "done" and (out / "DONE").is_file()
    assert [m["step"] for m in run.metrics if "loss" in m] == [
        1,
        2,
        3,
        4,
    ]  # one row per step, not per process
    assert run.checkpoint_steps == [2, 4] and run.sample_steps == [0, 2, 4]
    export = {p.name for p in (out / "export").iterdir()}
    assert export == {"pytorch_lora_weights.safetensors", "two.safetensors"}
    # Both processes saved their RNG state; the data position is saved once, with the process count.
    checkpoint = out / "checkpoints" / "step_000004"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    position = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert position == {"epoch": 3, "position": 1, "seed": 0, "num_processes": 2, "batch_size": 2}


@pytest.mark.slow  # shares the 2-process torchrun run (~25 s, once per module)
def test_two_processes_train_what_one_process_with_their_batch_trains(
    two_process_run: dict[str, Path], tiny_pipeline_dir: str
) -> None:
    root = two_process_run["root"]
    args = overrides(tiny_pipeline_dir, two_process_run["photos"], root / "one", root / "cache")
    single = lora.main(load_config(lora.Config, TINY, [*args, "batch_size=4", "sample_every=0"])).path
    two_losses, one_losses = (
        [m["loss"] for m in read_run(r).metrics if "loss" in m] for r in (two_process_run["run"], single)
    )
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6)
    two, one = load_file(str(two_process_run["run"] / FINAL)), load_file(str(single / FINAL))
    assert two.keys() == one.keys()
    for name in two:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # shares the 2-process torchrun run (~25 s, once per module)
def test_resume_with_one_process(two_process_run: dict[str, Path], tiny_pipeline_dir: str) -> None:
    root = two_process_run["root"]
    out = root / "resumed"
    shutil.copytree(two_process_run["run"], out)
    args = overrides(tiny_pipeline_dir, two_process_run["photos"], out, root / "cache")
    resumed = lora.main(load_config(lora.Config, TINY, [*args, "resume=latest", "max_steps=6"])).path
    run = read_run(resumed)
    assert run.status == "done" and run.checkpoint_steps == [4, 6]
    assert [m["step"] for m in run.metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    # 4 photos: each 2-process step was one epoch; the single process continues with epoch 4.
    position = torch.load(out / "checkpoints" / "step_000006" / "custom_checkpoint_0.pkl", weights_only=False)
    assert position == {"epoch": 4, "position": 2, "seed": 0}


@pytest.mark.slow  # torchrun processes: ~25 s for the 2-process run, ~60 s for the base recipes
def test_base_model_recipes_train_under_torchrun(tmp_path: Path) -> None:
    """vae, clip and unet (each recipe's tiny config, the unet on the other two's exports) with 2 processes:
    each gets its share of the batches, its gradients synchronised through the wrapped module's forward,
    and only the main process writes (one metrics row per step, one export)."""
    small = write_imagefolder(tmp_path / "world32", 32, resolution=32, seed=0)
    large = write_imagefolder(tmp_path / "world64", 32, split="train", seed=0)  # clip's 64 px
    runs = {
        "vae": [f"data_dir={small}"],
        "clip": [f"data_dir={large}"],
        "unet": [
            f"data_dir={small}",
            f"vae={tmp_path / 'vae' / 'export' / 'vae'}",
            f"clip={tmp_path / 'clip' / 'export' / 'clip'}",
        ],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for recipe, args in runs.items():
        out = tmp_path / recipe
        command = [
            *[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
            *tune_command(),
            *["run", recipe, "--config", "tiny", f"output_dir={out}", *args],
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, recipe + done.stdout[-2000:] + done.stderr[-4000:]
        run = read_run(out)
        assert run.status == "done" and [m["step"] for m in run.metrics if "loss" in m] == [1, 2, 3, 4]
        checkpoint = out / "checkpoints" / "step_000004"
        assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }
        position = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
        assert position["num_processes"] == 2
        assert [p.name for p in (out / "export").iterdir()] == [{"unet": "pipeline"}.get(recipe, recipe)]


@pytest.mark.parametrize("name", ["multi_gpu", "fsdp", "deepspeed_zero2"])
def test_shipped_accelerate_configs_load(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(
        str(PROJECT_ROOT / "recipes" / "configs" / "accelerate" / f"{name}.yaml")
    )
    assert config.num_processes == 2 and config.mixed_precision == "bf16"
    assert str(config.distributed_type).rsplit(".", 1)[-1] == {"multi_gpu": "MULTI_GPU", "fsdp": "FSDP"}.get(
        name, "DEEPSPEED"
    )
