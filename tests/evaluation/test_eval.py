"""tune eval: suites, the best-step/overfit rule, reports of tiny lora and dreambooth runs (in training
and after), and one-line CLI errors. Putting a checkpoint's weights in and out again is tested in
tests/personalize/test_weights.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from recipes import lora as lora_recipe
from tune import PROJECT_ROOT
from tune.cli import main as cli_main
from tune.config import load_config
from tune.errors import ConfigError
from tune.evaluation import EvalSubject, Evaluator, Suite, decide, load_suite, run_subject, suite_eval_dir
from tune.evaluation.report import METRICS, format_markdown, format_summary
from tune.runs import read_run

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))  # the recipe tests' testkit
from test_metrics import save_tiny_clip  # noqa: E402

from recipe_testkit import make_concept  # noqa: E402

# Every metric the report names, plus the entry's own fields; the judge-based ones must be among them.
METRIC_KEYS = {"label", "step", *METRICS, "subject_parts", "images"}
assert {"subject_found", "background_right", "style_right", "subject_in_others"} <= set(METRICS)
TINY_SUITE = """
prompts = ["a photo of {token} {class} on a red background", "a photo of {class}"]
seeds = [0, 1]
steps = 2
guidance = 6.0
"""
# The lora fixture trains with TINY_SUITE saved as suite.toml: a suite named "suite", not the default one,
# so its reports go to eval/suite/.
SUITE_DIR = Path("eval/suite")


# ---------------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "eval").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_suites_load_strictly(path: Path) -> None:
    suite = load_suite(path)
    assert suite.name == path.stem and len(suite.seeds) >= 2 and suite.steps >= 1
    assert any("{token}" in p for p in suite.prompts) or path.stem == "drift"  # drift: the class alone


def test_shipped_suite_contents() -> None:
    assert len(load_suite("dreambooth").prompts) == 25 and len(load_suite("dreambooth-live").prompts) == 25
    assert load_suite("dreambooth").seeds == (0, 1, 2, 3)  # images_per_prompt = 4
    default = load_suite()
    assert default.name == "default" and (default.steps, default.guidance, default.seeds) == (20, 6.0, (0, 1))
    # The world suites of the personalization figures: every prompt parses to what it asks of the judge.
    from tune.world.captions import parse

    colours = [
        parse(p.format(token="sks", **{"class": "toy"}))["background"]
        for p in load_suite("backgrounds").prompts
    ]
    assert colours == ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    surfaces = [
        parse(p.format(token="sks", **{"class": "toy"}))["background"] for p in load_suite("surfaces").prompts
    ]
    assert surfaces == ["wooden table", "grass", "sand", "rug"]
    styles = [parse(p.format(token="sks", **{"class": "toy"}))["style"] for p in load_suite("styles").prompts]
    assert styles == ["photo", "drawing", "sketch", "pixel"]
    assert not any("{token}" in p for p in load_suite("drift").prompts)
    # ... each drawn at the run's own guidance, the one its default config measured (sample.guidance)
    world = ("backgrounds", "surfaces", "styles", "drift")
    assert [load_suite(name).guidance for name in world] == ["run"] * 4


def test_a_suite_at_the_runs_guidance_takes_it_from_the_run_or_an_override() -> None:
    suite = Suite(name="s", prompts=("a {token}",), guidance="run")
    assert suite.drawn_at(2.0).guidance == 2.0 and suite.drawn_at(2.0, 4).guidance == 4.0
    with pytest.raises(ConfigError, match="config has no sample.guidance; give one"):
        suite.drawn_at(None)
    with pytest.raises(ConfigError, match="config has no sample.guidance"):  # not drawn at a string
        Evaluator(suite, EvalSubject("sks", "toy", PROJECT_ROOT), None, clip="no-clip")
    fixed = Suite(name="s", prompts=("a {token}",), guidance=6.0)
    assert fixed.drawn_at(2.0).guidance == 6.0 and fixed.drawn_at(2.0, 3.0).guidance == 3.0


@pytest.mark.parametrize(
    "text, message",
    [
        (TINY_SUITE + "promtps = []\n", "unknown key 'promtps' (did you mean 'prompts'?)"),
        ('prompts = ["a {token}"]\nseeds = [0]\n', "at least two distinct integer seeds"),
        ('prompts = ["a {token}"]\nseeds = [0, 1]\nimages_per_prompt = 2\n', "not both"),
        ('prompts = ["a {token} {style}"]\n', "uses {style}"),
        (
            'prompts = ["a {token}"]\nscheduler = "eular"\n',
            "unknown scheduler 'eular' (did you mean 'euler'?)",
        ),
        ('prompts = ["a {token}"]\nsteps = "20"\n', "'steps' has the wrong type"),
        ('prompts = ["a {token}"]\nguidance = "auto"\n', "'guidance' must be a number or \"run\""),
        ("prompts = []\n", "non-empty list"),
        ("prompts = [", "not valid TOML"),
    ],
)
def test_bad_suites_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    assert message in str(err.value)


def test_missing_suite_suggests_a_shipped_one() -> None:
    with pytest.raises(ConfigError, match="suite defualt not found \\(did you mean 'default'\\?\\)"):
        load_suite("defualt")


def test_importing_evaluation_leaves_torch_unimported() -> None:
    # `tune eval --help` imports the package, and the report's rule and text are torch-free: every
    # module of tune.evaluation loads torch on first use.
    code = "import sys, tune.evaluation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------
# Best step and overfitting (synthetic metrics)
# ---------------------------------------------------------------------------------------------------


def entry(step: int, subject: float, prompt: float, diversity: float = 0.3) -> dict:
    return {"step": step, "subject_fidelity": subject, "prompt_fidelity": prompt, "diversity": diversity}


BASE = entry(0, 0.50, 0.30, 0.40)


def test_best_step_is_the_most_faithful_checkpoint_that_keeps_the_prompt() -> None:
    healthy = [entry(100, 0.60, 0.29), entry(200, 0.70, 0.28), entry(300, 0.72, 0.275)]
    assert decide(BASE, healthy) == (300, False, None)
    # Step 300 has the best subject but lost the prompt (0.26 < 0.9 * 0.30): best is 200, overfit.
    best, overfit, reason = decide(BASE, [*healthy[:2], entry(300, 0.80, 0.26)])
    assert (best, overfit) == (200, True)
    assert reason is not None and "prompt fidelity 0.2600 at step 300" in reason and "0.3000" in reason
    # Exactly 90% of the base still counts as kept.
    assert decide(BASE, [entry(100, 0.6, 0.27)])[:2] == (100, False)


def test_diversity_collapse_is_overfitting() -> None:
    best, overfit, reason = decide(BASE, [entry(100, 0.6, 0.3, 0.35), entry(200, 0.7, 0.3, 0.19)])
    assert (best, overfit) == (200, True) and reason is not None and "diversity 0.1900" in reason
    assert decide(BASE, [entry(100, 0.6, 0.3, 0.21)])[1] is False  # above half of 0.40


def test_decide_edge_cases() -> None:
    assert decide(BASE, []) == (None, False, None)
    assert decide(BASE, [entry(100, 0.9, 0.1)])[:2] == (None, True)  # no checkpoint keeps the prompt
    assert decide(None, [entry(100, 0.6, 0.0), entry(200, 0.5, 0.9)]) == (100, False, None)
    # A negative base cosine: 90% of it is further from zero, not closer.
    negative = entry(0, 0.1, -0.10, 0.4)
    assert decide(negative, [entry(100, 0.2, -0.105)])[:2] == (100, False)
    assert decide(negative, [entry(100, 0.2, -0.12)])[:2] == (None, True)


# ---------------------------------------------------------------------------------------------------
# A tiny lora run: evaluated during training (eval_every) and after (tune eval)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("eval")
    (root / "suite.toml").write_text(TINY_SUITE)
    return {
        "concept": make_concept(root / "concept"),
        "cache": root / "cache",
        "base": tiny_pipeline_dir,
        "clip": save_tiny_clip(root / "clip"),
        "suite": root / "suite.toml",
    }


@pytest.fixture(scope="module")
def lora_run(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    overrides = [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"output_dir={tmp_path_factory.mktemp('runs') / 'lora'}",
        f"data.cache_dir={setup['cache']}",
        "eval_every=2",
        f"eval_suite={setup['suite']}",
        f"eval_clip={setup['clip']}",
        "sample_every=0",
    ]
    cfg = load_config(lora_recipe.Config, PROJECT_ROOT / "recipes/configs/lora/tiny.toml", overrides)
    return lora_recipe.main(cfg).path


def check_report(report: dict, run: Path, steps: list[int], suite_dir: Path = SUITE_DIR) -> None:
    assert set(report) == {
        "suite",
        "clip_model",
        "dino_model",
        "prompts",
        "seeds",
        "steps",
        "guidance",
        "base",
        "checkpoints",
        "best_step",
        "overfit",
        "overfit_reason",
    }
    assert report["prompts"] == ["a photo of sks toy on a red background", "a photo of toy"]
    assert (report["seeds"], report["steps"], report["guidance"], report["dino_model"]) == (
        [0, 1],
        2,
        6.0,
        None,
    )
    entries = [report["base"], *report["checkpoints"]]
    assert [e["step"] for e in entries] == [0, *steps]
    assert [e["label"] for e in entries] == ["base"] + [f"step_{s:06d}" for s in steps]
    for e in entries:
        assert set(e) == METRIC_KEYS and e["images"] == f"{suite_dir.as_posix()}/{e['label']}/"
        assert (
            -1 <= e["subject_fidelity"] <= 1 and -1 <= e["prompt_fidelity"] <= 1 and 0 <= e["diversity"] <= 2
        )
        assert 0 <= e["subject_found"] <= 1  # the judge reads the example toy's look in the concept's photos
        parts = e["subject_parts"]  # found needs the class and pattern (and the colours where shown) right
        assert {"cls", "pattern", "color", "color2"} >= set(parts) >= {"cls", "pattern"}
        assert e["subject_found"] <= min(parts["cls"], parts["pattern"]) and max(parts.values()) <= 1
        assert e["background_right"] in (0.0, 0.5, 1.0)  # one prompt x two seeds names a background
        assert e["style_right"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # both prompts name "a photo of"
        assert e["dino_fidelity"] is None and e["prompt_right"] in (0.0, 0.5, 1.0)
        assert 0 <= e["trigger_on_subject"] <= 1  # the token's final attention mass on the subject
        folder = run / e["images"]
        assert {"p00_s0.png", "p00_s1.png", "p01_s0.png", "p01_s1.png", "grid.png", "prompts.json"} <= {
            p.name for p in folder.iterdir()
        }
    assert (report["best_step"], report["overfit"], report["overfit_reason"]) == decide(
        report["base"], report["checkpoints"]
    )


def test_eval_every_writes_the_report_and_keeps_the_best_adapter(lora_run: Path) -> None:
    report = json.loads((lora_run / SUITE_DIR / "report.json").read_text())
    check_report(report, lora_run, [2, 4])
    assert "| base | 0 |" in (lora_run / SUITE_DIR / "report.md").read_text()
    info = json.loads((lora_run / "run.json").read_text())
    assert info["best_step"] == report["best_step"]
    best = lora_run / "export" / "best" / "pytorch_lora_weights.safetensors"
    assert best.is_file() == (report["best_step"] is not None)


def test_summary_leaves_out_what_a_suite_does_not_measure() -> None:
    # The drift suite: no prompt names the trigger, so no subject fidelity, subject found or trigger figure.
    base = dict.fromkeys(METRICS) | {"label": "base", "step": 0, "prompt_fidelity": 0.58, "diversity": 0.46}
    base |= {"background_right": 1.0, "subject_in_others": 0.0}
    tuned = base | {"label": "step_000004", "step": 4, "subject_in_others": 0.2}
    report = {
        "base": base,
        "checkpoints": [tuned],
        "best_step": None,
        "overfit": False,
        "overfit_reason": None,
    }
    lines = format_summary(report).splitlines()
    assert lines[1] == (
        " step_000004: prompt 0.5800  diversity 0.4600  background right 1.0000  subject without trigger 0.2000"
    )
    assert lines[2] == "best step: None  overfit: False"


def test_the_looks_parts_are_shown_where_an_entry_has_them() -> None:
    base = dict.fromkeys(METRICS) | {"label": "base", "step": 0, "prompt_fidelity": 0.6, "diversity": 0.4}
    parts = {"cls": 1.0, "pattern": 0.875, "color": 0.45, "color2": 0.0, "hair": 0.8}
    tuned = base | {"label": "step_000500", "step": 500, "subject_found": 0.0, "subject_parts": parts}
    report = {"suite": "backgrounds", "clip_model": "clip", "dino_model": None, "prompts": ["p"]}
    report |= {"seeds": [0], "steps": 2, "guidance": 5.0, "base": base | {"subject_parts": None}}
    report |= {"checkpoints": [tuned], "best_step": None, "overfit": False, "overfit_reason": None}
    lines = format_summary(report).splitlines()
    assert lines[2] == "   look read: cls 100%  pattern 88%  color 45%  color2 0%  hair 80%"
    table = format_markdown(report)
    assert "| model | cls | pattern | color | color2 | hair |" in table
    assert (
        "| base | - | - | - | - | - |" in table and "| step_000500 | 100% | 88% | 45% | 0% | 80% |" in table
    )
    # A suite without the subject (drift) or a report from before: no table, no line.
    assert "look read" not in format_summary(report | {"checkpoints": [base]})
    assert "| model | cls |" not in format_markdown(report | {"base": base, "checkpoints": [base]})


def test_tune_eval_scores_base_and_checkpoints(
    lora_run: Path, setup: dict, capsys: pytest.CaptureFixture
) -> None:
    during = json.loads((lora_run / SUITE_DIR / "report.json").read_text())
    args = [
        "eval",
        str(lora_run),
        "--suite",
        str(setup["suite"]),
        "--clip",
        str(setup["clip"]),
        "--device",
        "cpu",
    ]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "best step:" in out and "trigger on subject" in out
    assert str(lora_run / SUITE_DIR / "report.md") in out
    after = json.loads((lora_run / SUITE_DIR / "report.json").read_text())
    check_report(after, lora_run, [2, 4])
    # The same base model, prompts and seeds: the same numbers as during training; the checkpoints'
    # merged adapters match the live PEFT adapters to rounding.
    for key in ("subject_fidelity", "prompt_fidelity", "diversity"):
        assert after["base"][key] == pytest.approx(during["base"][key], abs=1e-5)
        for a, b in zip(after["checkpoints"], during["checkpoints"], strict=True):
            assert a[key] == pytest.approx(b[key], abs=1e-3)
    assert cli_main([*args, "--checkpoints", "last"]) == 0
    last = json.loads((lora_run / SUITE_DIR / "report.json").read_text())
    assert [c["step"] for c in last["checkpoints"]] == [4]
    assert last["checkpoints"][0]["subject_fidelity"] == after["checkpoints"][1]["subject_fidelity"]


def test_tune_eval_draws_at_the_runs_guidance_or_the_flags(
    lora_run: Path, setup: dict, tmp_path: Path
) -> None:
    # A copy of the run whose validation samples were drawn at 2.5 (config.toml's [sample] guidance), and
    # a suite that says guidance = "run": tune eval draws at 2.5; --guidance 4 draws at 4.
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    config = tomllib.loads((run / "config.toml").read_text())
    config["sample"]["guidance"] = 2.5
    (run / "config.toml").write_text(tomli_w.dumps(config))
    assert read_run(run).config["sample"]["guidance"] == 2.5
    (tmp_path / "at-run.toml").write_text(TINY_SUITE.replace("guidance = 6.0", 'guidance = "run"'))
    args = ["eval", str(run), "--suite", str(tmp_path / "at-run.toml"), "--clip", str(setup["clip"])]
    images = []
    for extra, guidance in (([], 2.5), (["--guidance", "4"], 4.0)):
        assert cli_main([*args, "--device", "cpu", "--checkpoints", "last", *extra]) == 0
        report = json.loads((run / "eval/at-run/report.json").read_text())
        assert report["guidance"] == guidance
        images.append((run / "eval/at-run/step_000004/p00_s0.png").read_bytes())
    assert images[0] != images[1]  # the scale reached the sampler


# ---------------------------------------------------------------------------------------------------
# Each suite keeps its own report
# ---------------------------------------------------------------------------------------------------


def test_suite_folder_is_eval_for_the_default_suite_else_its_own(tmp_path: Path) -> None:
    assert suite_eval_dir(tmp_path, "default") == tmp_path / "eval"
    assert suite_eval_dir(tmp_path, "backgrounds") == tmp_path / "eval" / "backgrounds"
    for name in ("base", "step_000200", "Step_1"):
        with pytest.raises(ConfigError, match="clashes with the image folders"):
            suite_eval_dir(tmp_path, name)
    for name in ("", "..", "a/b"):
        with pytest.raises(ConfigError, match="not a plain folder name"):
            suite_eval_dir(tmp_path, name)


def test_each_suite_keeps_its_own_report(
    lora_run: Path, setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Three suites on one run, one after another: the training-time "suite" (eval/suite/), "other"
    # (eval/other/) and a suite named "default" (eval/, where the dashboard has always looked).
    (tmp_path / "other.toml").write_text(TINY_SUITE.replace("on a red background", "on grass"))
    (tmp_path / "default.toml").write_text(TINY_SUITE.replace("a photo of {class}", "a drawing of {class}"))
    clip = ["--clip", str(setup["clip"]), "--device", "cpu", "--checkpoints", "last"]
    for name in ("other", "default"):
        assert cli_main(["eval", str(lora_run), "--suite", str(tmp_path / f"{name}.toml"), *clip]) == 0
        assert str(suite_eval_dir(lora_run, name) / "report.md") in capsys.readouterr().out
    prompts = {
        "suite": ["a photo of sks toy on a red background", "a photo of toy"],
        "other": ["a photo of sks toy on grass", "a photo of toy"],
        "default": ["a photo of sks toy on a red background", "a drawing of toy"],
    }
    for name, folder in (("suite", SUITE_DIR), ("other", Path("eval/other")), ("default", Path("eval"))):
        report = json.loads((lora_run / folder / "report.json").read_text())
        assert (report["suite"], report["prompts"]) == (name, prompts[name])
        for e in [report["base"], *report["checkpoints"]]:
            assert e["images"] == f"{folder.as_posix()}/{e['label']}/" and (lora_run / e["images"]).is_dir()
        assert f"({report['base']['label']}/grid.png)" in (lora_run / folder / "report.md").read_text()


def test_resumed_training_eval_reads_its_suites_report(lora_run: Path, setup: dict) -> None:
    subject = run_subject(read_run(lora_run))
    evaluator = Evaluator(load_suite(setup["suite"]), subject, None, clip=setup["clip"])
    evaluator.attach(lora_run, step=3)  # a run resumed at step 3 keeps base and step 2 of eval/suite/
    report = json.loads((lora_run / SUITE_DIR / "report.json").read_text())
    assert evaluator.eval_dir == lora_run / SUITE_DIR and evaluator.base == report["base"]
    kept = [c["step"] for c in report["checkpoints"] if c["step"] < 3]
    assert [c["step"] for c in evaluator.checkpoints] == kept


def test_a_suite_named_like_an_image_folder_is_refused_before_drawing(
    lora_run: Path, setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "base.toml").write_text(TINY_SUITE)
    (tmp_path / "renamed.toml").write_text('name = "step_000002"\n' + TINY_SUITE)
    before = sorted((p, p.stat().st_mtime_ns) for p in lora_run.rglob("*"))
    for suite in ("base.toml", "renamed.toml"):
        args = ["eval", str(lora_run), "--suite", str(tmp_path / suite), "--clip", str(setup["clip"])]
        assert "clashes with the image folders" in one_line_error([*args, "--device", "cpu"], capsys)
    assert sorted((p, p.stat().st_mtime_ns) for p in lora_run.rglob("*")) == before
    # In training (eval_suite) it fails as the evaluator is built: before the CLIP folder is even read.
    subject = run_subject(read_run(lora_run))
    with pytest.raises(ConfigError, match="clashes with the image folders"):
        Evaluator(load_suite(tmp_path / "base.toml"), subject, None, clip=tmp_path / "no-clip")


# ---------------------------------------------------------------------------------------------------
# The other recipes
# ---------------------------------------------------------------------------------------------------


def test_dreambooth_run_evaluated_in_training_and_after(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from recipes import dreambooth

    overrides = [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"output_dir={tmp_path / 'db'}",
        f"data.cache_dir={setup['cache']}",
        "eval_every=4",
        f"eval_suite={setup['suite']}",
        f"eval_clip={setup['clip']}",
        "sample_every=0",
        "checkpoint_every=4",
    ]
    cfg = load_config(dreambooth.Config, PROJECT_ROOT / "recipes/configs/dreambooth/tiny.toml", overrides)
    run = dreambooth.main(cfg).path
    during = json.loads((run / SUITE_DIR / "report.json").read_text())
    check_report(during, run, [4])
    assert (run / "export" / "best" / "model_index.json").is_file() == (during["best_step"] == 4)
    # tune eval reads the accelerate checkpoint (U-Net + EMA) and draws what the run drew at step 4.
    args = ["eval", str(run), "--suite", str(setup["suite"]), "--clip", str(setup["clip"]), "--device", "cpu"]
    assert cli_main(args) == 0
    after = json.loads((run / SUITE_DIR / "report.json").read_text())
    for key in ("subject_fidelity", "prompt_fidelity", "diversity"):
        assert after["checkpoints"][0][key] == pytest.approx(during["checkpoints"][0][key], abs=1e-4)


def test_textual_inversion_run_evaluated_in_training_and_after(setup: dict, tmp_path: Path) -> None:
    from recipes import textual_inversion

    overrides = [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"output_dir={tmp_path / 'ti'}",
        f"data.cache_dir={setup['cache']}",
        "eval_every=2",
        f"eval_suite={setup['suite']}",
        f"eval_clip={setup['clip']}",
        "sample_every=0",
        "checkpoint_every=2",
        "checkpoints_keep=0",
        "optim.lr=0.05",  # a tiny run's embedding moves enough for the scores to differ
    ]
    config = PROJECT_ROOT / "recipes/configs/textual_inversion/tiny.toml"
    run = textual_inversion.main(load_config(textual_inversion.Config, config, overrides)).path
    during = json.loads((run / SUITE_DIR / "report.json").read_text())
    check_report(during, run, [2, 4])
    assert json.loads((run / "run.json").read_text())["best_step"] == during["best_step"]
    best = run / "export" / "best" / "learned_embeds.safetensors"
    assert best.is_file() == (during["best_step"] is not None)
    # tune eval loads each checkpoint's embedding and draws what the run drew at that step.
    args = ["eval", str(run), "--suite", str(setup["suite"]), "--clip", str(setup["clip"]), "--device", "cpu"]
    assert cli_main(args) == 0
    after = json.loads((run / SUITE_DIR / "report.json").read_text())
    for now, then in zip(after["checkpoints"], during["checkpoints"], strict=True):
        for key in ("subject_fidelity", "prompt_fidelity", "diversity"):
            assert now[key] == pytest.approx(then[key], abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# CLI errors: one line, exit code 2
# ---------------------------------------------------------------------------------------------------


def one_line_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("tune: error:")
    return err


def test_cli_errors_are_one_line(lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "run directory" in one_line_error(["eval", str(tmp_path / "nope")], capsys)
    assert "not a tune run directory" in one_line_error(["eval", str(tmp_path)], capsys)
    err = one_line_error(["eval", str(lora_run), "--clip", str(tmp_path / "no-clip")], capsys)
    assert "CLIP model folder" in err and "--clip" in err
    assert "suite nope not found" in one_line_error(["eval", str(lora_run), "--suite", "nope"], capsys)
    assert "unknown value for --checkpoints" in one_line_error(
        ["eval", str(lora_run), "--checkpoints", "2"], capsys
    )
