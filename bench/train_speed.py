"""Training speed of the lora, dreambooth and textual_inversion recipes beside a plain diffusers-style loop.

    python bench/train_speed.py [--recipes lora dreambooth textual_inversion] [--preset tiny]
        [--resolution 64] [--batch-size 1] [--photos 4] [--warmup 10] [--steps 40] [--threads 1]
        [--repeats 3] [--mixed-precision no] [--name cpu-tiny-64] [--note TEXT] [--set key=value ...]

Both sides train the same model (a freshly built `--preset` pipeline in SD1.5's topology, saved once),
on the same photos (the first `--photos` of concepts/sks-toy), at the same resolution, batch size,
learning rate and precision. The baseline (bench/baseline_loop.py) is written the way diffusers'
example scripts are (train_text_to_image_lora.py, train_dreambooth.py, textual_inversion.py): a torch
DataLoader that decodes and resizes the photos every step, the VAE encoding them and the text encoder
running every step, no caching, peft LoRA on the cross-attention projections (or the whole U-Net, or
the new token's embedding) with AdamW through accelerate. Ours is the recipe's `main()` with sampling off and one
checkpoint at the end.

Each side runs `--repeats` times in its own child process (so peak RSS is its own), alternating with
the other side; the fastest run counts (the least disturbed by other load). Each reports:
- marginal s/step: the wall time of steps warmup..warmup+steps divided by `steps` (setup, warm-up,
  the final checkpoint and export excluded); images/s = batch size / that.
- time to first step: from the start (loading the model) to the end of optimizer step 1.
- peak RSS (getrusage) and, on a GPU, peak allocated GPU memory.
The ratio is baseline s/step / ours. A last child times the parts of a baseline lora step alone (photo
decode, VAE encode, text encoder, U-Net forward + backward, AdamW): what caching can save and what not.
Results go to bench/results/<name>.json with the machine description; `--set key=value` passes
settings to our recipes (e.g. --set channels_last=true).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from baseline_loop import LR, PROMPT, run_baseline, run_breakdown  # bench/: the script's folder

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "concepts" / "sks-toy" / "photos"
RESULTS = ROOT / "bench" / "results"
RECIPES = ("lora", "dreambooth", "textual_inversion")


# ------------------------------------------------------------------------------------ shared helpers


def peak_memory() -> dict[str, float]:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def marginal(times: list[float], warmup: int, steps: int) -> float:
    """Seconds per step over steps warmup+1 .. warmup+steps (times[i] = end of step i + 1)."""
    return (times[warmup + steps - 1] - times[warmup - 1]) / steps


# ------------------------------------------------------------------------------------ ours


def run_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import importlib

    from tune.config import load_config
    from tune.runs import read_metrics

    recipe = importlib.import_module(f"recipes.{args.recipe}")
    total = args.warmup + args.steps
    overrides = [
        f"base_model={args.base}",
        f"instance_dir={args.photos_dir}",
        f"instance_prompt={PROMPT}",
        "token=sks",
        f"output_dir={work / 'run'}",
        f"data.cache_dir={work / 'cache'}",
        f"resolution={args.resolution}",
        f"batch_size={args.batch_size}",
        f"max_steps={total}",
        "sample_every=0",
        "checkpoint_every=0",
        f"mixed_precision={args.mixed_precision}",
        f"optim.lr={LR[args.recipe]}",
        "optim.warmup_steps=0",
        "optim.weight_decay=0.0",
        f"seed={args.seed}",
    ]
    if args.recipe == "lora":
        overrides.append(f"lora.rank={args.rank}")
    if args.recipe == "dreambooth":
        overrides += ["prior.enabled=false", "ema=false", "export_single_file=false"]
    if args.recipe == "textual_inversion":
        overrides.append("initializer_token=toy")
    cfg = load_config(recipe.Config, None, overrides + list(args.set))
    start = time.time()
    run = recipe.main(cfg)
    rows = [m for m in read_metrics(run.path / "metrics.jsonl") if "loss" in m]
    times = [m["time"] for m in rows]
    return {"times": times, "start": start, "final_loss": rows[-1]["loss"]}


# ------------------------------------------------------------------------------------ parent


def build_base(preset: str, folder: Path) -> dict[str, Any]:
    from tune.models import build_pipeline

    pipe = build_pipeline(preset, seed=0)
    pipe.save_pretrained(folder)
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    return {
        "preset": preset,
        "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
        "attention_processors": processors,
    }


def machine(threads: int) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random tiny weights make denormals, slow on CPUs; as in the tests
    work = Path(args.work)
    if args.side == "breakdown":
        Path(args.out).write_text(json.dumps(run_breakdown(args)))
        return
    result = (run_baseline if args.side == "baseline" else run_ours)(args, work)
    times = result["times"]
    s_per_step = marginal(times, args.warmup, args.steps)
    out = {
        "recipe": args.recipe,
        "side": args.side,
        "s_per_step": s_per_step,
        "steps_per_s": 1 / s_per_step,
        "images_per_s": args.batch_size / s_per_step,
        "time_to_first_step_s": times[0] - result["start"],
        "final_loss": result["final_loss"],
        **peak_memory(),
    }
    Path(args.out).write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per side, alternating; the fastest counts (least disturbed)",
    )
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--name", default="", help="results file name (default: <device>-<preset>-<resolution>)"
    )
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--set", nargs="*", default=[], help="key=value settings for our recipes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("recipe", "side", "work", "out", "base", "photos-dir"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        tmp_path = Path(tmp)
        base = tmp_path / "base"
        model = build_base(args.preset, base)
        photos = tmp_path / "photos"
        photos.mkdir()
        for path in sorted(PHOTOS.glob("*.jpg"))[: args.photos]:
            shutil.copy(path, photos / path.name)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        rows = []
        info = machine(args.threads)
        jobs = [
            (r, side, i) for i in range(args.repeats) for r in args.recipes for side in ("baseline", "ours")
        ]
        for recipe, side, i in jobs + [("lora", "breakdown", 0)]:
            work = tmp_path / f"{recipe}-{side}-{i}"
            work.mkdir()
            out = work / "result.json"
            command = [
                sys.executable,
                __file__,
                "--child",
                *["--recipe", recipe, "--side", side, "--work", str(work), "--out", str(out)],
                *["--base", str(base), "--photos-dir", str(photos), "--resolution", str(args.resolution)],
                *["--batch-size", str(args.batch_size), "--rank", str(args.rank)],
                *[
                    "--warmup",
                    str(args.warmup),
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                ],
                *["--mixed-precision", args.mixed_precision, "--seed", str(args.seed)],
                *(["--set", *args.set] if args.set else []),
            ]
            print(f"{recipe} / {side} ...", flush=True)
            subprocess.run(command, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            if side == "breakdown":
                breakdown = json.loads(out.read_text())
            else:
                rows.append(json.loads(out.read_text()))

    table = []
    base_lora_ms = min(
        (1000 * r["s_per_step"] for r in rows if r["recipe"] == "lora" and r["side"] == "baseline"), default=0
    )
    for recipe in args.recipes:
        base_row, ours = (
            min(
                (r for r in rows if r["recipe"] == recipe and r["side"] == s),
                key=lambda r: r["s_per_step"],
            )
            for s in ("baseline", "ours")
        )
        for row in (base_row, ours):
            row["s_per_step_each_repeat"] = [
                r["s_per_step"] for r in rows if r["recipe"] == recipe and r["side"] == row["side"]
            ]
        table.append(
            {
                "recipe": recipe,
                "ratio": base_row["s_per_step"] / ours["s_per_step"],
                "baseline": base_row,
                "ours": ours,
            }
        )
    print()
    header = f"{'recipe':<18} {'side':<9} {'ms/step':>8} {'steps/s':>8} {'img/s':>7} {'first step s':>12} {'peak RSS MB':>11}"
    gpu = "peak_gpu_mb" in rows[0]
    print(header + (f" {'peak GPU MB':>11}" if gpu else "") + f" {'ratio':>6}")
    for entry in table:
        for side in ("baseline", "ours"):
            r = entry[side]
            line = (
                f"{entry['recipe']:<18} {side:<9} {1000 * r['s_per_step']:>8.1f} {r['steps_per_s']:>8.2f} "
                f"{r['images_per_s']:>7.2f} {r['time_to_first_step_s']:>12.2f} {r['peak_rss_mb']:>11.0f}"
            )
            if gpu:
                line += f" {r['peak_gpu_mb']:>11.0f}"
            if side == "ours":
                line += f" {entry['ratio']:>5.2f}x"
            print(line)
    print("\nparts of a baseline lora step, each timed alone (ms):")
    for key, ms in breakdown.items():
        print(f"  {key.removesuffix('_ms'):<24} {ms:7.2f}")
    cached = sum(breakdown[k] for k in ("photo_decode_resize_ms", "vae_encode_ms", "text_encoder_ms"))
    print(
        f"  caching removes {cached:.1f} ms of a {base_lora_ms:.1f} ms baseline step" if base_lora_ms else ""
    )
    name = args.name or f"{'gpu' if gpu else 'cpu'}-{args.preset}-{args.resolution}"
    result = {
        "name": name,
        "command": shlex.join(["python", "bench/train_speed.py", *sys.argv[1:]]),
        "settings": {
            "preset": args.preset,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "photos": args.photos,
            "lora_rank": args.rank,
            "warmup_steps": args.warmup,
            "measured_steps": args.steps,
            "repeats": args.repeats,
            "mixed_precision": args.mixed_precision,
            "ours_settings": list(args.set),
        },
        "model": model,
        "machine": info,
        "note": args.note,
        "results": table,
        "baseline_lora_step_breakdown": breakdown,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
