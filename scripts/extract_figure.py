"""The issue-21 extract and resize figures: a dreambooth run on the example subject (the default config plus
the overrides given; an OUT_DIR/db that holds a finished run is used as it is), its export and LoRAs
extracted from it (rank 32; rank 32 with conv rank 32; that one resized to 8; a pivotal run's token loaded
beside each) drawn on the backgrounds suite: subject_found, background_right, errors, pixel differences.

    python scripts/extract_figure.py OUT_DIR [dreambooth overrides ...]
"""

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

from recipes import dreambooth
from tune.config import load_config
from tune.embeddings import EMBEDDINGS_FILE
from tune.evaluation import Evaluator, load_suite
from tune.evaluation.run_dir import run_guidance, run_subject
from tune.lora import LoraStack, read_lora
from tune.lora.svd import extract_lora_file, resize_lora_file, summarize_errors
from tune.models import load_pipeline
from tune.personalize.weights import apply_embeddings
from tune.runs import read_run

out = Path(sys.argv[1])
run_path = out / "db"
t0 = time.time()
if not (run_path / "DONE").exists():
    overrides = ["concept=concepts/sks-toy", f"output_dir={run_path}", "sample_every=0", *sys.argv[2:]]
    dreambooth.main(load_config(dreambooth.Config, "recipes/configs/dreambooth/default.toml", overrides))
print(f"dreambooth run: {time.time() - t0:.0f} s", flush=True)
run = read_run(run_path)
suite = load_suite("backgrounds").drawn_at(run_guidance(run))
evaluator = Evaluator(suite, run_subject(run), out, clip="models/world-clip")
results = {}
entry = evaluator.evaluate(load_pipeline(run_path / "export" / "pipeline"), 1, progress=False)
results["dreambooth export"] = {k: entry.get(k) for k in ("subject_found", "background_right")}
print(results, flush=True)
files = {}
for step, (rank, conv_rank) in enumerate([(32, 0), (32, 32)], start=2):
    file, _, errors = extract_lora_file(
        run_path, out / f"r{rank}c{conv_rank}.safetensors", rank=rank, conv_rank=conv_rank, force=True
    )
    files[step] = file
    results[file.stem] = {"errors": {k: round(v, 4) for k, v in summarize_errors(errors).items()}}
file, _, errors = resize_lora_file(files[3], out / "r8_resized.safetensors", rank=8, force=True)
files[4] = file
results[file.stem] = {"errors": {k: round(v, 4) for k, v in summarize_errors(errors).items()}}
for step, file in files.items():
    base = load_pipeline(run.info["base_model"])
    stack = LoraStack(base)
    stack.add(read_lora(file), 1.0, name="x")
    # a pivotal run's trigger is a trained token: its embedding goes beside the LoRA, as users load them
    embedding = run_path / "export" / EMBEDDINGS_FILE
    with apply_embeddings(base, embedding) if embedding.exists() else nullcontext():
        entry = evaluator.evaluate(base, step, progress=False)
    results[file.stem] |= {k: entry.get(k) for k in ("subject_found", "background_right")}
    print(file.stem, results[file.stem], f"{time.time() - t0:.0f} s", flush=True)


def pixels(step: int) -> list[np.ndarray]:
    folder = evaluator.eval_dir / f"step_{step:06d}"
    return [np.asarray(Image.open(p)).astype(float) for p in sorted(folder.glob("p*_s*.png"))]


for a, b in ((1, 3), (3, 4), (1, 2)):
    diff = float(np.mean([np.abs(x - y).mean() for x, y in zip(pixels(a), pixels(b), strict=True)]))
    results[f"mean abs pixel diff step {a} vs {b}"] = round(diff, 2)
print(json.dumps(results, indent=2))
(out / "figure.json").write_text(json.dumps(results, indent=2))
