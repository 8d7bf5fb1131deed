"""scripts/base_card.py: the shipped base's stage table, from the runs and, for runs that are gone, from
the card being replaced."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import base_card  # noqa: E402

SHIPPED_CARD = Path(__file__).parents[1] / "models" / "world-base" / "MODEL_CARD.md"


def fake_run(path: Path, argv: list[str], step_times: list[float]) -> None:
    path.mkdir(parents=True)
    (path / "config.toml").write_text('data_dir = "data/nowhere"\n')
    (path / "run.json").write_text(json.dumps({"argv": argv}))
    rows = [{"step": i + 1, "time": t, "loss": 0.1} for i, t in enumerate(step_times)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_shipped_cards_stage_rows_parse():
    rows = base_card.previous_rows(SHIPPED_CARD)
    assert {"vae", "clip", "unet"} <= set(rows)
    command, time = rows["clip"]
    assert command.startswith("tune run clip") and "min" in time


def test_stages_whose_runs_are_gone_keep_their_rows(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "base-unet", [".venv/bin/tune", "run", "unet", "max_steps=6000"], [0.0, 60.0, 120.0])
    fake_run(runs / "base-clip", [".venv/bin/tune", "run", "clip", "max_steps=10"], [0.0, 30.0])
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(
        "| stage | command | time |\n|---|---|---|\n"
        "| data | `tune data world x` | 3.5 min (210 s) |\n"
        "| vae | `tune run vae latent_channels=8` | 34.4 min (2066 s) |\n"
        "| clip | `tune run clip` | 15.0 min (901 s) |\n"
        "| unet | `tune run unet max_steps=2200` | 49.0 min (2942 s) |\n"
    )
    rows = {stage: (command, time) for stage, command, time in base_card.stage_rows(runs, card, 175.0)}
    assert list(rows) == ["data", "vae", "clip", "unet", "unet eval"]
    assert rows["vae"][0] == "tune run vae latent_channels=8" and "carried over" in rows["vae"][1]
    assert rows["data"][1] == "3.5 min (210 s)"  # no data folder here: the earlier measurement stays
    assert rows["clip"] == ("tune run clip max_steps=10", "0.5 min (30 s)")
    assert rows["unet"] == ("tune run unet max_steps=6000", "2.0 min (120 s)")  # the run, not the card
    assert rows["unet eval"] == ("(end of the unet run)", "2.9 min (175 s)")
    card.write_text(card.read_text().replace("| vae |", "| other |"))
    with pytest.raises(SystemExit) as exit_info:
        base_card.stage_rows(runs, card, None)
    assert exit_info.value.code == 2


def test_a_resumed_run_shows_both_commands(tmp_path):
    fake_run(tmp_path / "r", ["tune", "run", "unet", "max_steps=6000"], [0.0])
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    info["resume_argv"] = ["tune", "run", "unet", "resume=latest", "max_steps=5000"]
    (tmp_path / "r" / "run.json").write_text(json.dumps(info))
    command = base_card.command_of(tmp_path / "r")
    assert command == "tune run unet max_steps=6000`, resumed by `tune run unet resume=latest max_steps=5000"
