"""scripts/demo.py: compare.png, on tiny fake runs (sample folders only, no training)."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

import tune.grids

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import demo  # noqa: E402

TEMPLATES = ["a photo of {token} {class}", "a drawing of {token} {class} on grass", "a photo of {class}"]


def colour(run: int, tuned: bool, prompt: int) -> tuple[int, int, int]:
    return (40 + 100 * run, 200 if tuned else 0, 60 * prompt)


def fake_run(path: Path, run: int, token: str, class_word: str, templates: list[str] = TEMPLATES) -> Path:
    """A lora run as compare reads it: run.json, config.toml, step-0 and last samples (one seed)."""
    path.mkdir(parents=True)
    (path / "photos").mkdir()
    (path / "config.toml").write_text("max_steps = 400\n")
    info = {
        "recipe": "lora",
        "trigger": token,
        "class_word": class_word,
        "instance_dir": str(path / "photos"),
    }
    (path / "run.json").write_text(json.dumps(info))
    prompts = [t.format(token=token, **{"class": class_word}) for t in templates]
    for step, tuned in ((0, False), (200, True), (400, True)):
        folder = path / "samples" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "prompts.json").write_text(json.dumps({"prompts": prompts, "seeds": [7, 8]}))
        for i in range(len(prompts)):
            for seed in (7, 8):
                Image.new("RGB", (16, 16), colour(run, tuned, i)).save(folder / f"p{i:02d}_s{seed}.png")
    return path


def test_template_undoes_the_concepts_rendering():
    assert (
        demo.template("a drawing of sks toy on grass", "sks", "toy")
        == "a drawing of {token} {class} on grass"
    )
    assert demo.template("a photo of w person", "w", "person") == "a photo of {token} {class}"
    assert demo.template("a photo of toy", "sks", "toy") == "a photo of {class}"


def test_compare_puts_base_and_tuned_of_each_subject_in_columns(tmp_path, monkeypatch):
    runs = [
        fake_run(tmp_path / "lora-sks-toy", 0, "sks", "toy"),
        fake_run(tmp_path / "lora-w-person", 1, "w", "person"),
    ]
    seen = {}
    real = tune.grids.make_grid

    def spy(images, rows, cols, **labels):
        seen.update(labels, rows=rows, cols=cols)
        return real(images, rows, cols, **labels)

    monkeypatch.setattr(tune.grids, "make_grid", spy)
    out = demo.compare(runs, tmp_path / "compare.png")

    assert (seen["rows"], seen["cols"]) == (3, 4)
    assert seen["row_labels"] == TEMPLATES
    assert seen["col_labels"] == ["sks toy base", "sks toy tuned", "w person base", "w person tuned"]
    grid = Image.open(out).convert("RGB")
    for row in range(3):
        for col in range(4):
            # Cells fill the bottom right of the canvas (labels take the top and left margins).
            x = grid.width - (4 - col) * 16 + 8
            y = grid.height - (3 - row) * 16 + 8
            assert grid.getpixel((x, y)) == colour(col // 2, col % 2 == 1, row), (row, col)


def test_compare_refuses_runs_sampled_on_other_prompts(tmp_path):
    runs = [
        fake_run(tmp_path / "a", 0, "sks", "toy"),
        fake_run(tmp_path / "b", 1, "w", "person", templates=TEMPLATES[:2]),
    ]
    with pytest.raises(ValueError, match="other validation prompts"):
        demo.compare(runs, tmp_path / "compare.png")
