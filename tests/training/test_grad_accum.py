"""Gradient accumulation is exact: batch 4 x grad_accum 1 and batch 2 x grad_accum 2 make the same update.

Each sample draws its noise and timestep from its own seed (tune.personalize.sample_generators), so how
the four photos of a step are split into micro-batches changes only the order of float additions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes import lora, textual_inversion
from tune import PROJECT_ROOT
from tune.config import load_config
from tune.diffusion import sample_noise, sample_timesteps
from tune.runs import read_metrics

PHOTOS = sorted((PROJECT_ROOT / "concepts" / "sks-toy" / "photos").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for path in PHOTOS:
        shutil.copy(path, folder / path.name)
    return folder


def per_sample_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_per_sample_noise_does_not_depend_on_the_batch_split() -> None:
    latents = torch.zeros(4, 4, 8, 8)
    seeds = [11, 12, 13, 14]
    whole = sample_noise(latents, 0.1, per_sample_generators(seeds))
    halves = [sample_noise(latents[:2], 0.1, per_sample_generators(seeds[i : i + 2])) for i in (0, 2)]
    assert torch.equal(whole, torch.cat(halves))

    class Scheduler:
        config = type("Config", (), {"num_train_timesteps": 1000})

    steps = sample_timesteps(4, Scheduler, per_sample_generators(seeds))
    assert torch.equal(
        steps,
        torch.cat([sample_timesteps(2, Scheduler, per_sample_generators(s)) for s in (seeds[:2], seeds[2:])]),
    )


def run(recipe, tiny_pipeline_dir: str, photos: Path, out: Path, batch_size: int, grad_accum: int) -> Path:
    overrides = [
        f"base_model={tiny_pipeline_dir}",
        f"instance_dir={photos}",
        "instance_prompt=a photo of sks toy",
        "token=sks",
        f"output_dir={out}",
        f"data.cache_dir={out.parent / 'cache'}",
        "max_steps=2",
        "sample_every=0",
        "checkpoint_every=0",
        f"batch_size={batch_size}",
        f"grad_accum={grad_accum}",
    ]
    if recipe is textual_inversion:
        overrides.append("initializer_token=toy")
    config_file = PROJECT_ROOT / "recipes" / "configs" / recipe.__name__.rsplit(".", 1)[-1] / "tiny.toml"
    return recipe.main(load_config(recipe.Config, config_file, overrides)).path


@pytest.mark.parametrize("recipe", [lora, textual_inversion], ids=["lora", "textual_inversion"])
def test_batch_4_equals_batch_2_times_accumulation_2(
    recipe, tiny_pipeline_dir: str, photos: Path, tmp_path: Path
) -> None:
    whole = run(recipe, tiny_pipeline_dir, photos, tmp_path / "b4", batch_size=4, grad_accum=1)
    split = run(recipe, tiny_pipeline_dir, photos, tmp_path / "b2x2", batch_size=2, grad_accum=2)
    final = "checkpoints/step_000002/trainable_0.safetensors"
    a, b = load_file(str(whole / final)), load_file(str(split / final))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    if recipe is lora:  # the up-projections start at zero: the compared update is not trivially empty
        assert max(float(t.abs().max()) for n, t in a.items() if ".lora_B." in n) > 1e-4
    losses = [[m["loss"] for m in read_metrics(r / "metrics.jsonl") if "loss" in m] for r in (whole, split)]
    assert len(losses[0]) == 2
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)
