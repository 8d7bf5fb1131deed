"""Shared test setup: offline, quiet, CPU-sized, and one tiny SD pipeline saved per test run.

Fixture names here are used across the suite (recipes, sampler, LoRA); keep them stable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_CACHE_DIR: str | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    global _CACHE_DIR
    # Set before any test module imports huggingface_hub, which reads these once at import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["DIFFUSERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # Pipelines draw tqdm bars per call; they only clutter test output.
    os.environ["TQDM_DISABLE"] = "1"
    # Tests must never read or write the user's real cache.
    _CACHE_DIR = tempfile.mkdtemp(prefix="tune-test-cache-")
    os.environ["TUNE_CACHE_DIR"] = _CACHE_DIR

    import torch

    # Tiny models are dominated by per-op overhead: one thread is as fast on an idle machine and many
    # times faster when the two cores are shared. Random tiny weights produce denormal floats, which
    # are slow on CPUs; flushing them does not change what the tests assert.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow; pass --runslow to run")
    runslow = config.getoption("--runslow")
    gpu_items = [item for item in items if "gpu" in item.keywords]
    has_cuda = False
    if gpu_items:
        import torch

        has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not runslow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A diffusers folder (model_index.json, unet/, vae/, ...) of `build_pipeline("tiny", seed=0)`.

    Built and saved once per test run; treat it as read-only (copy it before modifying).
    """
    from tune.models import build_pipeline

    path: Path = tmp_path_factory.mktemp("tiny-pipeline")
    build_pipeline("tiny", seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir: str):  # noqa: ANN201 - a StableDiffusionPipeline (diffusers loads lazily)
    """The tiny pipeline loaded once per test module, progress bars off. Tests that change it (attention
    processors, adapters) must put it back as they found it."""
    from tune.models import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe
