"""Training speed of the lora, dreambooth and textual_inversion recipes beside a plain diffusers-style loop.

    python bench/train_speed.py [--recipes lora dreambooth textual_inversion] [--preset tiny]
        [--resolution 64] [--batch-size 1] [--photos 4] [--warmup 10] [--steps 40] [--threads 1]
        [--repeats 3] [--mixed-precision no] [--name cpu-tiny-64] [--note TEXT] [--set key=value ...]

Both sides train the same model (a freshly built `--preset` pipeline in SD1.5's topology, saved once),
on the same photos (the first `--photos` of concepts/sks-toy), at the same resolution, batch size,
learning rate and precision. The baseline is written the way diffusers' example scripts are
(train_text_to_image_lora.py, train_dreambooth.py, textual_inversion.py): a torch DataLoader that
decodes and resizes the photos every step, the VAE encoding them and the text encoder running every
step, no caching, peft LoRA on the cross-attention projections (or the whole U-Net, or the new token's
embedding) with AdamW through accelerate. Ours is the recipe's `main()` with sampling off and one
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "concepts" / "sks-toy" / "photos"
RESULTS = ROOT / "bench" / "results"
RECIPES = ("lora", "dreambooth", "textual_inversion")
PROMPT = "a photo of sks toy"
LR = {"lora": 1e-4, "dreambooth": 5e-6, "textual_inversion": 5e-4}
LORA_TARGETS = r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)"  # the lora recipe's default (attn2)


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


# ------------------------------------------------------------------------------------ the baseline


def run_baseline(
    args: argparse.Namespace,
    work: Path,
    on_step: Callable[[int, Any], None] | None = None,
    *,
    prompt: str = PROMPT,
    lr: float | None = None,
    lora_targets: str = LORA_TARGETS,
) -> dict[str, Any]:
    """The diffusers example scripts' loop, condensed: no caching, VAE and text encoder every step.
    `on_step(step, unet)` runs after each optimizer step, once its time is taken (bench/time_to_quality.py
    scores the LoRA there); `prompt` captions every photo, `lr` (default: LR of the recipe) and `lora_targets`
    (a peft regex) are what the adapter trains at and on."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.time()
    torch.manual_seed(args.seed)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(args.base, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(args.recipe == "dreambooth")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )

    placeholder_id = None
    if args.recipe == "lora":
        from peft import LoraConfig

        unet.to(accelerator.device, dtype=weight_dtype)
        config = LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=lora_targets,
        )
        unet.add_adapter(config)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = [p for p in unet.parameters() if p.requires_grad]
    elif args.recipe == "dreambooth":
        params = list(unet.parameters())
    else:  # textual inversion: a new token initialised from "toy"; the whole embedding matrix is optimized
        tokenizer.add_tokens("<sks>")
        placeholder_id = tokenizer.convert_tokens_to_ids("<sks>")
        initializer_id = tokenizer.encode("toy", add_special_tokens=False)[0]
        text_encoder.resize_token_embeddings(len(tokenizer))
        embeds = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeds[placeholder_id] = embeds[initializer_id].clone()
        text_encoder.get_input_embeddings().requires_grad_(True)
        params = list(text_encoder.get_input_embeddings().parameters())
        unet.to(accelerator.device, dtype=weight_dtype)
    prompt = prompt.replace("sks", "<sks>") if placeholder_id is not None else prompt
    optimizer = torch.optim.AdamW(params, lr=lr or LR[args.recipe], weight_decay=0.0)

    files = sorted(Path(args.photos_dir).iterdir())

    class PhotoDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            image = Image.open(files[i]).convert("RGB")
            side = min(image.size)  # Resize(resolution) + CenterCrop(resolution) + Normalize([0.5], [0.5])
            scale = args.resolution / side
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            left, top = (image.width - args.resolution) // 2, (image.height - args.resolution) // 2
            image = image.crop((left, top, left + args.resolution, top + args.resolution))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            ids = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
            return {"pixel_values": pixels, "input_ids": ids}

    loader = torch.utils.data.DataLoader(
        PhotoDataset(), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    total = args.warmup + args.steps
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    trained = text_encoder if args.recipe == "textual_inversion" else unet
    trained, optimizer, loader, lr_scheduler = accelerator.prepare(trained, optimizer, loader, lr_scheduler)
    vae.to(accelerator.device, dtype=weight_dtype)
    if args.recipe == "textual_inversion":
        orig_embeds = accelerator.unwrap_model(trained).get_input_embeddings().weight.data.clone()
        unet_model, text_model = unet, trained
    else:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
        unet_model, text_model = trained, text_encoder

    times: list[float] = []
    step = 0
    while step < total:
        for batch in loader:
            with accelerator.accumulate(trained):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
                )
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_model(batch["input_ids"], return_dict=False)[0].to(
                    dtype=weight_dtype
                )
                model_pred = unet_model(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":  # as the examples do
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                if placeholder_id is not None:  # keep every other row of the embedding as it was
                    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
                    index_no_updates[placeholder_id] = False
                    with torch.no_grad():
                        embeds = accelerator.unwrap_model(trained).get_input_embeddings().weight
                        embeds[index_no_updates] = orig_embeds[index_no_updates]
            if accelerator.sync_gradients:
                step += 1
                final_loss = loss.detach().item()  # the example logs it every step
                times.append(time.time())
                if on_step is not None:
                    on_step(step, unet_model)
                if step >= total:
                    break
    return {"times": times, "start": start, "final_loss": final_loss}


def run_breakdown(args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds of each part of a baseline lora step, timed alone: what caching can and cannot save."""
    import numpy as np
    import torch
    from peft import LoraConfig
    from PIL import Image

    from tune.models import load_pipeline

    pipe = load_pipeline(args.base)
    vae, text_encoder, unet, tokenizer = pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    )
    optimizer = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=1e-4)
    files = sorted(Path(args.photos_dir).iterdir())
    side = args.resolution

    def load_photo() -> torch.Tensor:
        image = Image.open(files[0]).convert("RGB")
        scale = side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels[None].repeat(args.batch_size, 1, 1, 1)

    ids = tokenizer(
        [PROMPT] * args.batch_size, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    pixels = load_photo()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        hidden = text_encoder(ids)[0]
    timesteps = torch.full((args.batch_size,), 500)

    def unet_step() -> None:
        unet(latents, timesteps, hidden).sample.float().pow(2).mean().backward()

    parts = {
        "photo_decode_resize": load_photo,
        "vae_encode": lambda: vae.encode(pixels).latent_dist.sample(),
        "text_encoder": lambda: text_encoder(ids)[0],
        "unet_forward_backward": unet_step,
        "adamw_step": optimizer.step,
    }
    out = {}
    for name, fn in parts.items():
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        out[name + "_ms"] = 1000 * (time.perf_counter() - start) / args.steps
    return out


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
