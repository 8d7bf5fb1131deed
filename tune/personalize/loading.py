"""The base model, and the subject's photos (plus class images) as batches through the shared loader,
with cached VAE latents whenever the crop is deterministic; `PhotoLoss`, the loss of one such batch."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tune.diffusion import DiffusionConfig, diffusion_step, sample_noise
from tune.errors import ConfigError, ModelError
from tune.paths import missing_shipped
from tune.personalize.config import DEFAULT_BASE_MODEL, PhotoOptions
from tune.personalize.validation import remove_held_out
from tune.training.steps import step_generator

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from tune.data.loader import Batch, PhotoDataset, PhotoLoader
    from tune.models.conditioning import TextEncoders
    from tune.personalize.attention_loss import TriggerAttentionLoss

log = logging.getLogger(__name__)


def load_base(path: str) -> StableDiffusionPipeline:
    """The base pipeline (progress bars off); a missing default model says how to get one."""
    from tune.models import load_pipeline, resolve_model_path

    if path == DEFAULT_BASE_MODEL and not resolve_model_path(path).exists():
        raise ModelError(
            f"the default base model {missing_shipped(DEFAULT_BASE_MODEL, rebuild='make base')}, "
            "or pass base_model=PATH (a diffusers folder or a single-file SD1.x checkpoint)"
        )
    pipe = load_pipeline(str(resolve_model_path(path)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def with_components(pipe: Any, **components: Any) -> Any:
    """A pipeline of `pipe`'s class (SD1/SD2 or SDXL) on its components, with `components` swapped in;
    no safety checker, no watermark."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    extra: dict[str, Any] = {}
    if isinstance(pipe, StableDiffusionPipeline):
        extra["requires_safety_checker"] = False
    elif isinstance(pipe, StableDiffusionXLPipeline):
        extra["add_watermarker"] = False
    new = type(pipe)(**{**pipe.components, **components}, **extra)
    new.set_progress_bar_config(disable=True)
    return new


def vae_dtype(pipe: Any, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype under mixed precision `dtype`: on SDXL, fp32 instead of fp16 when the VAE's config
    says `force_upcast` (SDXL's original VAE overflows in fp16; bf16 has fp32's range and is kept). Like
    diffusers' pipelines, SD1/SD2 ignore the flag (diffusers' AutoencoderKL defaults it to True)."""
    force_upcast = getattr(pipe.vae.config, "force_upcast", False)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return torch.float32 if sdxl and dtype == torch.float16 and force_upcast else dtype


def latent_multiple(pipe: StableDiffusionPipeline) -> int:
    """Image sides must be multiples of this: the VAE factor times the U-Net's total downsampling."""
    levels = len(pipe.unet.config.block_out_channels)
    return int(pipe.vae_scale_factor) * 2 ** (levels - 1)


def resolve_resolution(resolution: int, pipe: StableDiffusionPipeline) -> int:
    from tune.sampling import native_size

    side = resolution or native_size(pipe)[0]
    multiple = latent_multiple(pipe)
    if side % multiple:
        raise ConfigError(f"resolution must be a multiple of {multiple} for this base model; got {side}")
    return side


def build_photo_loader(
    photos: Path,
    instance_prompt: str,
    options: PhotoOptions,
    *,
    pipe: StableDiffusionPipeline,
    resolution: int,
    batch_size: int,
    seed: int,
    accelerator: Any,
    class_dir: Path | None = None,
    class_prompt: str | None = None,
    cache_text: bool = False,
    holdout: float = 0.0,
) -> tuple[PhotoDataset, PhotoLoader]:
    """The shared loader over the photos (plus class images), with cached latents when the crop allows.

    cache_text: also cache the (frozen) text encoder's outputs; batches then carry
    `encoder_hidden_states` instead of `input_ids`. An SDXL pipe's second tokenizer and encoder take part
    too (`input_ids_2`; cached: `pooled_text_embeds`). holdout: the share of the photos kept out for the
    validation loss (`tune.personalize.validation`).
    """
    from tune.data import loader as photo_loader
    from tune.data.config import DataConfig

    cache = options.cache_latents and options.crop == "center"
    if options.cache_latents and not cache:
        log.info("data.crop = random: latents are encoded every step instead of cached")
    data_cfg = DataConfig(
        resolution=resolution,
        bucketing=options.bucketing,
        bucket_step=latent_multiple(pipe),
        crop=options.crop,
        flip=options.flip,
        repeats=options.repeats,
        cache_latents=cache,
        cache_text=cache_text,
        cache_dir=options.cache_dir or None,
        num_workers=options.num_workers,
        mask_background_weight=options.mask_background_weight,
        keep_masks=options.mask_attention_weight > 0,
        caption_dropout=options.caption_dropout,
        # Class images come at the model's native size, which may be below the loader's default minimum.
        min_side=min(DataConfig.min_side, resolution),
    )
    dataset = photo_loader.build_dataset(
        photos,
        data_cfg,
        instance_prompt=instance_prompt,
        class_source=class_dir,
        class_prompt=class_prompt if class_dir is not None else None,
        seed=seed,
    )
    remove_held_out(dataset, holdout)
    if data_cfg.keep_masks and not any(r.mask for r in dataset.records):
        log.warning(
            "data.mask_attention_weight is %g but no photo has a mask (IMG-masklabel.png beside IMG.jpg): "
            "the trigger-attention loss takes no part",
            options.mask_attention_weight,
        )
    device = accelerator.device
    if cache:
        photo_loader.cache_latents(dataset, pipe.vae, device=device, accelerator=accelerator)
    if cache_text:
        photo_loader.cache_text(
            dataset,
            pipe.text_encoder,
            pipe.tokenizer,
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
            device=device,
            accelerator=accelerator,
        )
    loader = photo_loader.build_dataloader(
        dataset,
        batch_size=batch_size,
        tokenizer=pipe.tokenizer,
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        seed=seed,
        accelerator=accelerator,
    )
    return dataset, loader


def cache_info(dataset: PhotoDataset) -> dict[str, Any]:
    """The caching passes' stats for run.json, e.g. {"latent": {"encoded": 0, "loaded": 10}}."""
    return {
        kind: {"encoded": s.encoded, "loaded": s.loaded, **({"note": s.note} if s.note else {})}
        for kind, s in dataset.cache_stats.items()
    }


def forever(loader: PhotoLoader) -> Iterator[Batch]:
    """Batches across epochs; the loader's state_dict stays exact for resume."""
    while True:
        yield from loader


def sample_generators(batch: Batch, seed: int, micro_step: int) -> list[torch.Generator] | torch.Generator:
    """The generators of a batch's noise and timesteps: one per sample, seeded by the sample itself (its
    photo, epoch and draw), so that batch 4 x grad_accum 1, batch 2 x grad_accum 2 and 2 processes x
    batch 2 give a sample the same noise, and a resumed run draws what an uninterrupted one would. Batches
    without per-sample seeds get the micro-step's generator."""
    if batch.seeds is None:
        return step_generator(seed, micro_step)
    return [torch.Generator().manual_seed(s) for s in batch.seeds.tolist()]


def encode_batch(
    batch: Batch,
    *,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module | TextEncoders,
    generator: torch.Generator | list[torch.Generator],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(latents, encoder_hidden_states, pooled text embeds or None) of a batch: cached ones as they are,
    the rest encoded now. `text_encoder` is SD1/SD2's encoder or (any family) a `TextEncoders`."""
    from tune.models.conditioning import TextEncoders  # tune.models loads diffusers: on first use

    if batch.latents is not None:
        latents = batch.latents.to(dtype)
    else:
        assert batch.pixel_values is not None
        pixels = batch.pixel_values.to(vae.device, vae.dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        noise = sample_noise(dist.mean.float(), 0.0, generator)
        sample = dist.mean.float() + dist.std.float() * noise
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((sample - shift) * vae.config.scaling_factor).to(dtype)
    if batch.encoder_hidden_states is not None:
        return latents, batch.encoder_hidden_states, batch.pooled_text_embeds
    assert batch.input_ids is not None
    encoders = text_encoder if isinstance(text_encoder, TextEncoders) else TextEncoders(text_encoder)
    hidden, pooled = encoders(batch.input_ids, batch.input_ids_2)
    return latents, hidden, pooled


@dataclass(frozen=True)
class PhotoLoss:
    """The denoising loss of one photo batch, as every personalization recipe computes it: per-sample noise
    and timesteps (`sample_generators`), cached or freshly encoded latents and text states
    (`encode_batch`), and `diffusion_step`, with prior preservation's weight on the class images.

    `unet` and `text_encoder` are the modules the training forward runs through (DDP wrappers or compiled
    where the recipe prepared them); `text_encoder` is SD1/SD2's encoder or a `TextEncoders`, which for
    SDXL also gives the U-Net the pooled text embeds and each image's `add_time_ids` (its own original
    size and crop, class images included). `attention`: the trigger-attention loss, added to the denoising
    loss when the batch has masked photos (None: off)."""

    unet: Any
    vae: torch.nn.Module
    text_encoder: Any
    noise_scheduler: Any
    diffusion: DiffusionConfig
    seed: int
    dtype: torch.dtype
    prior_loss_weight: float = 1.0
    attention: TriggerAttentionLoss | None = None

    def __call__(self, batch: Batch, micro_step: int) -> torch.Tensor:
        from tune.models.conditioning import add_time_ids, added_cond_kwargs

        generator = sample_generators(batch, self.seed, micro_step)
        latents, hidden, pooled = encode_batch(
            batch, vae=self.vae, text_encoder=self.text_encoder, generator=generator, dtype=self.dtype
        )
        time_ids = add_time_ids(batch.original_sizes, batch.crop_top_lefts, batch.target_size)
        maps = self.attention is not None and self.attention.start(batch)  # record the trigger's maps
        loss = diffusion_step(
            self.unet,
            self.noise_scheduler,
            latents,
            hidden,
            self.diffusion,
            generator,
            is_prior=batch.is_prior,  # all False without prior preservation: the plain mean
            prior_loss_weight=self.prior_loss_weight,
            added_cond_kwargs=added_cond_kwargs(pooled, time_ids),
            pixel_weights=batch.loss_weight,  # the photos' subject masks, when they have them
        )
        if maps:
            assert self.attention is not None
            loss = loss + self.attention(batch, (latents.shape[-2], latents.shape[-1]))
        return loss
