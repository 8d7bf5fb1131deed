"""The keys every personalization recipe takes beyond TrainConfig's: `PersonalizeConfig` and its `[data]`,
`[sample]` and `[prior]` tables (each recipe's `Config` subclasses it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tune.config import MixedPrecision, TrainConfig
from tune.diffusion import DiffusionConfig
from tune.errors import ConfigError
from tune.optim import OptimConfig

DEFAULT_BASE_MODEL = "models/world-base"
ReportTo = Literal["none", "tensorboard", "wandb"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


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
    mask_background_weight: float = 0.1
    """Loss weight of the pixels outside a photo's subject mask (`IMG-masklabel.png` beside `IMG.jpg`,
    white on the subject; tune.data.masks), against 1 on the subject; photos without a mask weigh all
    pixels 1, and 1 ignores the masks. The adapter then spends itself on the subject, not on the table
    it stands on."""
    mask_attention_weight: float = 0.0
    """Weight of the trigger-attention loss (tune.personalize.attention_loss, Break-A-Scene's): with masks,
    the trigger word's cross-attention map is pulled onto the subject, so the subject's look goes to the
    trigger and not to the class or background words; 0 turns it off."""
    caption_dropout: float = 0.0
    """Share of samples (photos and class images alike) trained with the empty caption, as classifier-free
    guidance's unconditional branch: the unconditional prediction learns the subject too, so guidance
    pushes less far past the photos' colours."""

    def __post_init__(self) -> None:
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"data.caption_dropout must be in [0, 1); got {self.caption_dropout}")
        if self.mask_attention_weight < 0:
            raise ConfigError(f"data.mask_attention_weight must be >= 0; got {self.mask_attention_weight}")
        if not 0 <= self.mask_background_weight <= 1:
            raise ConfigError(
                f"data.mask_background_weight must be in [0, 1]; got {self.mask_background_weight}"
            )
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
    from_captions: bool = False
    """Draw the class images for the photos' own captions as well, with the subject taken out ("a photo of
    sks toy on grass" -> "a photo of toy on grass"; the class prompt and each such caption in turn), and
    train each with its caption: the class keeps its meaning in the settings the photos show. Photos
    without a caption sidecar add nothing."""
    from_prompts: bool = False
    """Draw class images for the run's validation prompts as well, with the trigger taken out ("a drawing
    of sks toy" -> "a drawing of toy"; sample.prompts, else the concept's validation_prompts): the class keeps
    its meaning in the styles and settings you will ask for, and the subject learns to follow them.
    Taken in turn with the class prompt (and the captions, with from_captions)."""
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
class PivotalConfig:
    """Pivotal tuning (the `[pivotal]` table): the trigger word becomes a new token whose embedding trains
    beside the recipe's weights, so the trigger means something of its own and the class word keeps its
    meaning (on our base, sks-toy's drift fell from 55% to 0-5% with the default lora)."""

    enabled: bool | Literal["auto"] = False
    """Add the token (`token`, or the concept's) as a new embedding and train it too; "auto": when the
    token is a new word to the tokenizer and in the instance prompt (as "sks"); a word the tokenizer has as
    one token that the base's text encoder reads as next to nothing (our base's "w": every single letter)
    trains its own embedding in place (`resolve_pivotal`); any other word is left alone and the recipe's
    weights alone learn the subject. The run's config.toml records whether it trained."""
    initializer_token: str = ""
    """Word the new embedding starts from; "" means the concept's class word."""
    num_vectors: int = 1
    """Embedding vectors behind the token."""
    lr: float = 1e-3
    """Learning rate of the embedding (the other weights use optim.lr); under Prodigy, which sets one step
    size for all weights, it does not apply (the run's log says so)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.num_vectors < 1:
            raise ConfigError(f"need pivotal.lr > 0 and pivotal.num_vectors >= 1; got {self}")


@dataclass(frozen=True)
class PersonalizeConfig(TrainConfig):
    """Keys every personalization recipe takes, beyond TrainConfig's. A recipe's `Config` subclasses this."""

    # A fine-tune's frozen base is most of its memory: bf16/fp16 by default where a GPU has them.
    mixed_precision: MixedPrecision = "auto"
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
    resolution: int = 0
    """Training size in pixels (square); 0 means the base model's native size (64 for world-base)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
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
    val_every: int = 0
    """Log `val_loss`, the denoising loss on held-out photos at fixed noise and timesteps, at step 0, every
    this many steps and at the end; 0 = never (and no photo is held out)."""
    val_share: float = 0.2
    """Share of the subject's photos held out for val_loss (at least one; never trained on)."""
    val_dir: str = ""
    """Folder of validation photos instead of a share of the subject's (then every photo trains)."""
    eval_suite: str = "default"
    """Suite of the evaluations a recipe's `eval_every` runs: a name in eval/ or a TOML file."""
    eval_clip: str = "models/world-clip"
    """CLIPModel folder those evaluations score with."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1; got {self.grad_accum}")
        if self.resolution < 0:
            raise ConfigError(f"resolution must be >= 0; got {self.resolution}")
        if self.val_every < 0 or not 0 < self.val_share < 1:
            raise ConfigError(
                f"need val_every >= 0 and 0 < val_share < 1; got {self.val_every}, {self.val_share}"
            )
