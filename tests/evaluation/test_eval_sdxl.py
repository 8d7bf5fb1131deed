"""tune eval on a run whose base model is SDXL (tiny-sdxl-shallow, 64 px): the base and each checkpoint's
LoRA (U-Net and both text encoders) are drawn through StableDiffusionXLPipeline and scored.

The first test writes the run directory as the lora recipe leaves it (run.json, complete checkpoints
holding lora.safetensors, DONE); the second runs the lora recipe itself on SDXL with eval_every, as
test_eval.py does on SD1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image

from recipes import lora as lora_recipe
from tune import PROJECT_ROOT
from tune import lora as lora_io
from tune.cli import main as cli_main
from tune.config import load_config
from tune.lora.core import Lora
from tune.models import build_pipeline, load_pipeline
from tune.runs import RunDir
from tune.sampling import generate

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))  # the recipe tests' testkit
from test_eval import SUITE_DIR, TINY_SUITE, check_report  # noqa: E402
from test_metrics import save_tiny_clip  # noqa: E402

from recipe_testkit import make_concept  # noqa: E402

SUITE = """
prompts = ["a photo of {token} {class} on a red background", "a photo of {class}"]
seeds = [0, 1]
steps = 3
guidance = 6.0
"""
STEPS = (2, 4)


def save_random_lora(base: Path, seed: int, path: Path) -> None:
    """A random (non-zero) LoRA on the U-Net's attention and both text encoders, as a diffusers file."""
    pipe = load_pipeline(base)
    modules: dict = {}
    for component, targets in (
        ("unet", ["to_k", "to_v"]),
        ("text_encoder", ["q_proj"]),
        ("text_encoder_2", ["q_proj", "v_proj"]),
    ):
        model = getattr(pipe, component)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.3)
        lora = lora_io.lora_from_peft(None, model)
        modules |= {f"{component}.{k.removeprefix('text_encoder.')}": v for k, v in lora.modules.items()}
    lora_io.save_lora(Lora(modules, frozenset({"peft"})), path, "diffusers", dtype=torch.float32)


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-sdxl")
    base = root / "base"
    build_pipeline("tiny-sdxl-shallow", seed=0).save_pretrained(base)
    concept = make_concept(root / "concept")
    run = RunDir.create(root / "runs" / "lora", "lora", f'base_model = "{base}"\n')
    run.update_info(
        base_model=str(base), trigger="sks", class_word="toy", instance_dir=str(concept / "photos")
    )
    for step in STEPS:
        run.checkpoint_dir(step).mkdir(parents=True)
        save_random_lora(base, step, run.checkpoint_dir(step) / lora_io.CHECKPOINT_ADAPTER)
        run.mark_checkpoint_complete(step)
    run.finish()
    (root / "suite.toml").write_text(SUITE)
    return {
        "run": run.path,
        "base": base,
        "suite": root / "suite.toml",
        "clip": save_tiny_clip(root / "clip"),
    }


def test_tune_eval_scores_an_sdxl_run(sdxl_run: dict[str, Path]) -> None:
    run = sdxl_run["run"]
    args = ["eval", str(run), "--suite", str(sdxl_run["suite"]), "--clip", str(sdxl_run["clip"])]
    assert cli_main([*args, "--device", "cpu"]) == 0
    report = json.loads((run / SUITE_DIR / "report.json").read_text())
    entries = [report["base"], *report["checkpoints"]]
    assert [e["step"] for e in entries] == [0, *STEPS]
    for entry in entries:
        assert -1 <= entry["subject_fidelity"] <= 1 and -1 <= entry["prompt_fidelity"] <= 1
        assert 0 <= entry["diversity"] <= 2
    drawn = {e["label"]: Image.open(run / e["images"] / "p00_s0.png").convert("RGB") for e in entries}
    assert {image.size for image in drawn.values()} == {(64, 64)}  # SDXL's native size on this preset

    # Each checkpoint's image is the one its LoRA draws when merged by hand into a fresh base.
    prompt = "a photo of sks toy on a red background"
    for step in STEPS:
        pipe = load_pipeline(sdxl_run["base"])
        lora_io.apply_loras(pipe, [(run / "checkpoints" / f"step_{step:06d}" / "lora.safetensors", 1.0)])
        [expected] = generate(pipe, prompt, 0, steps=3, guidance=6.0, progress=False)
        got = np.asarray(drawn[f"step_{step:06d}"], dtype=np.float64)
        assert np.abs(got - np.asarray(expected.image, dtype=np.float64)).mean() < 1.0
        assert np.abs(got - np.asarray(drawn["base"], dtype=np.float64)).mean() > 1.0


def test_lora_recipe_on_sdxl_is_evaluated_in_training_and_after(
    sdxl_run: dict[str, Path], tmp_path: Path
) -> None:
    """The lora recipe on the SDXL base with eval_every: the report written during training, and
    `tune eval` afterwards scoring the same numbers (needs the lora recipe on SDXL)."""
    (tmp_path / "suite.toml").write_text(TINY_SUITE)
    overrides = [
        f"base_model={sdxl_run['base']}",
        f"concept={make_concept(tmp_path / 'concept')}",
        f"output_dir={tmp_path / 'lora'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "resolution=64",
        "eval_every=2",
        f"eval_suite={tmp_path / 'suite.toml'}",
        f"eval_clip={sdxl_run['clip']}",
        "sample_every=0",
    ]
    cfg = load_config(lora_recipe.Config, PROJECT_ROOT / "recipes/configs/lora/tiny.toml", overrides)
    run = lora_recipe.main(cfg).path
    during = json.loads((run / SUITE_DIR / "report.json").read_text())
    check_report(during, run, [2, 4])
    args = ["eval", str(run), "--suite", str(tmp_path / "suite.toml"), "--clip", str(sdxl_run["clip"])]
    assert cli_main([*args, "--device", "cpu"]) == 0
    after = json.loads((run / SUITE_DIR / "report.json").read_text())
    check_report(after, run, [2, 4])
    for key in ("subject_fidelity", "prompt_fidelity", "diversity"):
        # During training the base is drawn through zero-initialised adapters on all three models, whose
        # extra (zero) terms can move the last bits (1.4e-5 seen); a real change is far larger.
        assert after["base"][key] == pytest.approx(during["base"][key], abs=1e-4)
        for a, b in zip(after["checkpoints"], during["checkpoints"], strict=True):
            assert a[key] == pytest.approx(b[key], abs=1e-3)
