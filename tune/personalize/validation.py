"""Validation loss: the denoising loss on photos the run does not train on, at fixed noise and timesteps.

The held-out photos are a fixed share of the subject's photos (the first by content hash, so the same ones
whatever their names or order) or a separate `val_dir`. Each photo is noised at `VAL_TIMESTEPS` evenly
spaced timesteps with noise seeded by (seed, photo, draw): the same every time the loss is computed, so
its changes are the model's alone. The loss is the plain MSE to the training target (no SNR weighting),
averaged over photos and timesteps, logged as `val_loss` in metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tune.diffusion import DiffusionConfig, prediction_type, training_target
from tune.errors import ConfigError

if TYPE_CHECKING:
    from tune.data.loader import PhotoDataset
    from tune.data.sources import ImageRecord
    from tune.personalize.config import PersonalizeConfig
    from tune.runs import RunDir

VAL_TIMESTEPS = 8
"""Timesteps per held-out photo, evenly spaced over the schedule."""


def holdout_share(cfg: PersonalizeConfig) -> float:
    """The share of the subject's photos the training loader leaves out (0 without validation loss or
    with a val_dir)."""
    return cfg.val_share if cfg.val_every and not cfg.val_dir else 0.0


def held_out_records(records: list[ImageRecord], share: float) -> list[ImageRecord]:
    """The instance photos a run holds out for `share` > 0: at least one, the first by content hash."""
    if share <= 0:
        return []
    photos = [r for r in records if not r.is_prior]
    count = max(1, round(share * len(photos)))
    if count >= len(photos):
        raise ConfigError(
            f"val_share={share} holds out {count} of {len(photos)} photos, leaving none to train on; "
            "lower val_share, add photos or give a val_dir"
        )
    return sorted(photos, key=lambda r: r.sha256)[:count]


def remove_held_out(dataset: PhotoDataset, share: float) -> None:
    """Take the held-out photos out of a training dataset (before its latents are cached)."""
    held = {id(r) for r in held_out_records(dataset.records, share)}
    dataset.records = [r for r in dataset.records if id(r) not in held]


@dataclass
class ValidationLoss:
    """The validation loss of the model as it is now (`compute`) and its metrics row (`log`).

    `unet`, `vae` and `text_encoders` (a `TextEncoders`) are the plain modules the pipeline samples with:
    adapters and new tokens live inside them, so the loss sees what training has done."""

    dataset: PhotoDataset
    tokenizers: tuple[Any, Any]
    unet: Any
    vae: Any
    text_encoders: Any
    noise_scheduler: Any
    diffusion: DiffusionConfig
    seed: int
    dtype: torch.dtype
    photos: int = 0

    @torch.no_grad()
    def compute(self) -> float:
        """Mean denoising loss over the held-out photos x VAL_TIMESTEPS fixed timesteps."""
        from tune.data.loader import collate
        from tune.models.conditioning import add_time_ids, added_cond_kwargs
        from tune.personalize.loading import encode_batch

        pred_type = prediction_type(self.noise_scheduler, self.diffusion)
        n = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.tensor([(2 * k + 1) * n // (2 * VAL_TIMESTEPS) for k in range(VAL_TIMESTEPS)])
        device = self.unet.device
        total = 0.0
        for i in range(len(self.dataset)):
            batch = collate([self.dataset[i]], tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1])
            generator = torch.Generator().manual_seed(_seed(self.seed, i, VAL_TIMESTEPS))  # the VAE's draw
            latents, hidden, pooled = encode_batch(
                batch.to(device),
                vae=self.vae,
                text_encoder=self.text_encoders,
                generator=generator,
                dtype=self.dtype,
            )
            noise = torch.stack(
                [
                    torch.randn(
                        latents.shape[1:], generator=torch.Generator().manual_seed(_seed(self.seed, i, k))
                    )
                    for k in range(VAL_TIMESTEPS)
                ]
            ).to(device, latents.dtype)
            t = timesteps.to(device)
            latents = latents.expand(VAL_TIMESTEPS, -1, -1, -1)
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            hidden = hidden.expand(VAL_TIMESTEPS, -1, -1)
            time_ids = add_time_ids(batch.original_sizes, batch.crop_top_lefts, batch.target_size)
            extra = added_cond_kwargs(
                None if pooled is None else pooled.expand(VAL_TIMESTEPS, -1),
                time_ids.expand(VAL_TIMESTEPS, -1),
            )
            kwargs = {} if extra is None else {"added_cond_kwargs": extra}
            pred = self.unet(noisy, t, hidden.to(self.unet.dtype), **kwargs).sample
            target = training_target(self.noise_scheduler, pred_type, latents, noise, t)
            total += float(torch.nn.functional.mse_loss(pred.float(), target.float()))
        return total / len(self.dataset)

    def log(self, run: RunDir, accelerator: Any, step: int) -> None:
        """Compute the loss on the main process and append its `val_loss` row (trackers too), with the
        modules in eval mode and a schedule-free optimizer's evaluation weights."""
        from tune.training import evaluation_weights

        with evaluation_weights(accelerator):
            if not accelerator.is_main_process:
                return
            modules = [
                self.unet,
                self.vae,
                self.text_encoders.text_encoder,
                self.text_encoders.text_encoder_2,
            ]
            modes = [(m, m.training) for m in modules if m is not None]
            for m, _ in modes:
                m.eval()
            try:
                with accelerator.autocast():
                    value = self.compute()
            finally:
                for m, mode in modes:
                    m.train(mode)
        run.log_metrics(step, val_loss=value)
        if accelerator.trackers:
            accelerator.log({"val_loss": value}, step=step)


def _seed(seed: int, photo: int, draw: int) -> int:
    """A draw's seed: a function of (run seed, photo, draw) only."""
    return (seed * 1_000_003 + photo) * 1_009 + draw


def build_validation_loss(
    cfg: PersonalizeConfig,
    photos: Path,
    instance_prompt: str,
    pipe: Any,
    noise_scheduler: Any,
    dtype: torch.dtype,
) -> ValidationLoss | None:
    """The run's validation loss over its held-out photos (or cfg.val_dir's); None when val_every = 0.
    Call it after adapters or new tokens are in the pipeline's modules."""
    from tune.data.config import DataConfig
    from tune.data.loader import build_dataset
    from tune.models.conditioning import TextEncoders
    from tune.personalize.loading import latent_multiple, resolve_resolution

    if not cfg.val_every:
        return None
    resolution = resolve_resolution(cfg.resolution, pipe)
    data_cfg = DataConfig(
        resolution=resolution,
        bucketing=cfg.data.bucketing,
        bucket_step=latent_multiple(pipe),
        crop="center",
        cache_latents=False,
        cache_dir=cfg.data.cache_dir or None,
        min_images=1,
        min_side=min(DataConfig.min_side, resolution),
    )
    source = Path(cfg.val_dir) if cfg.val_dir else photos
    dataset = build_dataset(source, data_cfg, instance_prompt=instance_prompt, seed=cfg.seed)
    if not cfg.val_dir:
        dataset.records = held_out_records(dataset.records, cfg.val_share)
    return ValidationLoss(
        dataset,
        (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)),
        pipe.unet,
        pipe.vae,
        TextEncoders.of(pipe),
        noise_scheduler,
        cfg.diffusion,
        cfg.seed,
        dtype,
        photos=len(dataset.records),
    )
