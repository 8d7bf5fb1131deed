"""`tune eval`: score a personalization run's base model and checkpoints on one suite of prompts.

The base model and every complete checkpoint (lora: its adapter; dreambooth: its U-Net, the EMA
weights where kept; textual_inversion: its embedding) draw the suite's prompts x seeds through the
shared sampler into `<folder>/<label>/`, are scored with `tune.metrics`, and the verdict (best step,
overfit) is written to `<folder>/report.json` and `report.md`. The folder is the suite's own
(`suite_eval_dir`): `RUN_DIR/eval/` for the default suite, `RUN_DIR/eval/<suite name>/` for any other,
so running several suites keeps every report. The lora and dreambooth recipes run the same
evaluation in-process every `eval_every` steps (`start_training_eval`), into the same folder, and keep
the best step's weights in export/best/.

One job per module:

    suites       load_suite(name | path) -> Suite, find_suite         eval/*.toml, read strictly
                 suite_eval_dir(run_path, suite_name)                where a suite's report goes
    report       decide(base, checkpoints) -> best_step, overfit, reason
                 format_markdown, format_summary                     torch-free: the verdict, report.md
    evaluator    Evaluator(suite, subject, run_path): evaluate(pipe, step), write(), resume()
                 start_training_eval (eval_every)                    draw, score, keep the report
    run_dir      evaluate_run(run_dir, suite), run_subject(run)      a run directory, base + checkpoints
                 run_guidance(run)                                   its sample.guidance (guidance "run")

Each checkpoint's weights go into the base pipeline, and out again, through
`tune.personalize.weights.apply_run_weights`, which the dashboard's live images use too.
The base may be SD1.x, SD2.x or SDXL: the shared sampler draws with the family's diffusers pipeline
at the model's native size, and CLIP, DINO and the world judge resize whatever comes out to their own
input size.
The metrics are described in `evaluator`, report.json's layout in `report`; the command,
`tune eval`, is `tune.cli.eval`.
No module imports torch at import time, so importing this package (and `report`) stays light.

Every public name is re-exported, so `from tune import evaluation; evaluation.load_suite(...)` and
`from tune.evaluation import decide` work as they did when this package was one module.
"""

from tune.evaluation.evaluator import (
    EvalSubject,
    Evaluator,
    load_photos,
    start_training_eval,
)
from tune.evaluation.report import (
    DIVERSITY_KEEP,
    METRICS,
    PROMPT_KEEP,
    decide,
    format_markdown,
    format_summary,
)
from tune.evaluation.run_dir import evaluate_run, run_guidance, run_subject
from tune.evaluation.suites import (
    DEFAULT_SUITE,
    SUITES_DIR,
    Suite,
    find_suite,
    load_suite,
    suite_eval_dir,
    suite_folder,
)

__all__ = [
    "DEFAULT_SUITE",
    "DIVERSITY_KEEP",
    "EvalSubject",
    "Evaluator",
    "METRICS",
    "PROMPT_KEEP",
    "SUITES_DIR",
    "Suite",
    "decide",
    "evaluate_run",
    "find_suite",
    "format_markdown",
    "format_summary",
    "load_photos",
    "load_suite",
    "run_guidance",
    "run_subject",
    "start_training_eval",
    "suite_eval_dir",
    "suite_folder",
]
