"""Denoising trajectories for the shared sampler (`tune.sampling`): x0 frames every K steps.

Every K denoising steps the pipeline's step-end callback decodes the scheduler's prediction of the
*clean* latents x0 (`pred_original_sample`; for DPM-Solver++ its x0 model output) rather than the
current noisy latents x_t: x0 shows what the model is converging to, while x_t looks like noise until
the last few steps. Schedulers that expose no x0 fall back to x_t.

Frames are decoded as the family's diffusers pipeline decodes its final image (`decode_latents`), so
on SDXL an fp16 VAE marked `force_upcast` decodes in fp32 (its activations overflow fp16) and a VAE
with `latents_mean`/`latents_std` is de-normalised first.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import SchedulerMixin
from PIL import Image

from tune.models.families import family_of_pipeline


def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images, the way `pipe`'s own `__call__` decodes them.

    Written by hand: diffusers decodes only inside `__call__`. SD1/SD2 pipelines divide by the scaling
    factor and decode in the VAE's dtype; SDXL's also upcast an fp16 `force_upcast` VAE to fp32 for the
    decode (and cast it back) and undo `latents_mean`/`latents_std` when the VAE config has them.
    """
    vae = pipe.vae
    config = vae.config
    sdxl = family_of_pipeline(pipe) == "sdxl"
    upcast = sdxl and vae.dtype == torch.float16 and bool(config.force_upcast)
    latents = latents.to(torch.float32 if upcast else vae.dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if sdxl and mean is not None and std is not None:
        # Per latent channel, whatever their number (diffusers' own view(1, 4, 1, 1) assumes 4).
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    # torch's Module.to, not diffusers' ModelMixin.to: diffusers 0.42 logs a warning on every dtype cast,
    # which would repeat twice per frame; the cast itself is the same.
    if upcast:
        torch.nn.Module.to(vae, torch.float32)
    try:
        decoded = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            torch.nn.Module.to(vae, torch.float16)
    return pipe.image_processor.postprocess(decoded, output_type="pil")


class Trajectory:
    """Records x0 predictions from the scheduler and decodes every `every`-th step into frames.

    Pass it as the pipeline's `callback_on_step_end` (with tensor inputs ["latents"]); `frames[k]` are
    image k's frames of the last call, early to late, without the final image (the caller adds it).
    """

    def __init__(self, every: int, scheduler: SchedulerMixin) -> None:
        self.every = every
        self.frames: list[list[Image.Image]] = []
        self._x0: torch.Tensor | None = None
        original = scheduler.step

        # Wrapping (not replacing) `step` on our private scheduler instance: diffusers discards the
        # step's pred_original_sample. functools.wraps keeps the signature visible to
        # inspect.signature, which the pipeline uses to decide whether to pass `generator`/`eta`.
        @functools.wraps(original)
        def step(*args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
            out = original(*args, return_dict=True, **kwargs)
            self._x0 = getattr(out, "pred_original_sample", None)
            if self._x0 is None and getattr(scheduler.config, "algorithm_type", "") in (
                "dpmsolver++",
                "sde-dpmsolver++",
            ):
                self._x0 = scheduler.model_outputs[-1]  # DPM-Solver++ works on x0 predictions
            return out if return_dict else (out.prev_sample,)

        scheduler.step = step  # type: ignore[method-assign]

    def reset(self, batch: int) -> None:
        self.frames = [[] for _ in range(batch)]
        self._x0 = None

    def __call__(self, pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        done = i + 1
        # The last step's frame is the final image, which the caller appends after decoding.
        if done % self.every == 0 and done < pipe.num_timesteps:
            latents = self._x0 if self._x0 is not None else callback_kwargs["latents"]
            for frames, image in zip(self.frames, decode_latents(pipe, latents), strict=True):
                frames.append(image)
        return {}
