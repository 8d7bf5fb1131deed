"""Seconds per LoRA training step on the tiny presets of each family (SD1, SD2, SDXL), on this CPU.

    python bench/family_step_times.py [--steps 10] [--out bench/results/family-step-times.json]

attn2 adapters of rank 8, AdamW, one photo at the preset's native size, one torch thread; the presets take
turns step by step (alternating the order each round) after 3 warm-up rounds, so a busy machine slows all
of them alike. The step is the recipes' own: `tune.diffusion.diffusion_step` with the family's text
conditioning (`tune.models.conditioning`; SDXL adds pooled embeds and size/crop time ids).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from tune.diffusion import DiffusionConfig, diffusion_step
from tune.lora.inject import inject_lora
from tune.models import build_pipeline
from tune.models.conditioning import TextEncoders, add_time_ids, added_cond_kwargs
from tune.sampling import native_size

PRESETS = ("tiny", "tiny-sd2", "tiny-sdxl-shallow", "tiny-sdxl")
WARMUP = 3


def tokenize(tokenizer, prompt: str) -> torch.Tensor:  # noqa: ANN001 - any CLIP tokenizer
    return tokenizer(
        [prompt],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def lora_step(preset: str) -> tuple[Callable[[int], float], int, int]:
    """A function that runs one training step and returns its seconds; the adapted modules; the side."""
    pipe = build_pipeline(preset, seed=0)
    unet = pipe.unet.train()
    inject_lora(unet, pipe.text_encoder, ["attn2"], 8, 8.0)
    params = [q for q in unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    second = getattr(pipe, "tokenizer_2", None)
    with torch.no_grad():
        hidden, pooled = TextEncoders.of(pipe)(
            tokenize(pipe.tokenizer, "a photo of sks toy"),
            tokenize(second, "a photo of sks toy") if second else None,
        )
    side = native_size(pipe)[0]
    latents = torch.randn(
        1, unet.config.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor
    )
    time_ids = add_time_ids(torch.tensor([[side, side]]), torch.tensor([[0, 0]]), (side, side))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def step(i: int) -> float:
        start = time.perf_counter()
        loss = diffusion_step(
            unet,
            scheduler,
            latents,
            hidden,
            DiffusionConfig(),
            torch.Generator().manual_seed(i),
            added_cond_kwargs=added_cond_kwargs(pooled, time_ids),
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, len(params) // 2, side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per preset (default: 10)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/family-step-times.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = {name: lora_step(name) for name in PRESETS}
    times: dict[str, list[float]] = {name: [] for name in PRESETS}
    for round_ in range(WARMUP + args.steps):
        for name in PRESETS if round_ % 2 == 0 else PRESETS[::-1]:
            seconds = steps[name][0](round_)
            if round_ >= WARMUP:
                times[name].append(seconds)
    results = {}
    for name in PRESETS:
        _, modules, side = steps[name]
        median = statistics.median(times[name])
        results[name] = {"adapted_modules": modules, "side_px": side, "median_s": round(median, 4)}
        print(f"{name:18s} {side:3d} px {modules:4d} adapted modules  {median:.4f} s/step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": 1, "steps": args.steps, "presets": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
