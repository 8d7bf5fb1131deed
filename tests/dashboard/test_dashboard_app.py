"""The Streamlit app under streamlit.testing's AppTest, on fixture run directories (see conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from dashboard_testkit import IMAGES_PER_STEP, LORA_RUN, PROMPTS, STEPS, STOPPED_RUN, write_eval_report
from streamlit.testing.v1 import AppTest

from tune import PROJECT_ROOT

APP = str(PROJECT_ROOT / "dashboard" / "app.py")


@pytest.fixture
def app(runs_root: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("TUNE_RUNS_DIR", str(runs_root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, at.exception
    return at


def chart_rows(chart: Any) -> list[dict[str, Any]]:
    """The data rows of a vega-lite chart element (Arrow streams in its proto)."""
    import pyarrow as pa

    return [r for d in chart.proto.datasets for r in pa.ipc.open_stream(d.data.data).read_all().to_pylist()]


def grid_images(at: AppTest) -> list[str]:
    """Captions of the compare grid's images (each grid image is captioned with its seed)."""
    return [c for im in at.image for c in im.captions if c.startswith("seed ")]


def test_runs_page_lists_every_run_with_status_and_loss_curve(app: AppTest):
    table = app.dataframe[0].value
    rows = {r["run"]: r for r in table.to_dict("records")}
    assert set(rows) == {LORA_RUN, STOPPED_RUN}
    lora = rows[LORA_RUN]
    assert (lora["recipe"], lora["status"], lora["steps"], lora["concept"]) == (
        "lora",
        "done",
        "191/200",
        "sks-toy",
    )
    assert lora["base model"] == "models/world-base"
    assert lora["time"] == "9m33s"  # last metric 10:09:33 - start 10:00:00
    assert rows[STOPPED_RUN]["status"] == "crashed"
    # one loss chart per run (both have loss rows; the torn last line is skipped)
    charts = app.get("vega_lite_chart")
    assert len(charts) == 2
    # the lora run logs val_loss too: its chart plots it beside the training loss
    metrics = [{row["metric"] for row in chart_rows(c)} for c in charts]
    assert {"loss", "val_loss"} in metrics and {"loss"} in metrics
    val = [(r["step"], r["value"]) for c in charts for r in chart_rows(c) if r["metric"] == "val_loss"]
    assert val == [(0, 0.6), (100, 0.5), (191, 0.409)]


def test_compare_grid_shows_base_and_checkpoint_side_by_side(app: AppTest):
    goto(app, "Compare")
    assert app.sidebar.selectbox(key="run").value == LORA_RUN  # the run with samples is the default
    captions = grid_images(app)
    assert len(captions) == IMAGES_PER_STEP * len(STEPS) >= 4
    headers = [m.value for m in app.markdown]
    assert "**base (step 0)**" in headers and "**step 200**" in headers
    # the rows are the prompts, labelled with their style
    assert f"**{PROMPTS[1]}** · _on a red background_" in headers
    assert f"**{PROMPTS[0]}** · _(plain)_" in headers
    # concept photos beside the grid
    photos = [im for im in app.image if any(c.startswith("toy_") for c in im.captions)]
    assert len(photos) == 1 and len(photos[0].value) == 3


@pytest.mark.parametrize(
    ("widget", "value", "expected"),
    [
        ("f_style", ["on a red background"], 2 * len(STEPS)),
        ("f_seed", [1], len(PROMPTS) * len(STEPS)),
        ("f_cols", [200], IMAGES_PER_STEP),
        ("f_text", "blue", 2 * len(STEPS)),
        ("f_text", "no such prompt", 0),
    ],
)
def test_filters_change_the_grid(app: AppTest, widget: str, value, expected: int):
    goto(app, "Compare")
    before = len(grid_images(app))
    key = f"{widget}:{LORA_RUN}"
    element = app.text_input(key=key) if widget == "f_text" else app.multiselect(key=key)
    element.set_value(value).run()
    assert not app.exception, app.exception
    assert len(grid_images(app)) == expected != before


def test_compare_shows_eval_figures_and_eval_images(app: AppTest):
    goto(app, "Compare")
    assert any("best step: 200" in c.value for c in app.caption)
    assert len(app.get("vega_lite_chart")) == 1  # fidelity over steps, best step marked
    table = app.dataframe[0].value
    assert list(table["step"]) == [0, 200] and list(table["subject_fidelity"]) == [0.21, 0.62]
    app.radio(key=f"source:{LORA_RUN}").set_value("eval suite").run()
    assert not app.exception, app.exception
    assert len(grid_images(app)) == 2 * 2  # two eval prompts, one seed, base + step 200
    assert f"eval_suite:{LORA_RUN}" not in [w.key for w in app.selectbox]  # one suite: nothing to pick


def test_compare_picks_one_of_several_eval_suites(runs_root: Path, monkeypatch: pytest.MonkeyPatch):
    write_eval_report(runs_root / LORA_RUN, "surfaces", PROMPTS[:1], (0.4, 0.8))
    monkeypatch.setenv("TUNE_RUNS_DIR", str(runs_root))
    app = goto(AppTest.from_file(APP, default_timeout=60).run(), "Compare")
    picker = app.selectbox(key=f"eval_suite:{LORA_RUN}")
    assert picker.options == ["default", "surfaces"] and picker.value == "default"
    assert list(app.dataframe[0].value["subject_fidelity"]) == [0.21, 0.62]
    picker.set_value("surfaces").run()
    assert not app.exception, app.exception
    assert any("suite surfaces" in c.value for c in app.caption)
    assert list(app.dataframe[0].value["subject_fidelity"]) == [0.4, 0.8]
    app.radio(key=f"source:{LORA_RUN}").set_value("eval suite").run()
    assert len(grid_images(app)) == 1 * 2  # surfaces: one prompt, one seed, base + step 200


def test_live_panel_is_there_without_generating(app: AppTest):
    goto(app, "Compare")
    assert app.slider(key=f"live_scale:{LORA_RUN}").value == 1.0
    assert app.button(key=f"live_go:{LORA_RUN}").label == "Generate base vs tuned"
    assert app.selectbox(key=f"live_prompt:{LORA_RUN}").options == PROMPTS


def test_live_generation_without_a_base_model_says_why(app: AppTest):
    # The fixture's base model (models/world-base under a tmp runs folder) may not exist: the panel
    # must report that as an error message, not crash the page.
    goto(app, "Compare")
    app.slider(key=f"live_scale:{LORA_RUN}").set_value(0.5).run(timeout=120)
    assert not app.exception, app.exception
    assert app.error or len([im for im in app.image if im.captions == ["base"]]) == 1


def test_trajectory_page_shows_saved_film_strip_or_offers_to_generate(app: AppTest):
    goto(app, "Trajectory")
    strips = [im for im in app.image if any(c.startswith("denoising") for c in im.captions)]
    assert len(strips) == 1  # step 0, prompt 0, seed 0 has a saved strip
    app.selectbox(key=f"t_seed:{LORA_RUN}").set_value(1).run()
    assert not any(c.startswith("denoising") for im in app.image for c in im.captions)
    assert app.button(key=f"t_go:{LORA_RUN}").label == "Generate film strip live"


def test_export_page_summarises_files_and_offers_downloads(app: AppTest):
    goto(app, "Export")
    downloads = app.get("download_button")
    labels = sorted(d.proto.label for d in downloads)
    assert labels == [f"Download {LORA_RUN}.safetensors", "Download pytorch_lora_weights.safetensors"]
    facts = [j.value for j in app.json]
    assert any('"format": "kohya"' in f and '"ranks": [' in f for f in facts)
    assert any('"format": "diffusers"' in f for f in facts)


def test_missing_runs_folder_shows_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TUNE_RUNS_DIR", str(tmp_path / "nope"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "No runs folder" in at.warning[0].value


def test_browsing_every_page_imports_no_torch(runs_root: Path):
    # A fresh interpreter: the test process itself has imported torch (tests/conftest.py).
    script = textwrap.dedent(
        f"""
        import os, sys
        os.environ["TUNE_RUNS_DIR"] = {str(runs_root)!r}
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({APP!r}, default_timeout=60).run()
        for page in ("Compare", "Trajectory", "Export", "Runs"):
            at.sidebar.radio(key="page").set_value(page).run()
            assert not at.exception, (page, at.exception)
        at.sidebar.radio(key="page").set_value("Compare").run()
        at.multiselect(key="f_style:{LORA_RUN}").set_value(["on a red background"]).run()
        assert not at.exception
        print("images", len(at.image), "torch imported:", "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch imported: False" in out.stdout
