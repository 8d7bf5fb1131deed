"""`DataConfig`: the loader's settings (defaults live only here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tune.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """How photos become training batches. Recipes map their own keys (instance_dir, ...) onto the API."""

    resolution: int = 512
    """Training size in pixels: square crops are resolution x resolution; buckets hold <= resolution^2 pixels."""
    bucketing: bool = True
    """Aspect-ratio buckets (keep each photo's shape) instead of square crops."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (64 for SD; a tiny model's VAE factor, e.g. 8)."""
    bucket_tolerance: float = 0.1
    """Largest relative difference between a photo's aspect ratio and its bucket's (met whenever a bucket
    of at least a quarter of resolution^2 pixels allows it; see tune.data.buckets)."""
    bucket_max_aspect: float = 4.0
    """Most extreme bucket aspect ratio (long side / short side); wider photos are cropped to it."""
    crop: Literal["center", "random"] = "center"
    """Where the crop that fits a photo to its bucket (or square) sits."""
    flip: bool = False
    """Random horizontal flip (p = 0.5). Do not use for subjects with writing or asymmetric marks."""
    repeats: int = 1
    """How many times each photo appears per epoch (class images for prior preservation excepted)."""
    shuffle_captions: bool = False
    """Shuffle comma-separated tags of each caption every step."""
    keep_tokens: int = 0
    """With shuffle_captions: how many leading tags keep their place (e.g. the trigger word)."""
    caption_dropout: float = 0.0
    """Probability of training a sample with the empty caption (for classifier-free guidance)."""
    mask_background_weight: float = 1.0
    """Loss weight of the pixels outside a photo's subject mask (its `-masklabel.png`, tune.data.masks),
    against 1 inside; 1 ignores the masks."""
    keep_masks: bool = False
    """Batches also carry the masks themselves (`Batch.subject_mask`), for the trigger-attention loss
    (tune.personalize.attention_loss)."""
    min_images: int = 1
    """Fewer usable photos than this is an error."""
    min_side: int = 64
    """Photos whose shorter side is below this many pixels are skipped."""
    max_pixels: int = 89_478_485
    """Photos with more pixels are skipped as possible decompression bombs (PIL's default limit)."""
    image_column: str = "image"
    """Image column of a `datasets` dataset or metadata.jsonl folder."""
    caption_column: str = "text"
    """Caption column of a `datasets` dataset or metadata.jsonl folder."""
    mask_column: str = "mask"
    """Subject-mask column of a `datasets` dataset or metadata.jsonl folder (an imagefolder's
    `mask_file_name`, as `tune data world --masks` writes), read when the table has it."""
    split: str = "train"
    """Split to use from a dataset with several."""
    cache_latents: bool = False
    """Encode photos with the VAE once and train from cached latents (needs crop = "center")."""
    cache_text: bool = False
    """Encode captions with the text encoder once (not with shuffle_captions: every step is new text)."""
    cache_dir: str | None = None
    """Where caches live; None means $TUNE_CACHE_DIR, else ~/.cache/tune. Never inside the photo folder."""
    num_workers: int = 0
    """DataLoader worker processes; raise when not caching latents and the GPU waits for JPEG decoding."""
    drop_last: bool = False
    """Drop each bucket's last, incomplete batch."""

    def __post_init__(self) -> None:
        checks = [
            (self.resolution > 0, "data.resolution must be > 0", self.resolution),
            (self.bucket_step > 0, "data.bucket_step must be > 0", self.bucket_step),
            (self.bucket_tolerance >= 0, "data.bucket_tolerance must be >= 0", self.bucket_tolerance),
            (self.bucket_max_aspect >= 1, "data.bucket_max_aspect must be >= 1", self.bucket_max_aspect),
            (self.crop in ("center", "random"), "data.crop must be 'center' or 'random'", self.crop),
            (self.repeats >= 1, "data.repeats must be >= 1", self.repeats),
            (self.keep_tokens >= 0, "data.keep_tokens must be >= 0", self.keep_tokens),
            (0 <= self.caption_dropout <= 1, "data.caption_dropout must be in [0, 1]", self.caption_dropout),
            (
                0 <= self.mask_background_weight <= 1,
                "data.mask_background_weight must be in [0, 1]",
                self.mask_background_weight,
            ),
            (self.min_images >= 1, "data.min_images must be >= 1", self.min_images),
            (self.min_side >= 1, "data.min_side must be >= 1", self.min_side),
            (self.max_pixels >= 1, "data.max_pixels must be >= 1", self.max_pixels),
            (self.num_workers >= 0, "data.num_workers must be >= 0", self.num_workers),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ConfigError(f"{message}; got {value!r}")
        if self.bucketing and self.resolution < self.bucket_step:
            raise ConfigError(
                f"data.resolution ({self.resolution}) must be >= data.bucket_step ({self.bucket_step}); "
                "lower bucket_step or turn bucketing off"
            )
        if self.cache_latents and self.crop == "random":
            raise ConfigError(
                "data.cache_latents needs data.crop = 'center': a cached latent holds one crop; "
                "set crop = 'center' or cache_latents = false"
            )
