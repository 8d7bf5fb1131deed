"""The shared sampler: prompts x seeds -> images, grids and denoising trajectories.

Every recipe (validation samples), `tune eval`, the dashboard and `tune sample` generate through
`generate()`, which runs diffusers' own pipeline of the model's family (`PIPELINES`: StableDiffusionPipeline
for SD1.x and SD2.x, StableDiffusionXLPipeline for SDXL, and their img2img classes for an init image), so
what we show is what diffusers users get from the same weights and settings.

Reproducibility: image (prompt i, seed s) starts from `torch.Generator("cpu").manual_seed(s)`, so on a
CPU the same settings give the bit-identical image, and a seed means the same image whatever other
prompts or seeds are in the call (one image per pipeline call unless `batch_size` > 1, which is
faster on a GPU but may change the lowest bits).

Files written by `sample_grid(pipe, prompts, seeds, out_dir)` (recipes call it for validation into
`<run>/samples/step_XXXXXX/`, and the dashboard reads that folder):

    p{i:02d}_s{seed}.png             one image: prompt index i (0-based), seed as given (e.g. p00_s0.png)
    p{i:02d}_s{seed}_trajectory.png  its film strip, only with trajectory_every > 0
    grid.png                         all images: one row per prompt, one column per seed, labelled
    prompts.json                     index: {"prompts": [...], "seeds": [...], every generate()
                                     setting ("negative_prompt", "steps", "guidance", "scheduler" (the
                                     class name when the model's own), "width", "height", "init_image",
                                     "strength" (null without init image), "trajectory_every",
                                     "batch_size"), "grid": "grid.png", "images": [{"file",
                                     "prompt_index", "prompt", "seed", "trajectory" (file or null)}]}

Trajectories (`trajectory_every=K`): a frame every K denoising steps, decoded from the scheduler's
prediction of the clean latents x0 (see `tune.trajectories`). The strip holds ceil(n / K) frames for n
denoising steps, left (early, noisy) to right, and the last frame is always the final image.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from tqdm.auto import tqdm

from tune import attention as attn
from tune.errors import ConfigError, DataError
from tune.grids import make_film_strip, make_grid
from tune.models.families import Family, family_of_pipeline
from tune.trajectories import Trajectory

logger = logging.getLogger(__name__)

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
"""Scheduler names accepted everywhere (CLI, configs, dashboard) -> diffusers classes. Each is built
`from_config(pipe.scheduler.config)`, so it keeps the model's noise schedule and prediction type."""

PIPELINES: dict[Family, tuple[type[DiffusionPipeline], type[DiffusionPipeline]]] = {
    "sd1": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline),
    "sd2": (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline),
    "sdxl": (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline),
}
"""(text-to-image, img2img) diffusers pipeline classes of each family (SD2's scheduler says v-prediction)."""

DEFAULT_MODEL = "models/world-base"
IMAGE_NAME = "p{i:02d}_s{seed}.png"
TRAJECTORY_NAME = "p{i:02d}_s{seed}_trajectory.png"
GRID_NAME = "grid.png"
INDEX_NAME = "prompts.json"


@dataclass(frozen=True)
class Sample:
    """One generated image and how it was made."""

    prompt: str
    seed: int
    prompt_index: int
    image: Image.Image
    frames: tuple[Image.Image, ...] = field(default=(), repr=False)
    """Trajectory frames, early to late, the last one equal to `image`; empty without a trajectory."""
    attention: Any = field(default=None, repr=False)
    """`tune.attention.AttentionMaps` with `generate(..., attention=True)`, else None."""

    def film_strip(self) -> Image.Image | None:
        """The frames side by side (None without a trajectory)."""
        return make_film_strip(self.frames) if self.frames else None


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------


def build_scheduler(pipe: DiffusionPipeline, name: str | None = None) -> SchedulerMixin:
    """A fresh scheduler: `name` from SCHEDULERS, or the pipeline's own class when None.

    Always a new instance, so sampling never changes the state or class of `pipe.scheduler`.
    """
    if name is None:
        cls: type[SchedulerMixin] = type(pipe.scheduler)
    elif name in SCHEDULERS:
        cls = SCHEDULERS[name]
    else:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return cls.from_config(pipe.scheduler.config)


def native_size(pipe: DiffusionPipeline) -> tuple[int, int]:
    """(width, height) the model was trained at: unet sample size x the VAE's downsampling factor."""
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return side, side


def check_size(pipe: DiffusionPipeline, width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height) with None replaced by the native size; both must be multiples of the latent
    grid (the VAE factor) and of 8 (diffusers' own requirement)."""
    native_w, native_h = native_size(pipe)
    width = native_w if width is None else int(width)
    height = native_h if height is None else int(height)
    multiple = math.lcm(8, int(pipe.vae_scale_factor))
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise ConfigError(f"{name} must be a positive multiple of {multiple}; got {value}")
    return width, height


def load_init_image(image: Image.Image | str | Path, width: int, height: int) -> Image.Image:
    """An init image for img2img as RGB at (width, height), resized if needed."""
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"init image not found: {path}")
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            raise DataError(f"cannot read init image {path}: {err}") from err
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def _sampling_pipeline(pipe: DiffusionPipeline, scheduler: SchedulerMixin, *, img2img: bool) -> Any:
    """A pipeline object of the family's class sharing `pipe`'s modules but with its own scheduler.

    Built directly rather than with `from_pipe`: `from_pipe` ends with `.to(torch_dtype or float32)`,
    which would cast the caller's shared (say fp16) modules in place. Constructing is cheap (no copies).
    """
    family = family_of_pipeline(pipe)
    cls = PIPELINES[family][1 if img2img else 0]
    expected = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in pipe.components.items() if k in expected}
    components["scheduler"] = scheduler
    if family == "sdxl":
        # The caller's choices carry over: zeros for an empty negative prompt (the SDXL base's default)
        # and its watermarker (set after construction, so building ours never imports one). The base
        # model, unlike the refiner, has no aesthetic-score conditioning.
        options: dict[str, Any] = {
            "force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt", True),
            "add_watermarker": False,
        }
        if img2img:
            options["requires_aesthetics_score"] = False
        view = cls(**components, **options)
        view.watermark = getattr(pipe, "watermark", None)
    else:
        # requires_safety_checker only controls a warning about a missing checker; the caller already
        # decided about that when building `pipe`. A present checker still runs.
        view = cls(**components, requires_safety_checker=False)
    view.set_progress_bar_config(
        **getattr(pipe, "_progress_bar_config", {})
    )  # e.g. the caller's disable=True
    return view


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------


def generate(
    pipe: DiffusionPipeline,
    prompts: str | Sequence[str],
    seeds: int | Sequence[int],
    *,
    negative_prompt: str | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    scheduler: str | None = None,
    width: int | None = None,
    height: int | None = None,
    init_image: Image.Image | str | Path | None = None,
    strength: float = 0.75,
    trajectory_every: int = 0,
    batch_size: int = 1,
    paired: bool = False,
    progress: bool = True,
    attention: bool = False,
) -> list[Sample]:
    """Images for every prompt x seed, prompt-major: result[i * len(seeds) + j] is (prompts[i], seeds[j]);
    with `paired`, one image per (prompts[i], seeds[i]) instead (the lists must be the same length).

    - guidance: classifier-free guidance scale; <= 1 turns guidance (and the negative prompt) off.
    - scheduler: a SCHEDULERS name, or None for the pipeline's own scheduler class.
    - width/height: default to the model's native size; the init image is resized to them.
    - init_image + strength: img2img; `int(steps * strength)` denoising steps are run (at least 1).
    - trajectory_every: K > 0 also records a frame every K steps (see the module docstring).
    - batch_size: images per pipeline call (prompts may differ within a call); 1 keeps each image
      independent of the others in the call.
    - attention: also record each image's cross-attention maps (`tune.attention`; same images).

    `pipe` is not modified: the scheduler is a fresh instance on a pipeline object that shares its
    modules. With more than one image, our own progress bar replaces the pipeline's per-step bar.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    seed_list = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not prompt_list or not seed_list:
        raise ConfigError("need at least one prompt and one seed")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1; got {steps}")
    if trajectory_every < 0:
        raise ConfigError(f"trajectory every K steps needs K >= 1 (0 = off); got {trajectory_every}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    if paired and len(prompt_list) != len(seed_list):
        raise ConfigError(
            f"paired prompts and seeds must match: {len(prompt_list)} prompts, {len(seed_list)} seeds"
        )
    width, height = check_size(pipe, width, height)
    img2img = init_image is not None
    call_args: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="pil")
    if img2img:
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"strength must be in [0, 1]; got {strength}")
        if int(steps * strength) < 1:
            raise ConfigError(
                f"strength {strength} with {steps} steps runs no denoising step; "
                f"use strength >= {1 / steps:.3g} or more steps"
            )
        call_args.update(image=load_init_image(init_image, width, height), strength=strength)  # type: ignore[arg-type]
    else:
        call_args.update(width=width, height=height)

    sampler = _sampling_pipeline(pipe, build_scheduler(pipe, scheduler), img2img=img2img)
    trajectory = Trajectory(trajectory_every, sampler.scheduler) if trajectory_every else None
    if trajectory is not None:
        call_args.update(callback_on_step_end=trajectory, callback_on_step_end_tensor_inputs=["latents"])
    if paired:
        jobs = [(i, p, s) for i, (p, s) in enumerate(zip(prompt_list, seed_list, strict=True))]
    else:
        jobs = [(i, p, s) for i, p in enumerate(prompt_list) for s in seed_list]
    ours = progress and len(jobs) > 1
    if ours or not progress:
        sampler.set_progress_bar_config(disable=True)

    samples: list[Sample] = []
    recorder = attn.record_attention(pipe.unet) if attention else contextlib.nullcontext()
    latent_hw = (height // int(pipe.vae_scale_factor), width // int(pipe.vae_scale_factor))
    with recorder as store, tqdm(total=len(jobs), desc="sampling", unit="image", disable=not ours) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            n = len(chunk)
            if trajectory is not None:
                trajectory.reset(n)
            if store is not None:
                store.reset(n)
            batch_args = dict(call_args)
            if img2img:
                batch_args["image"] = [call_args["image"]] * n
            images = sampler(
                prompt=[prompt for _, prompt, _ in chunk],
                negative_prompt=[negative_prompt] * n if negative_prompt is not None else None,
                generator=[torch.Generator("cpu").manual_seed(seed) for _, _, seed in chunk],
                **batch_args,
            ).images
            for k, ((i, prompt, seed), image) in enumerate(zip(chunk, images, strict=True)):
                frames = (*trajectory.frames[k], image) if trajectory is not None else ()
                maps = None
                if store is not None:
                    tokens = attn.prompt_tokens(prompt, pipe.tokenizer)
                    maps = attn.AttentionMaps(store.maps(k, latent_hw), tokens)
                samples.append(Sample(prompt, seed, i, image, frames, maps))
            bar.update(n)
    return samples


def sample_grid(
    pipe: DiffusionPipeline,
    prompts: str | Sequence[str],
    seeds: int | Sequence[int],
    out_dir: str | Path,
    **kwargs: Any,
) -> list[Sample]:
    """`generate(pipe, prompts, seeds, **kwargs)` and write the images, `grid.png` and `prompts.json`
    into `out_dir` (created if missing; see the module docstring for the names)."""
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    seed_list = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    samples = generate(pipe, prompt_list, seed_list, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for sample in samples:
        name = IMAGE_NAME.format(i=sample.prompt_index, seed=sample.seed)
        sample.image.save(out / name, format="PNG")
        strip = sample.film_strip()
        strip_name = None
        if strip is not None:
            strip_name = TRAJECTORY_NAME.format(i=sample.prompt_index, seed=sample.seed)
            strip.save(out / strip_name, format="PNG")
        entries.append(
            {
                "file": name,
                "prompt_index": sample.prompt_index,
                "prompt": sample.prompt,
                "seed": sample.seed,
                "trajectory": strip_name,
            }
        )
    grid = make_grid(
        [s.image for s in samples],
        len(prompt_list),
        len(seed_list),
        row_labels=[textwrap.shorten(p, 200) for p in prompt_list],
        col_labels=[f"seed {s}" for s in seed_list],
    )
    grid.save(out / GRID_NAME, format="PNG")
    # Every generate() setting, defaults included, so the folder alone says how it was sampled.
    settings = {
        name: kwargs.get(name, param.default)
        for name, param in inspect.signature(generate).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("progress", "attention")
    }
    init_image = settings.pop("init_image")
    if init_image is None:
        settings["strength"] = None
    first = samples[0].image
    index = {
        "prompts": prompt_list,
        "seeds": seed_list,
        **settings,
        "scheduler": settings["scheduler"] or type(pipe.scheduler).__name__,
        "width": first.width,
        "height": first.height,
        "init_image": None if init_image is None else str(getattr(init_image, "filename", "") or init_image),
        "grid": GRID_NAME,
        "images": entries,
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    logger.debug("wrote %d samples to %s", len(samples), out)
    return samples
