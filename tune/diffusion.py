"""Training numerics every recipe shares: noise, timesteps, targets, loss weighting, prior preservation.

The noise scheduler is diffusers' (DDPMScheduler-compatible: `add_noise`, `get_velocity`,
`alphas_cumprod`); the prediction type (epsilon or v) follows the base model's scheduler config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from tune.errors import ConfigError


@dataclass(frozen=True)
class DiffusionConfig:
    """How the denoising loss is formed (the `[diffusion]` table of a recipe config)."""

    prediction_type: str = "auto"
    """epsilon, v_prediction, or auto (follow the base model's scheduler)."""
    snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is typical); 0 turns it off."""
    noise_offset: float = 0.0
    """Per-channel offset noise scale (helps very dark/bright images); 0 turns it off."""
    timesteps: str = "uniform"
    """Training timestep density: uniform, or logit_normal (t / T = sigmoid(N(timestep_mean,
    timestep_std)): more mid-noise steps, where layout and colours are decided)."""
    timestep_mean: float = 0.0
    """Mean of the logit-normal density (0: centred on the middle timestep)."""
    timestep_std: float = 1.0
    """Spread of the logit-normal density."""

    def __post_init__(self) -> None:
        if self.timesteps not in ("uniform", "logit_normal"):
            raise ConfigError(f"diffusion.timesteps must be uniform or logit_normal; got {self.timesteps!r}")
        if self.timestep_std <= 0:
            raise ConfigError(f"diffusion.timestep_std must be > 0; got {self.timestep_std}")
        if self.prediction_type not in ("auto", "epsilon", "v_prediction"):
            raise ConfigError(
                f"diffusion.prediction_type must be auto, epsilon or v_prediction; got {self.prediction_type!r}"
            )
        if self.snr_gamma < 0 or self.noise_offset < 0:
            raise ConfigError("diffusion.snr_gamma and diffusion.noise_offset must be >= 0")


def prediction_type(noise_scheduler, cfg: DiffusionConfig) -> str:
    return noise_scheduler.config.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type


Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, or one per sample (each sample's draws then do not depend on which
batch it is in: batch 4 and two micro-batches of 2 draw the same noise for the same photos)."""


def _randn(shape: tuple[int, ...], generator: Generators, dtype: torch.dtype) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator])


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: Generators) -> torch.Tensor:
    noise = _randn(tuple(latents.shape), generator, latents.dtype).to(latents.device)
    if noise_offset:
        offset = _randn((*latents.shape[:2], 1, 1), generator, latents.dtype)
        noise = noise + noise_offset * offset.to(latents.device)
    return noise


def sample_timesteps(
    batch_size: int, noise_scheduler, generator: Generators, cfg: DiffusionConfig | None = None
) -> torch.Tensor:
    n = noise_scheduler.config.num_train_timesteps
    if cfg is not None and cfg.timesteps == "logit_normal":
        z = _randn((batch_size,), generator, torch.float32) * cfg.timestep_std + cfg.timestep_mean
        return (torch.sigmoid(z) * n).long().clamp(0, n - 1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randint(0, n, (batch_size,), generator=generator, dtype=torch.long)
    return torch.cat([torch.randint(0, n, (1,), generator=g, dtype=torch.long) for g in generator])


def training_target(noise_scheduler, pred_type: str, latents, noise, timesteps) -> torch.Tensor:
    if pred_type == "epsilon":
        return noise
    if pred_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"unknown prediction type {pred_type!r}")


def loss_weights(noise_scheduler, timesteps: torch.Tensor, pred_type: str, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights: 1, or min(SNR, gamma)/SNR (epsilon) and min(SNR, gamma)/(SNR+1) (v)."""
    if not snr_gamma:
        return torch.ones(timesteps.shape, dtype=torch.float32)
    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=snr_gamma)
    return clipped / (snr + 1) if pred_type == "v_prediction" else clipped / snr


def denoising_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    is_prior: torch.Tensor | None = None,
    prior_loss_weight: float = 1.0,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted MSE; with `is_prior`, DreamBooth's prior preservation: instance loss + w * class loss.

    pixel_weights: [B, 1, H, W] image-space weights (subject masks, `tune.data.masks`), averaged down to
    the latent grid; each sample's error is then their weighted mean, so a mask moves the loss between
    pixels without scaling it."""
    error = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if pixel_weights is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        error = error.mean(dim=1, keepdim=True)
        cell = F.adaptive_avg_pool2d(pixel_weights.float().to(error.device), error.shape[-2:])
        per_sample = (error * cell).sum(dim=(1, 2, 3)) / cell.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    per_sample = per_sample * weights.to(per_sample.device)
    if is_prior is None or not bool(is_prior.any()):
        return per_sample.mean()
    prior = is_prior.to(per_sample.device).bool()
    instance_loss = per_sample[~prior].mean() if bool((~prior).any()) else per_sample.new_zeros(())
    return instance_loss + prior_loss_weight * per_sample[prior].mean()


def diffusion_step(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    cfg: DiffusionConfig,
    generator: Generators = None,
    is_prior: torch.Tensor | None = None,
    prior_loss_weight: float = 1.0,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One denoising-loss evaluation: noise the latents, predict, compare with the target.

    added_cond_kwargs: the U-Net's extra conditioning (SDXL: `text_embeds` and `time_ids`, see
    `tune.models.conditioning`); None for SD1/SD2."""
    pred_type = prediction_type(noise_scheduler, cfg)
    noise = sample_noise(latents, cfg.noise_offset, generator)
    timesteps = sample_timesteps(latents.shape[0], noise_scheduler, generator, cfg).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if added_cond_kwargs is None:
        model_pred = unet(noisy, timesteps, encoder_hidden_states).sample
    else:
        model_pred = unet(noisy, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
    target = training_target(noise_scheduler, pred_type, latents, noise, timesteps)
    weights = loss_weights(noise_scheduler, timesteps.cpu(), pred_type, cfg.snr_gamma)
    return denoising_loss(model_pred, target, weights, is_prior, prior_loss_weight, pixel_weights)
