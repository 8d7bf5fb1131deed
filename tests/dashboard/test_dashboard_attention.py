"""The Attention page (dashboard/attention_page.py) under AppTest: a tiny LoRA run drawn live with its
cross-attention maps, the trigger word's film strips shown by default for the tuned and the base model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_dashboard_live import make_live_run

from tune import PROJECT_ROOT

APP = str(PROJECT_ROOT / "dashboard" / "app.py")
RUN = "lora-attn"


@pytest.fixture(scope="module")
def attn_runs(tiny_pipeline_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The live tests' LoRA run over the tiny pipeline, with its trigger word and prompt in run.json."""
    root = tmp_path_factory.mktemp("attn") / "runs"
    make_live_run(root / RUN, tiny_pipeline_dir, "ddim")
    info = json.loads((root / RUN / "run.json").read_text())
    info.update(trigger="sks", instance_prompt="a photo of sks toy")
    (root / RUN / "run.json").write_text(json.dumps(info))
    return root


def open_page(runs: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("TUNE_RUNS_DIR", str(runs))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.sidebar.radio(key="page").set_value("Attention").run()
    assert not at.exception, at.exception
    return at


def strip_captions(at: AppTest) -> list[str]:
    return [c for im in at.image for c in im.captions if "first step to last" in c]


def test_attention_page_shows_the_trigger_words_maps_tuned_and_base(attn_runs: Path, monkeypatch):
    at = open_page(attn_runs, monkeypatch)
    assert at.text_input(key=f"attn_prompt:{RUN}").value == "a photo of sks toy"  # the trigger prompt
    assert at.selectbox(key=f"attn_model:{RUN}").value == "final"  # the export, then the base
    at.button(key=f"attn_go:{RUN}").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    words = at.multiselect(key=f"attn_words:{RUN}:a photo of sks toy")
    assert words.options == ["a", "photo", "of", "sks", "toy"] and words.value == ["sks"]
    captions = strip_captions(at)
    assert [c.split(" · ")[:2] for c in captions] == [["tuned (export)", "'sks'"], ["base", "'sks'"]]
    for caption in captions:
        share = float(caption.split(" · ")[3].split("%")[0])
        assert 0 <= share <= 100
    # More words: a strip per word and model, from the maps already drawn.
    words.set_value(["sks", "toy"]).run()
    assert len(strip_captions(at)) == 4 and not at.exception


def test_attention_page_for_the_base_alone_and_a_word_the_prompt_lacks(attn_runs: Path, monkeypatch):
    at = open_page(attn_runs, monkeypatch)
    at.selectbox(key=f"attn_model:{RUN}").set_value("base")
    at.text_input(key=f"attn_prompt:{RUN}").set_value("a red zebrafoo")
    at.button(key=f"attn_go:{RUN}").click().run()
    assert not at.exception and not at.error
    words = at.multiselect(key=f"attn_words:{RUN}:a red zebrafoo")
    assert words.value == ["zebrafoo"]  # no trigger word in the prompt: its last word
    assert [c.split(" · ")[:2] for c in strip_captions(at)] == [["base", "'zebrafoo'"]]


def test_opening_the_attention_page_imports_no_torch(attn_runs: Path):
    # A fresh interpreter: the test process itself has imported torch (tests/conftest.py).
    script = textwrap.dedent(
        f"""
        import os, sys
        os.environ["TUNE_RUNS_DIR"] = {str(attn_runs)!r}
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({APP!r}, default_timeout=60).run()
        at.sidebar.radio(key="page").set_value("Attention").run()
        assert not at.exception, at.exception
        print("torch imported:", "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch imported: False" in out.stdout


def edit_captions(at: AppTest) -> list[str]:
    return [c for im in at.image for c in im.captions if " steps" in c and "first step" not in c]


def test_edit_panel_draws_the_prompt_and_its_edit_on_the_picked_model(attn_runs: Path, monkeypatch):
    at = open_page(attn_runs, monkeypatch)
    assert at.text_input(key=f"edit_a:{RUN}").value == "a photo of sks toy"  # the page's prompt
    at.text_input(key=f"edit_w:{RUN}").set_value("sks=2")
    at.button(key=f"edit_go:{RUN}").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    # The run's samples were drawn with 2 steps: K defaults to 40% of them (1).
    assert edit_captions(at) == ["tuned (export) · swap for 1 of 2 steps"]
    [image] = [im for im in at.image if im.captions == edit_captions(at)]
    at.selectbox(key=f"attn_model:{RUN}").set_value("base")
    at.number_input(key=f"edit_k:{RUN}").set_value(2)
    at.button(key=f"edit_go:{RUN}").click().run()
    assert edit_captions(at) == ["base · swap for 2 of 2 steps"] and not at.error


@pytest.mark.parametrize(
    ("edit", "weights", "message"),
    [
        ("a photo", "", "a word swap needs the same number of tokens"),
        ("a photo of sks toy", "sks", "--reweight needs WORD=FACTOR"),
    ],
)
def test_edit_panel_errors_are_one_line(attn_runs: Path, monkeypatch, edit: str, weights: str, message: str):
    at = open_page(attn_runs, monkeypatch)
    at.text_input(key=f"edit_b:{RUN}").set_value(edit)
    at.text_input(key=f"edit_w:{RUN}").set_value(weights)
    at.button(key=f"edit_go:{RUN}").click().run()
    assert not at.exception
    [error] = at.error
    assert message in error.value and len(error.value.splitlines()) == 1
    assert not edit_captions(at)
