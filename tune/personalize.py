"""What the personalization recipes (lora, dreambooth, textual_inversion) share, so it is written once.

    tune run lora base_model=PATH instance_dir=PATH instance_prompt="a photo of sks toy" output_dir=PATH
    tune run lora concept=concepts/sks-toy

- `PersonalizeConfig`: the keys every personalization command takes (each recipe's `Config`
  subclasses it, adds its own keys and may change defaults), with the `[data]`, `[sample]` and
  `[prior]` tables defined here.
- `resolve_subject`: the subject from `concept=concepts/<name>` (photos, prompts, token, class word,
  validation prompts, prior-preservation settings) or from `instance_dir` / `instance_prompt`;
  keys given explicitly win over the concept's.
- `load_base`: the base model (a diffusers folder or single file), with a clear error when the
  default `models/world-base` is missing.
- `build_photo_loader`: photos (plus class images) to batches through the shared loader, with cached
  VAE latents whenever the crop is deterministic, so a second run on the same photos encodes nothing.
- `sample_validation`: the same prompts x seeds into `samples/step_XXXXXX/` at step 0 (the base
  model) and every `sample_every` steps, through the shared sampler.

The training loops themselves stay in the recipes, written out.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tune import PROJECT_ROOT
from tune.diffusion import DiffusionConfig, sample_noise
from tune.errors import ConfigError, DataError, ModelError
from tune.optim import OptimConfig
from tune.runs import check_not_in_use

# The `x as x` names moved to tune.training; re-exported for callers that still reach them here (tests).
from tune.training.accelerator import resolve_mixed_precision as resolve_mixed_precision
from tune.training.checkpoints import checkpoint_trainable_only as checkpoint_trainable_only
from tune.training.steps import is_due as is_due
from tune.training.steps import step_generator
from tune.training.trackers import build_trackers as build_trackers

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from tune.data.concepts import Concept
    from tune.data.loader import Batch, PhotoDataset, PhotoLoader

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "models/world-base"
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
ReportTo = Literal["none", "tensorboard", "wandb"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


# ---------------------------------------------------------------------------------------------------
# Config tables
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoOptions:
    """How the subject's photos become batches (the `[data]` table)."""

    bucketing: bool = False
    """Aspect-ratio buckets instead of square centre crops (worth it at 512 px and up, not at 64)."""
    crop: Literal["center", "random"] = "center"
    """Where the crop that fits a photo to its square (or bucket) sits; random crops cannot be cached."""
    flip: bool = False
    """Random horizontal flips (p = 0.5). Leave off for subjects with writing or asymmetric marks."""
    repeats: int = 1
    """Times each photo appears per epoch (class images excepted)."""
    cache_latents: bool = True
    """Encode each photo with the VAE once and reuse the latents, in this run and the next ones (only with
    crop = "center"; random crops are encoded every step)."""
    cache_dir: str = ""
    """Where the latent, text and class-image caches live; "" means $TUNE_CACHE_DIR, else ~/.cache/tune."""
    num_workers: int = 0
    """DataLoader worker processes (0 loads in the training process, which is right for cached latents)."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.num_workers < 0:
            raise ConfigError(
                f"data.repeats must be >= 1 and data.num_workers >= 0; got {self.repeats}, {self.num_workers}"
            )


@dataclass(frozen=True)
class SampleConfig:
    """Validation images (the `[sample]` table): the same prompts x seeds at step 0 (the base model) and
    every `sample_every` steps, into samples/step_XXXXXX/ where the dashboard shows them."""

    prompts: tuple[str, ...] = ()
    """Prompts ({token} and {class} are filled in); empty means the concept's validation prompts, else
    the instance prompt and, when set, the class prompt."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds: one column of the grid each."""
    steps: int = 20
    """Denoising steps per image."""
    guidance: float = 6.0
    """Classifier-free guidance scale."""
    scheduler: str = ""
    """Sampler (ddim, ddpm, euler, euler_a, dpmpp_2m); "" means the base model's own."""
    negative_prompt: str = ""
    """Negative prompt ("" for none)."""
    batch_size: int = 2
    """Seeds per sampler call: 2 samples about twice as fast on a CPU as 1; a seed's image then depends on
    its batch-mates in the lowest bits (the same in every grid of a run)."""

    def __post_init__(self) -> None:
        from tune.sampling import SCHEDULERS

        if not self.seeds:
            raise ConfigError("sample.seeds needs at least one seed")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(
                f"sample.steps and sample.batch_size must be >= 1; got {self.steps}, {self.batch_size}"
            )
        if self.scheduler and self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"sample.scheduler must be one of {', '.join(SCHEDULERS)} or ''; got {self.scheduler!r}"
            )


@dataclass(frozen=True)
class PriorConfig:
    """Prior preservation (the `[prior]` table): class images drawn by the base model for the class prompt
    are trained alongside the photos, so the class word keeps its meaning (DreamBooth)."""

    enabled: bool | None = None
    """On or off; unset follows the concept's [prior_preservation] (without a concept: on when class_prompt
    is given)."""
    num_class_images: int | None = None
    """How many class images; unset means the concept's num_class_images, else 100."""
    loss_weight: float | None = None
    """Weight of the class-image loss; unset means the concept's prior_loss_weight, else 1.0."""
    class_dir: str = ""
    """Folder of ready-made class images; "" means the concept's class_dir, else images generated by the
    base model (cached by base model, prompt, seeds and sampler settings, and reused by the next run)."""
    seed: int = 0
    """Seed of the first generated class image (image i uses seed + i)."""
    steps: int = 25
    """Denoising steps per generated class image."""
    guidance: float = 6.0
    """Classifier-free guidance scale of generated class images."""
    batch_size: int = 4
    """Class images per sampler call (faster; part of the cache key, since batching changes the lowest bits)."""

    def __post_init__(self) -> None:
        if self.num_class_images is not None and self.num_class_images < 1:
            raise ConfigError(f"prior.num_class_images must be >= 1; got {self.num_class_images}")
        if self.loss_weight is not None and self.loss_weight < 0:
            raise ConfigError(f"prior.loss_weight must be >= 0; got {self.loss_weight}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(
                f"prior.steps and prior.batch_size must be >= 1; got {self.steps}, {self.batch_size}"
            )


@dataclass(frozen=True)
class PersonalizeConfig:
    """Keys every personalization recipe takes. A recipe's `Config` subclasses this."""

    base_model: str = DEFAULT_BASE_MODEL
    """Base model: a diffusers folder or a single .safetensors/.ckpt file (relative paths are tried
    against the current folder, then the tune checkout)."""
    concept: str = ""
    """Concept folder (concepts/<name> with concept.toml): photos, prompts, token, class word, validation
    prompts and prior-preservation settings. Keys given here win over the concept's."""
    instance_dir: str = ""
    """Folder of photos of the subject (5 to 20 is plenty); "" means the concept's."""
    instance_prompt: str = ""
    """Caption of every photo, naming the subject with its token, e.g. "a photo of sks toy"; "" means the
    concept's."""
    class_prompt: str = ""
    """The subject's class without the token, e.g. "a photo of toy": prior preservation's class images and
    a validation prompt that shows the class keeps its meaning; "" means the concept's (or none)."""
    token: str = ""
    """The word that names the subject in prompts (the trigger), e.g. "sks"; "" means the concept's token."""
    output_dir: str = ""
    """Run directory; "" means runs/<recipe>-<timestamp>."""
    seed: int = 0
    """Seed of initial weights, data order, noise and timesteps."""
    resume: str = ""
    """"" (start fresh), "latest" (newest complete checkpoint of output_dir) or a checkpoint folder."""
    resolution: int = 0
    """Training size in pixels (square); 0 means the base model's native size (64 for world-base)."""
    max_steps: int = 400
    """Optimizer steps."""
    batch_size: int = 1
    """Photos per micro-batch (prior preservation adds as many class images)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    mixed_precision: MixedPrecision = "auto"
    """bf16/fp16 autocast with frozen weights in that type, on a GPU; "auto" picks bf16 where the GPU has
    it, else fp16, and fp32 on a CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less GPU memory, about 20% slower."""
    channels_last: bool = False
    """Keep the U-Net's convolution weights (and so its activations) channels-last: faster with bf16/fp16 on
    GPUs with tensor cores; usually slower on CPUs."""
    compile: bool = False
    """torch.compile the U-Net's training forward: the first steps wait for the compiler, later ones run
    faster (on GPUs; needs a C++ compiler on CPUs)."""
    compile_mode: CompileMode = "default"
    """torch.compile's mode with `compile`: "max-autotune-no-cudagraphs" compiles longer (minutes) and times
    kernel variants to pick the fastest; "reduce-overhead" and "max-autotune" also use CUDA graphs (GPUs)."""
    sample_every: int = 200
    """Validation grid every this many steps, at the last step and at step 0 (the base model); 0 = never."""
    checkpoint_every: int = 200
    """Checkpoint every this many steps and at the last step; 0 = only at the last step."""
    checkpoints_keep: int = 2
    """Newest checkpoints kept (0 keeps all)."""
    max_nonfinite_steps: int = 5
    """A step whose loss is NaN or infinite is skipped (no update) and logged; this many in a row stop the
    run with an error, its checkpoints untouched."""
    report_to: ReportTo = "none"
    """Also log metrics to TensorBoard (<output_dir>/tensorboard) or Weights & Biases through accelerate."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    diffusion: DiffusionConfig = DiffusionConfig()
    """Loss: prediction type (auto follows the base model's scheduler), min-SNR gamma, noise offset."""
    data: PhotoOptions = PhotoOptions()
    """Photo loading: crop, flip, repeats, buckets, latent cache."""
    sample: SampleConfig = SampleConfig()
    """Validation prompts, seeds and sampler settings."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1; got {getattr(self, key)}")
        for key in ("resolution", "sample_every", "checkpoint_every", "checkpoints_keep"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0; got {getattr(self, key)}")


# ---------------------------------------------------------------------------------------------------
# The subject
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """What a personalization run teaches, resolved from a concept and/or explicit keys."""

    photos: Path
    instance_prompt: str
    class_prompt: str
    """"" when there is none."""
    token: str
    """The trigger word; "" when neither a concept nor `token` named one."""
    class_word: str
    """"" without a concept."""
    validation_prompts: tuple[str, ...]
    """Rendered validation prompts (the concept's; the recipe may replace them)."""
    concept: Concept | None = None

    def render(self, template: str) -> str:
        """Fill {token} and {class} (other braces are left alone)."""
        return template.replace("{token}", self.token).replace("{class}", self.class_word)


def find_path(name: str) -> Path:
    """A user path as given when it exists, else under the tune checkout (concepts/ and models/ ship there)."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    shipped = PROJECT_ROOT / path
    return shipped if shipped.exists() else path


def resolve_subject(cfg: PersonalizeConfig) -> Subject:
    """The subject from `cfg.concept` and/or `instance_dir`, `instance_prompt`, `class_prompt`, `token`.

    The recipes call it first, so it also refuses an `output_dir` that another run is writing: that
    error then comes before the base model loads (start_run takes the lock itself later)."""
    from tune.data.concepts import load_concept

    if cfg.output_dir:
        check_not_in_use(cfg.output_dir)
    concept = load_concept(find_path(cfg.concept)) if cfg.concept else None
    if concept is None:
        if not cfg.instance_dir:
            raise ConfigError(
                "instance_dir is required: a folder of photos of the subject (or concept=concepts/<name>)"
            )
        if not cfg.instance_prompt:
            raise ConfigError(
                'instance_prompt is required: the caption of the photos, e.g. instance_prompt="a photo of sks dog"'
            )
    photos = find_path(cfg.instance_dir) if cfg.instance_dir else concept.instance_dir  # type: ignore[union-attr]
    if not photos.is_dir():
        raise DataError(
            f"instance_dir {photos} is not a folder; pass the folder that holds the subject's photos"
        )
    token = cfg.token or (concept.token if concept else "")
    class_word = concept.class_word if concept else ""
    if not token or not class_word:
        prompt = cfg.instance_prompt or (concept.instance_caption if concept else "")
        told = trigger_and_class(prompt, token)
        if told is None:
            raise ConfigError(
                f"cannot tell the trigger word and the class from instance_prompt {prompt!r}: write it as "
                '"a photo of TOKEN CLASS" (e.g. "a photo of sks toy") or give token=WORD'
            )
        token, class_word = token or told[0], class_word or told[1]
    subject = Subject(
        photos=photos,
        instance_prompt=cfg.instance_prompt or concept.instance_caption,  # type: ignore[union-attr]
        class_prompt=cfg.class_prompt or (concept.class_caption if concept else ""),
        token=token,
        class_word=class_word,
        validation_prompts=(),
        concept=concept,
    )
    if concept is not None:
        rendered = tuple(subject.render(t) for t in concept.validation_prompts)
        subject = dataclasses.replace(subject, validation_prompts=rendered)
    if token and token not in subject.instance_prompt.split():
        log.warning("the token %r does not appear in the instance prompt %r", token, subject.instance_prompt)
    return subject


_LEAD = re.compile(r"^(?:.*?\bof\s+)?(?:(?:a|an|the)\s+)?", re.IGNORECASE)


def trigger_and_class(prompt: str, token: str = "") -> tuple[str, str] | None:
    """(trigger, class word) of an instance prompt: the word after `token` when one is given, else the two
    words after a leading "... of" and article ("a photo of sks toy" -> sks, toy; "a sks dog" -> sks,
    dog); None when the prompt does not say."""
    words = [w.strip(string.punctuation) for w in prompt.split()]
    words = [w for w in words if w]
    if token:
        if token in words and words.index(token) + 1 < len(words):
            return token, words[words.index(token) + 1]
        return None
    rest = _LEAD.sub("", " ".join(words), count=1).split()
    if len(rest) < 2 or "of" in (w.lower() for w in rest[:2]):
        return None
    return rest[0], rest[1]


def validation_prompts(subject: Subject, sample: SampleConfig) -> list[str]:
    """`sample.prompts` (rendered), else the concept's, else the instance prompt and the class prompt."""
    if sample.prompts:
        return [subject.render(p) for p in sample.prompts]
    if subject.validation_prompts:
        return list(subject.validation_prompts)
    return [subject.instance_prompt] + ([subject.class_prompt] if subject.class_prompt else [])


@dataclass(frozen=True)
class Prior:
    """Resolved prior-preservation settings."""

    class_prompt: str
    num_class_images: int
    loss_weight: float
    class_dir: Path | None
    """Ready-made class images, or None to generate them."""


def resolve_prior(prior: PriorConfig, subject: Subject) -> Prior | None:
    """Prior preservation for this run (explicit keys, then the concept's settings, then defaults), or None."""
    concept_prior = subject.concept.prior_preservation if subject.concept is not None else None
    if prior.enabled is not None:
        enabled = prior.enabled
    elif concept_prior is not None:
        enabled = concept_prior.enabled
    else:
        enabled = bool(subject.class_prompt)
    if not enabled:
        return None
    if not subject.class_prompt:
        raise ConfigError(
            'prior preservation needs a class prompt: class_prompt="a photo of dog" (the subject\'s class), '
            "or turn it off with prior.enabled=false"
        )
    class_dir = (
        find_path(prior.class_dir)
        if prior.class_dir
        else (concept_prior.class_dir if concept_prior else None)
    )
    if class_dir is not None and not class_dir.is_dir():
        raise DataError(f"prior class_dir {class_dir} is not a folder of class images")
    count = prior.num_class_images or (concept_prior.num_class_images if concept_prior else 100)
    weight = (
        prior.loss_weight
        if prior.loss_weight is not None
        else (concept_prior.prior_loss_weight if concept_prior else 1.0)
    )
    return Prior(subject.class_prompt, max(1, count), weight, class_dir)


def prepare_class_images(
    pipe: StableDiffusionPipeline,
    prior: Prior,
    settings: PriorConfig,
    *,
    base_hash: str,
    cache_dir: str,
    accelerator: Any,
) -> Path:
    """The folder of class images: the ready-made one, or the base model's (generated once, cached)."""
    from tune.data.class_images import generate_class_images

    if prior.class_dir is not None:
        return prior.class_dir
    result = generate_class_images(
        pipe,
        prior.class_prompt,
        prior.num_class_images,
        base_hash=base_hash,
        seed=settings.seed,
        steps=settings.steps,
        guidance=settings.guidance,
        batch_size=settings.batch_size,
        cache_dir=cache_dir or None,
        accelerator=accelerator,
    )
    return result.folder


# ---------------------------------------------------------------------------------------------------
# The base model
# ---------------------------------------------------------------------------------------------------


def load_base(path: str) -> StableDiffusionPipeline:
    """The base pipeline (progress bars off); a missing default model says how to get one."""
    from tune.models import load_pipeline, resolve_model_path

    if path == DEFAULT_BASE_MODEL and not resolve_model_path(path).exists():
        raise ModelError(
            f"the default base model {DEFAULT_BASE_MODEL} is missing; restore it (git checkout models/), "
            "rebuild it (make base) or pass base_model=PATH (a diffusers folder or a single-file SD1.x checkpoint)"
        )
    pipe = load_pipeline(str(resolve_model_path(path)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


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
) -> tuple[PhotoDataset, PhotoLoader]:
    """The shared loader over the photos (plus class images), with cached latents when the crop allows.

    cache_text: also cache the (frozen) text encoder's outputs; batches then carry
    `encoder_hidden_states` instead of `input_ids`.
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
    device = accelerator.device
    if cache:
        photo_loader.cache_latents(dataset, pipe.vae, device=device, accelerator=accelerator)
    if cache_text:
        photo_loader.cache_text(
            dataset, pipe.text_encoder, pipe.tokenizer, device=device, accelerator=accelerator
        )
    loader = photo_loader.build_dataloader(
        dataset, batch_size=batch_size, tokenizer=pipe.tokenizer, seed=seed, accelerator=accelerator
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
    batch 2 compute the same update, and a resumed run draws what an uninterrupted one would. Batches
    without per-sample seeds get the micro-step's generator."""
    if batch.seeds is None:
        return step_generator(seed, micro_step)
    return [torch.Generator().manual_seed(s) for s in batch.seeds.tolist()]


def encode_batch(
    batch: Batch,
    *,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    generator: torch.Generator | list[torch.Generator],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, encoder_hidden_states) of a batch: cached ones as they are, the rest encoded now."""
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
        hidden = batch.encoder_hidden_states
    else:
        assert batch.input_ids is not None
        hidden = text_encoder(batch.input_ids.to(text_encoder.device))[0]
    return latents, hidden


# ---------------------------------------------------------------------------------------------------
# During training
# ---------------------------------------------------------------------------------------------------


def sample_validation(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    sample: SampleConfig,
    out_dir: Path,
    *,
    accelerator: Any,
    modules: Iterable[torch.nn.Module],
) -> None:
    """A prompts x seeds grid of `pipe` as it is now into `out_dir`; `modules` are put in eval mode
    meanwhile (LoRA dropout off) and back afterwards. Only the main process samples (and writes)."""
    from tune.sampling import sample_grid

    if not accelerator.is_main_process:
        return
    modes = [(m, m.training) for m in modules]
    for m, _ in modes:
        m.eval()
    try:
        with accelerator.autocast():
            sample_grid(
                pipe,
                prompts,
                list(sample.seeds),
                out_dir,
                steps=sample.steps,
                guidance=sample.guidance,
                scheduler=sample.scheduler or None,
                negative_prompt=sample.negative_prompt or None,
                batch_size=sample.batch_size,
                progress=False,
            )
    finally:
        for m, mode in modes:
            m.train(mode)


def run_info(
    subject: Subject, cfg: PersonalizeConfig, base_hash: str, dataset: PhotoDataset
) -> dict[str, Any]:
    """The facts run.json carries for eval, export and the dashboard."""
    return {
        "base_model": cfg.base_model,
        "base_model_hash": base_hash,
        "concept": str(find_path(cfg.concept).resolve()) if cfg.concept else "",
        "concept_name": subject.concept.name if subject.concept else "",
        "instance_dir": str(subject.photos),
        "instance_prompt": subject.instance_prompt,
        "class_prompt": subject.class_prompt,
        "trigger": subject.token,
        "class_word": subject.class_word,
        "photos": len(dataset.instance_indices),
        "class_images": len(dataset.prior_indices),
        "max_steps": cfg.max_steps,
        "cache": cache_info(dataset),
    }
