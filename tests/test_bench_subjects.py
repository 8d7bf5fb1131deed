"""bench/subjects.py's rows read back from kept runs (`--collect`) keep the settings they were trained with
and the guidance their eval drew at."""

from __future__ import annotations

import json

from bench_testkit import load_bench_script


def test_collected_rows_name_the_settings_the_run_was_trained_with(tmp_path):
    subjects = load_bench_script("subjects.py")
    run = tmp_path / "runs" / "red-ball-lora"
    report = run / "eval" / "backgrounds" / "report.json"
    report.parent.mkdir(parents=True)
    argv = [
        "tune",
        "run",
        "lora",
        "--config",
        "default",
        "concept=/k/concepts/red-ball",
        "output_dir=/k/runs/red-ball-lora",
        "prior.guidance=3.0",
        "seed=1",
    ]
    (run / "run.json").write_text(json.dumps({"argv": argv}))
    scores = {"subject_found": 0.9, "background_right": 0.875, "style_right": 1.0, "subject_in_others": None}
    report.write_text(
        json.dumps(
            {"guidance": 2.0, "base": {"subject_found": 0.0}, "checkpoints": [{"step": 1200, **scores}]}
        )
    )

    args = type(
        "Args", (), {"recipes": ["lora", "dreambooth"], "subjects": ["red-ball"], "suites": ["backgrounds"]}
    )
    rows = subjects.collect(tmp_path, args)

    assert len(rows) == 1  # the dreambooth run was not kept
    assert rows[0]["settings"] == ["prior.guidance=3.0", "seed=1"] and rows[0]["guidance"] == 2.0
    assert rows[0]["subject_found"] == 0.9 and rows[0]["step"] == 1200 and rows[0]["train_s"] is None
