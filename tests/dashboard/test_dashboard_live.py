"""Live generation (dashboard/live.py and the Compare page's button) on the tiny pipeline with a LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dashboard_testkit import write_sample_set
from peft import LoraConfig
from streamlit.testing.v1 import AppTest

from tune import PROJECT_ROOT
from tune import lora as lora_io
from tune.errors import ConfigError
from tune.models import load_pipeline

PROMPT = "a photo of sks toy on a red background"


def make_live_run(run: Path, base: str, scheduler: str) -> None:
    """A LoRA run directory over `base`: a random (non-zero) attn2 adapter, step-0 samples whose index asks
    for 2 denoising steps with `scheduler` (the live images use the step-0 settings)."""
    (run / "export").mkdir(parents=True)
    info = {"recipe": "lora", "started_at": "2026-01-02T10:00:00+00:00", "base_model": base}
    (run / "run.json").write_text(json.dumps(info))
    (run / "config.toml").write_text(f'base_model = "{base}"\n')
    write_sample_set(run / "samples" / "step_000000", [PROMPT], [0], 60, trajectory=False)
    index = json.loads((run / "samples" / "step_000000" / "prompts.json").read_text())
    index.update(steps=2, scheduler=scheduler, width=None, height=None)
    (run / "samples" / "step_000000" / "prompts.json").write_text(json.dumps(index))
    pipe = load_pipeline(base)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn2.to_k", "attn2.to_v"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    lora_io.save_adapter(pipe.unet, None, lora_io.final_adapter_path(run))


@pytest.fixture(scope="module")
def live_runs(tiny_pipeline_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run over the tiny pipeline: a random (non-zero) attn2 adapter, step-0 samples drawn with
    2 denoising steps (the live images use the step-0 settings)."""
    root = tmp_path_factory.mktemp("live") / "runs"
    make_live_run(root / "lora-live", tiny_pipeline_dir, "ddim")
    return root


def test_live_model_scales_the_lora_and_draws_film_strips(live_runs: Path):
    from dashboard.live import LiveModel

    model = LiveModel(live_runs / "lora-live")
    base = np.asarray(model.generate(PROMPT, 0, tuned=False).image)
    at_zero = np.asarray(model.generate(PROMPT, 0, tuned=True, scale=0.0).image)
    tuned = np.asarray(model.generate(PROMPT, 0, tuned=True, scale=1.0).image)
    assert np.array_equal(base, at_zero)  # scale 0 is the base model, bit for bit
    assert not np.array_equal(base, tuned)
    again = np.asarray(model.generate(PROMPT, 0, tuned=True, scale=1.0).image)
    assert np.array_equal(tuned, again)  # same seed, same image
    strip = model.generate(PROMPT, 0, tuned=True, trajectory_every=1)
    assert len(strip.frames) == 2 and strip.film_strip() is not None


def test_compare_page_generates_base_and_tuned_side_by_side(live_runs: Path, monkeypatch):
    monkeypatch.setenv("TUNE_RUNS_DIR", str(live_runs))
    at = AppTest.from_file(str(PROJECT_ROOT / "dashboard" / "app.py"), default_timeout=120).run()
    at.sidebar.radio(key="page").set_value("Compare").run()
    at.text_input(key="live_new:lora-live").set_value("a photo of sks toy on a blue background")
    at.button(key="live_go:lora-live").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    live = {c for im in at.image for c in im.captions if c in ("base", "tuned")}
    assert live == {"base", "tuned"}
    assert any("on a blue background" in m.value and "LoRA scale 1" in m.value for m in at.markdown)
    at.slider(key="live_scale:lora-live").set_value(0.5).run()  # moving the slider draws again
    assert any("LoRA scale 0.5" in m.value for m in at.markdown)


def test_live_model_takes_a_step_out_before_the_next_and_retries_after_an_error(live_runs: Path):
    from dashboard.live import LiveModel

    model = LiveModel(live_runs / "lora-live")
    base = {k: v.clone() for k, v in model.base().unet.state_dict().items()}
    with pytest.raises(ConfigError, match="no complete checkpoint at step 7"):
        model.tuned(step=7)
    tuned = model.tuned(scale=1.0)  # the failed step left nothing behind; the export goes in
    assert any(not torch.equal(v, base[k]) for k, v in tuned.unet.state_dict().items())
    with pytest.raises(ConfigError):
        model.tuned(step=7)  # the export's adapter came out before the step was tried
    assert all(torch.equal(v, base[k]) for k, v in tuned.unet.state_dict().items())


@pytest.fixture(scope="module")
def sdxl_live_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run over tiny SDXL (64 px): a random attn2 adapter, step-0 samples drawn with 2 steps."""
    from tune.models import build_pipeline

    root = tmp_path_factory.mktemp("live-sdxl")
    base = root / "base"
    build_pipeline("tiny-sdxl-shallow", seed=0).save_pretrained(base)
    run = root / "runs" / "lora-sdxl"
    make_live_run(run, str(base), "euler_a")
    return run


def test_live_model_on_an_sdxl_run(sdxl_live_run: Path):
    from dashboard.live import LiveModel

    model = LiveModel(sdxl_live_run)
    base = model.generate(PROMPT, 0, tuned=False).image
    assert type(model.base()).__name__ == "StableDiffusionXLPipeline" and base.size == (64, 64)
    at_zero = np.asarray(model.generate(PROMPT, 0, tuned=True, scale=0.0).image)
    tuned = np.asarray(model.generate(PROMPT, 0, tuned=True, scale=1.0).image)
    assert np.array_equal(np.asarray(base), at_zero) and not np.array_equal(np.asarray(base), tuned)
    strip = model.generate(PROMPT, 0, tuned=True, trajectory_every=1)
    assert len(strip.frames) == 2 and strip.film_strip().size == (2 * 64, 64)
