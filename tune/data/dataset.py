"""`build_dataset`: check the photos of a source (and its class images) into a `PhotoDataset`.

A `PhotoDataset` holds the checked image records and the transforms of a `DataConfig`. It is indexed
by `ItemKey` (photo, epoch, draw, bucket), which the loader's batch sampler hands it, and draws each
sample's randomness (flip, crop, caption choice / shuffle / dropout, the cached latent's posterior
sample) from (seed, epoch, photo, draw) only. After `cache_latents` / `cache_text` its items carry
`latents` / `encoder_hidden_states` (SDXL: and `pooled_text_embeds`) read from the cache instead of
`pixel_values` / nothing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from PIL import Image

from tune.data.buckets import Bucket, crop_box
from tune.data.cache import CacheStats, load_entry, resolve_cache_dir
from tune.data.captions import transform_caption
from tune.data.concepts import Concept
from tune.data.config import DataConfig
from tune.data.images import crop_and_resize, decode_image, min_scale_size, to_tensor
from tune.data.masks import mask_tensor, read_mask, weight_map
from tune.data.sources import ImageRecord, ScanResult, read_record_bytes, scan_source
from tune.errors import DataError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class ItemKey(NamedTuple):
    """What the batch sampler hands the dataset: which photo, for which epoch and draw, in which bucket."""

    index: int
    epoch: int
    draw: int
    bucket: Bucket


def _fit(
    img: Image.Image,
    box: tuple[float, float, float, float],
    full: tuple[int, int],
    bucket: Bucket,
    flip: bool,
) -> Image.Image:
    """`img` (a photo or its mask) cropped to `box`, resized to `bucket` and flipped as the item draws."""
    img = crop_and_resize(img, box, full, bucket)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


class PhotoDataset(torch.utils.data.Dataset):
    """Checked image records plus the transforms of a `DataConfig`; indexed by `ItemKey`."""

    def __init__(
        self,
        scan: ScanResult,
        cfg: DataConfig,
        *,
        seed: int,
        cache_dir: Path,
        label: str,
    ) -> None:
        self.records: list[ImageRecord] = scan.records
        self.skipped = scan.skipped
        self.tables = scan.tables
        self.cfg = cfg
        self.seed = seed
        self.cache_dir = cache_dir
        self.label = label
        self.latent_files: dict[tuple[int, Bucket, bool], str] | None = None
        """(record index, bucket, flip) -> cache file; set by `cache_latents`."""
        self.latent_shift = 0.0
        self.latent_scale = 1.0
        self.text_files: dict[str, str] | None = None
        """caption -> cache file; set by `cache_text`."""
        self.cache_stats: dict[str, CacheStats] = {}
        """The last caching pass per kind ("latent", "text"): how many entries were encoded vs loaded."""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def instance_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.records) if not r.is_prior]

    @property
    def prior_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.records) if r.is_prior]

    def rng(self, key: ItemKey) -> random.Random:
        # String seeds hash with sha512 in CPython: stable across processes and PYTHONHASHSEED.
        return random.Random(f"{self.seed}:{key.epoch}:{key.index}:{key.draw}")

    def crop(
        self, record: ImageRecord, bucket: Bucket, rng: random.Random
    ) -> tuple[float, float, float, float]:
        return crop_box(record.width, record.height, bucket, mode=self.cfg.crop, rng=rng)

    def load_pixels(
        self, index: int, bucket: Bucket, box: tuple[float, float, float, float], flip: bool
    ) -> torch.Tensor:
        """The CHW float32 [-1, 1] tensor of a record cropped to `box` and resized to `bucket`."""
        record = self.records[index]
        data = read_record_bytes(record, self.tables)
        full = (record.width, record.height)
        img = decode_image(data, max_pixels=self.cfg.max_pixels, min_size=min_scale_size(full, box, bucket))
        return to_tensor(_fit(img, box, full, bucket, flip))

    def load_mask(
        self, record: ImageRecord, bucket: Bucket, box: tuple[float, float, float, float], flip: bool
    ) -> torch.Tensor:
        """[1, H, W] the record's mask in [0, 1], cropped, resized and flipped as its photo is."""
        return mask_tensor(_fit(read_mask(record.mask), box, (record.width, record.height), bucket, flip))

    def __getitem__(self, key: ItemKey | int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(key, int):
            key = ItemKey(key, 0, 0, self.records[key].bucket)
        record = self.records[key.index]
        bucket = key.bucket
        rng = self.rng(key)
        # Fixed draw order (flip, crop, caption, latent noise, sample seed) keeps every sample reproducible.
        flip = self.cfg.flip and rng.random() < 0.5
        box = self.crop(record, bucket, rng)
        text = record.caption
        if record.alt_captions:  # only such records draw here, so others keep their sequence
            text = rng.choice((record.caption, *record.alt_captions))
        caption = transform_caption(
            text,
            rng,
            shuffle=self.cfg.shuffle_captions,
            keep_tokens=self.cfg.keep_tokens,
            dropout=self.cfg.caption_dropout,
        )
        noise_seed = rng.getrandbits(63)
        sample_seed = rng.getrandbits(63)
        scale = bucket[0] / (box[2] - box[0])
        left = (record.width - box[2]) if flip else box[0]
        item: dict[str, Any] = {
            "caption": caption,
            "is_prior": record.is_prior,
            "original_size": (record.height, record.width),
            "crop_top_left": (round(box[1] * scale), round(left * scale)),
            "target_size": (bucket[1], bucket[0]),
            "seed": sample_seed,
        }
        if self.latent_files is not None:
            path = self.latent_files.get((key.index, bucket, flip))
            if path is None:
                raise DataError(
                    f"no cached latent for {record.name} at {bucket[0]}x{bucket[1]}; run cache_latents again"
                )
            entry = load_entry(path)
            gen = torch.Generator().manual_seed(noise_seed)
            sample = entry["mean"] + entry["std"] * torch.randn(entry["mean"].shape, generator=gen)
            item["latents"] = (sample - self.latent_shift) * self.latent_scale
        else:
            item["pixel_values"] = self.load_pixels(key.index, bucket, box, flip)
        if record.mask is not None and (self.cfg.mask_background_weight != 1.0 or self.cfg.keep_masks):
            mask = self.load_mask(record, bucket, box, flip)
            if self.cfg.mask_background_weight != 1.0:
                item["loss_weight"] = weight_map(mask, self.cfg.mask_background_weight)
            if self.cfg.keep_masks:
                item["subject_mask"] = mask
        if self.text_files is not None:
            item.update(load_entry(self.text_files[caption]))  # encoder_hidden_states (+ pooled_text_embeds)
        return item

    def required_latents(self) -> list[tuple[int, Bucket, bool]]:
        """Every (record, bucket, flip) a training run can ask for: what `cache_latents` encodes."""
        flips = (False, True) if self.cfg.flip else (False,)
        instance_buckets = sorted({self.records[i].bucket for i in self.instance_indices})
        out = []
        for i, r in enumerate(self.records):
            buckets = instance_buckets if r.is_prior else [r.bucket]
            out.extend((i, b, f) for b in buckets for f in flips)
        return out


def _summary_line(label: str, scan: ScanResult, n_prior: int) -> str:
    instance = [r for r in scan.records if not r.is_prior]
    parts = [f"data: {len(instance)} usable photos in {label}"]
    if n_prior:
        parts.append(f"{n_prior} class images")
    if scan.skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in scan.reason_counts().items())
        examples = ", ".join(f"{s.name} ({s.reason})" for s in scan.skipped[:3])
        more = ", ..." if len(scan.skipped) > 3 else ""
        parts.append(
            f"skipped {len(scan.skipped)} files ({counts}: {examples}{more}; `tune data check` lists all)"
        )
    uncaptioned = sum(1 for r in instance if not r.caption)
    if uncaptioned:
        parts.append(f"{uncaptioned} without a caption train with the empty caption")
    if scan.sidecars_ignored:
        parts.append(
            f"{scan.sidecars_ignored} caption sidecars ignored in favour of the instance prompt (a sidecar "
            "that contains the instance prompt and says more is used)"
        )
    return "; ".join(parts)


def _source_roots(sources: Sequence[Any]) -> list[Path]:
    roots = []
    for s in sources:
        if isinstance(s, (str, Path)) and not str(s).startswith("hf:"):
            roots.append(Path(s).expanduser().resolve())
    return roots


def build_dataset(
    source: str | Path | Concept | datasets.Dataset | datasets.DatasetDict,
    cfg: DataConfig,
    *,
    instance_prompt: str | None = None,
    class_source: str | Path | None = None,
    class_prompt: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> PhotoDataset:
    """Check every photo of `source` (and of `class_source`) and return the training dataset.

    source: a photo folder, a metadata.jsonl folder, a saved dataset folder, `hf:NAME`, a `datasets`
        object, or a `Concept` (its photos, instance prompt, and class images when its prior
        preservation is enabled and has a `class_dir`).
    instance_prompt: the caption of every instance photo; None means sidecars / the caption column.
    class_source, class_prompt: class images for prior preservation and their caption.
    cache_dir: overrides `cfg.cache_dir` (default `$TUNE_CACHE_DIR` or `~/.cache/tune`).

    Logs one summary line (usable photos, skipped files by reason). Raises `DataError` when fewer than
    `cfg.min_images` instance photos are usable, naming the folder and the reasons.
    """
    if isinstance(source, Concept):
        concept = source
        source = concept.instance_dir
        if instance_prompt is None:
            instance_prompt = concept.instance_caption
        prior = concept.prior_preservation
        if class_source is None and prior.enabled and prior.class_dir is not None:
            class_source = prior.class_dir
        if class_prompt is None and class_source is not None:
            class_prompt = concept.class_caption
    resolved_cache = resolve_cache_dir(cache_dir, cfg.cache_dir)
    for root in _source_roots([source, class_source]):
        if resolved_cache == root or resolved_cache.is_relative_to(root):
            raise DataError(
                f"cache dir {resolved_cache} is inside the photo folder {root}; the photo folder is only "
                "ever read: set data.cache_dir or TUNE_CACHE_DIR elsewhere"
            )
    label = str(source) if not hasattr(source, "column_names") else "dataset"
    scan = scan_source(source, cfg, cache_dir=resolved_cache, instance_prompt=instance_prompt)
    usable = len(scan.records)
    if usable < cfg.min_images:
        counts = ", ".join(f"{n} {reason}" for reason, n in scan.reason_counts().items()) or "none skipped"
        raise DataError(
            f"{label}: {usable} usable image{'s' if usable != 1 else ''}, need at least {cfg.min_images} "
            f"(skipped {len(scan.skipped)}: {counts}); run `tune data check {label}` for the list"
        )
    n_prior = 0
    if class_source is not None:
        prior_scan = scan_source(
            class_source, cfg, cache_dir=resolved_cache, instance_prompt=class_prompt, is_prior=True
        )
        n_prior = len(prior_scan.records)
        scan.extend(prior_scan)
    skipped_any = bool(scan.skipped)
    logger.log(logging.WARNING if skipped_any else logging.INFO, _summary_line(label, scan, n_prior))
    return PhotoDataset(scan, cfg, seed=seed, cache_dir=resolved_cache, label=label)
