"""Fixture run directories for the dashboard, written with PIL and JSON only (no torch, no training).

conftest.py makes them per test (`runs_root`); the constants say what the tests expect to see.

`runs_root` holds:
    lora-sks/      a finished LoRA-like run: samples at steps 0 (base, one film strip) and 200, three
                   prompts (plain, red, blue background) x seeds 0 and 1, metrics, concept photos,
                   a complete checkpoint, export/*.safetensors (diffusers + kohya keys), eval/report.json
                   (the default suite's; `write_eval_report` adds another suite's)
    unet-stopped/  a run without DONE and without samples (status crashed)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tune.evaluation.suites import suite_eval_dir

PROMPTS = [
    "a photo of sks toy",
    "a photo of sks toy on a red background",
    "a photo of sks toy on a blue background",
]
SEEDS = [0, 1]
STEPS = [0, 200]
LORA_RUN = "lora-sks"
STOPPED_RUN = "unet-stopped"
IMAGES_PER_STEP = len(PROMPTS) * len(SEEDS)


def _image(color: tuple[int, int, int], mark: int, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(im).ellipse([4 + mark, 4 + mark, 20 + mark, 20 + mark], fill=(240, 120, 200))
    return im


def write_sample_set(
    folder: Path, prompts: list[str], seeds: list[int], shade: int, trajectory: bool
) -> None:
    """The tune.sampling.sample_grid layout: p{i:02d}_s{seed}.png, grid.png, prompts.json."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            name = f"p{i:02d}_s{seed}.png"
            _image((shade, 40 * i, 60 * seed), seed).save(folder / name)
            strip = None
            if trajectory and i == 0 and seed == 0:
                strip = f"p{i:02d}_s{seed}_trajectory.png"
                frames = [_image((255 - 50 * k, 50 * k, 0), k) for k in range(4)]
                film = Image.new("RGB", (32 * len(frames), 32))
                for k, frame in enumerate(frames):
                    film.paste(frame, (32 * k, 0))
                film.save(folder / strip)
            entries.append(
                {"file": name, "prompt_index": i, "prompt": prompt, "seed": seed, "trajectory": strip}
            )
    Image.new("RGB", (32 * len(seeds), 32 * len(prompts)), "white").save(folder / "grid.png")
    index = {
        "prompts": prompts,
        "seeds": seeds,
        "negative_prompt": None,
        "steps": 8,
        "guidance": 6.0,
        "scheduler": "DDIMScheduler",
        "width": 32,
        "height": 32,
        "init_image": None,
        "strength": None,
        "trajectory_every": 2 if trajectory else 0,
        "batch_size": 1,
        "grid": "grid.png",
        "images": entries,
    }
    (folder / "prompts.json").write_text(json.dumps(index, indent=2))


def _write_lora_file(path: Path, kohya: bool) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for block in ("down_blocks.0", "up_blocks.1"):
        for proj in ("to_k", "to_v"):
            stem = f"unet.{block}.attentions.0.transformer_blocks.0.attn2.{proj}"
            if kohya:
                k = "lora_" + stem.replace(".", "_")
                tensors[f"{k}.lora_down.weight"] = rng.standard_normal((4, 64)).astype(np.float16)
                tensors[f"{k}.lora_up.weight"] = rng.standard_normal((32, 4)).astype(np.float16)
                tensors[f"{k}.alpha"] = np.array(4.0, dtype=np.float16)
            else:
                tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((4, 64)).astype(np.float32)
                tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((32, 4)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"modelspec.trigger_phrase": "sks", "tune_step": "200"})


def make_lora_run(root: Path, concept: Path) -> Path:
    run = root / LORA_RUN
    run.mkdir(parents=True)
    info = {
        "recipe": "lora",
        "tune_version": "0.1.0",
        "started_at": "2026-01-02T10:00:00+00:00",
        "base_model": "models/world-base",
        "concept": str(concept),
        "concept_name": "sks-toy",
        "instance_dir": str(concept / "photos"),
        "instance_prompt": "a photo of sks toy",
        "class_prompt": "a photo of toy",
        "trigger": "sks",
        "max_steps": 200,
    }
    (run / "run.json").write_text(json.dumps(info, indent=2))
    (run / "config.toml").write_text(
        f'base_model = "models/world-base"\nconcept = "{concept}"\nmax_steps = 200\n\n[lora]\nrank = 4\n'
    )
    t0 = 1767348000.0  # 2026-01-02T10:00:00Z
    rows = [
        {"step": s, "time": t0 + 3 * s, "loss": 0.5 / (1 + s / 50), "lr": 5e-4} for s in range(1, 201, 10)
    ]
    # val_every = 100: the held-out photos' loss in rows of its own, at step 0, 100 and the end
    rows += [{"step": s, "time": t0 + 3 * s, "val_loss": 0.6 - s / 1000} for s in (0, 100, 191)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, shade in zip(STEPS, (60, 200), strict=True):
        write_sample_set(run / "samples" / f"step_{step:06d}", PROMPTS, SEEDS, shade, trajectory=step == 0)
    ckpt = run / "checkpoints" / "step_000200"
    _write_lora_file(ckpt / "lora.safetensors", kohya=False)
    (ckpt / "COMPLETE").write_text("")
    _write_lora_file(run / "export" / "pytorch_lora_weights.safetensors", kohya=False)
    _write_lora_file(run / "export" / f"{LORA_RUN}.safetensors", kohya=True)
    write_eval_report(run)
    (run / "DONE").write_text("2026-01-02T10:10:00+00:00")
    return run


def write_eval_report(
    run: Path,
    suite: str = "default",
    prompts: list[str] = PROMPTS[1:],
    fidelity: tuple[float, float] = (0.21, 0.62),
) -> None:
    """A `tune eval` report of `suite` (base and step 200, seed 0) where tune writes it: eval/ for the
    default suite, eval/<suite>/ for any other; `fidelity` is the two entries' subject_fidelity."""
    folder = suite_eval_dir(run, suite)
    images = folder.relative_to(run).as_posix()
    for label in ("base", "step_000200"):
        write_sample_set(folder / label, prompts, [0], 120, trajectory=False)
    scores = {"diversity": 0.3, "dino_fidelity": 0.4, "subject_found": 0.5, "background_right": 0.9}
    report = {
        "suite": suite,
        "clip_model": "models/world-clip",
        "dino_model": None,
        "prompts": prompts,
        "seeds": [0],
        "steps": 8,
        "guidance": 6.0,
        "base": {
            "label": "base",
            "step": 0,
            "subject_fidelity": fidelity[0],
            "prompt_fidelity": 0.30,
            **scores,
            "images": f"{images}/base/",
        },
        "checkpoints": [
            {
                "label": "step_000200",
                "step": 200,
                "subject_fidelity": fidelity[1],
                "prompt_fidelity": 0.27,
                **scores,
                "subject_parts": {"cls": 1.0, "color2": 0.25},
                "images": f"{images}/step_000200/",
            }
        ],
        "best_step": 200,
        "overfit": False,
        "overfit_reason": None,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2))


def make_stopped_run(root: Path) -> Path:
    run = root / STOPPED_RUN
    run.mkdir(parents=True)
    info = {"recipe": "unet", "started_at": "2026-01-01T09:00:00+00:00", "max_steps": 1800}
    (run / "run.json").write_text(json.dumps(info))
    (run / "config.toml").write_text('data_dir = "data/shapes-train"\nmax_steps = 1800\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "time": 1767258000.0, "loss": 0.9}\n{"step": 2, "ti')
    (run / "LOCK").write_text("pid 1 on nowhere")  # nobody holds it: the writer died
    return run


def make_concept(root: Path) -> Path:
    concept = root / "concepts" / "sks-toy"
    (concept / "photos").mkdir(parents=True)
    (concept / "concept.toml").write_text('token = "sks"\nclass_word = "toy"\ninstance_dir = "photos"\n')
    for i in range(3):
        _image((250, 200, 210), 3 * i, size=48).save(concept / "photos" / f"toy_{i}.jpg")
    return concept


def make_runs(root: Path) -> Path:
    """The runs folder of the module docstring under `root`/runs."""
    runs = root / "runs"
    make_lora_run(runs, make_concept(root))
    make_stopped_run(runs)
    return runs
