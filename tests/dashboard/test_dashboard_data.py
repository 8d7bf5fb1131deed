"""dashboard/data.py: what the pages show, read from run directories without torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dashboard_testkit import LORA_RUN, PROMPTS, SEEDS, STEPS, STOPPED_RUN, write_eval_report

from dashboard import data, eval_reports, export_page


@pytest.mark.parametrize(
    ("prompt", "style"),
    [
        ("a photo of sks toy", data.NO_STYLE),
        ("a photo of sks toy on a red background", "on a red background"),
        ("a watercolor painting of sks toy", "a watercolor painting of"),
        ("a photo of toy", data.NO_STYLE),  # the class prompt: the subject without the token
        ("a large red circle on a blue background", "on a blue background"),  # no subject phrase
        ("a cat, oil painting", "oil painting"),
        ("a cat", data.NO_STYLE),
    ],
)
def test_prompt_style_is_the_words_around_the_subject(prompt, style):
    subjects = ["a photo of sks toy", "a photo of toy", "sks toy", "sks"]
    assert data.prompt_style(prompt, subjects) == style


def test_compare_rows_line_up_prompts_and_seeds_across_steps(runs_root: Path):
    run = data.load_run(runs_root / LORA_RUN)
    sets = data.sample_sets(run)
    assert sorted(sets) == STEPS
    rows = data.compare_rows(sets, data.subject_phrases(run))
    assert [(r.prompt, r.seed) for r in rows] == [(p, s) for p in PROMPTS for s in SEEDS]
    for r in rows:
        assert sorted(r.cells) == STEPS
        assert {c.path.parent.name for c in r.cells.values()} == {"step_000000", "step_000200"}
        assert all(c.seed == r.seed and c.prompt == r.prompt for c in r.cells.values())
    assert len(data.filter_rows(rows, "RED background")) == 2
    assert len(data.filter_rows(rows, styles=[data.NO_STYLE], seeds=[1])) == 1
    assert data.filter_rows(rows, "toy", styles=[]) == []


def test_sample_folder_without_index_is_read_from_file_names(runs_root: Path):
    folder = runs_root / LORA_RUN / "samples" / "step_000200"
    (folder / "prompts.json").unlink()
    found = data.read_sample_set(folder, 200)
    assert found is not None and found.seeds == SEEDS
    assert sorted((im.prompt_index, im.seed) for im in found.images) == [
        (i, s) for i in range(3) for s in SEEDS
    ]
    assert data.read_sample_set(runs_root / "nowhere", 5) is None


def test_trajectory_concept_photos_and_eval_report(runs_root: Path):
    run = data.load_run(runs_root / LORA_RUN)
    base = data.sample_sets(run)[0]
    strips = [im for im in base.images if data.trajectory_of(im)]
    assert [(im.prompt_index, im.seed) for im in strips] == [(0, 0)]
    assert [p.name for p in data.concept_photos(run)] == ["toy_0.jpg", "toy_1.jpg", "toy_2.jpg"]
    report = eval_reports.read_eval_report(run)
    assert report is not None
    assert [(r["step"], r["prompt_fidelity"]) for r in eval_reports.eval_table(report)] == [
        (0, 0.30),
        (200, 0.27),
    ]
    # The look's parts read right, a column each where an entry has them (the base's report has none).
    assert [
        {k: v for k, v in r.items() if k.startswith("look ")} for r in eval_reports.eval_table(report)
    ] == [
        {},
        {"look cls": 1.0, "look color2": 0.25},
    ]
    assert sorted(eval_reports.eval_sample_sets(run, report)) == [0, 200]
    (run.path / "eval" / "report.json").write_text("{not json")
    assert eval_reports.read_eval_report(run) is None


def test_every_suites_report_is_listed_and_read(runs_root: Path):
    run = data.load_run(runs_root / LORA_RUN)
    assert eval_reports.eval_suites(run) == ["default"]
    write_eval_report(run.path, "surfaces", PROMPTS[:1], (0.4, 0.8))
    write_eval_report(run.path, "backgrounds", PROMPTS[1:2], (0.3, 0.7))
    (run.path / "eval" / "step_000200" / "report.json").write_text("{}")  # an image folder: no suite
    assert eval_reports.eval_suites(run) == ["default", "backgrounds", "surfaces"]
    surfaces = eval_reports.read_eval_report(run, "surfaces")
    assert surfaces is not None and (surfaces["suite"], surfaces["prompts"]) == ("surfaces", PROMPTS[:1])
    assert [r["subject_fidelity"] for r in eval_reports.eval_table(surfaces)] == [0.4, 0.8]
    sets = eval_reports.eval_sample_sets(
        run, surfaces
    )  # the images of eval/surfaces/, not the default suite's
    assert {im.path.parent.parent.name for s in sets.values() for im in s.images} == {"surfaces"}
    assert [
        r["subject_fidelity"] for r in eval_reports.eval_table(eval_reports.read_eval_report(run) or {})
    ] == [0.21, 0.62]
    (run.path / "eval" / "report.json").unlink()
    assert eval_reports.eval_suites(run) == ["backgrounds", "surfaces"]


def test_runs_table_and_loss_curve(runs_root: Path):
    runs = data.load_runs(runs_root)
    rows = {r["run"]: r for r in (data.run_row(run, runs_root) for run in runs)}
    assert rows[STOPPED_RUN]["status"] == "crashed" and rows[STOPPED_RUN]["steps"] == "1/1800"
    assert rows[LORA_RUN]["status"] == "done"
    points = data.loss_points(next(r for r in runs if r.path.name == LORA_RUN), max_points=5)
    loss = [p["step"] for p in points if p["metric"] == "loss"]
    assert len(loss) == 5 and loss[0] == 1  # thinned
    assert [(p["step"], p["value"]) for p in points if p["metric"] == "val_loss"] == [
        (0, 0.6),
        (100, 0.5),
        (191, 0.409),
    ]


def test_describe_safetensors_without_torch(runs_root: Path, tmp_path: Path):
    export = runs_root / LORA_RUN / "export"
    kohya = export_page.describe_safetensors(export / f"{LORA_RUN}.safetensors")
    assert (kohya["kind"], kohya["format"], kohya["ranks"], kohya["modules"]) == (
        "LoRA",
        "kohya",
        [4],
        {"unet": 4},
    )
    assert kohya["dtypes"] == ["float16"] and kohya["trigger"] == "sks" and kohya["tensors"] == 12
    diffusers = export_page.describe_safetensors(export / "pytorch_lora_weights.safetensors")
    assert diffusers["format"] == "diffusers" and diffusers["parameters"] == 4 * (4 * 64 + 32 * 4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(json.dumps({"x": 1}).encode())
    assert "not a readable safetensors file" in export_page.describe_safetensors(bad)["problem"]


def test_default_columns_keep_base_and_last():
    assert data.default_columns([0, 200]) == [0, 200]
    cols = data.default_columns(list(range(0, 2001, 100)))
    assert cols[0] == 0 and cols[-1] == 2000 and len(cols) == 5


def test_describe_sdxl_lora_and_embedding_files(tmp_path: Path):
    """SDXL files: kohya te1/te2 keys and a diffusers text_encoder_2 count as their own components, the
    base named in the metadata is shown, and the one-file clip_l + clip_g embedding is an embedding."""
    from safetensors.numpy import save_file

    down, up = np.zeros((4, 16), np.float16), np.zeros((16, 4), np.float16)
    kohya = {}
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_te1_text_model_x"):
        kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    for i in range(2):
        stem = f"lora_te2_text_model_encoder_layers_{i}_self_attn_q_proj"
        kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    save_file(kohya, str(tmp_path / "k.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    summary = export_page.describe_safetensors(tmp_path / "k.safetensors")
    assert summary["modules"] == {"unet": 1, "text_encoder": 1, "text_encoder_2": 2}
    assert (summary["format"], summary["base"]) == ("kohya", "sdxl_base_v1-0")
    diffusers = {
        f"{c}.m.lora_{ab}.weight": down for c in ("unet", "text_encoder", "text_encoder_2") for ab in "AB"
    }
    save_file(diffusers, str(tmp_path / "d.safetensors"))
    summary = export_page.describe_safetensors(tmp_path / "d.safetensors")
    assert summary["modules"] == {"unet": 1, "text_encoder": 1, "text_encoder_2": 1} and "base" not in summary
    rows = {"clip_l": np.zeros((2, 16), np.float32), "clip_g": np.zeros((2, 24), np.float32)}
    save_file(rows, str(tmp_path / "e.safetensors"))
    summary = export_page.describe_safetensors(tmp_path / "e.safetensors")
    assert (summary["kind"], summary["vectors"]) == ("embedding", 2) and "clip_g" in summary["format"]
