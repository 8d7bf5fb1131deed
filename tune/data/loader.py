"""The shared data loader: photos (or a dataset, or a concept) to `Batch`es, for every recipe.

    cfg = DataConfig(resolution=512, cache_latents=True)
    dataset = build_dataset("photos/", cfg, instance_prompt="a photo of sks dog", seed=0)
    cache_latents(dataset, vae, device="cuda")              # when cfg.cache_latents
    cache_text(dataset, text_encoder, tokenizer, device="cuda")  # when cfg.cache_text
    loader = build_dataloader(dataset, batch_size=4, tokenizer=tokenizer, accelerator=accelerator)
    for batch in loader:                                      # Batch; batch.to(device)
        ...
    state = loader.state_dict()                               # save with the checkpoint; load_state_dict to resume

Determinism: the order of batches depends only on (seed, epoch); each sample's randomness (flip,
random crop, caption shuffle / dropout, the latent's posterior sample) depends only on (seed, epoch,
photo, draw). So the same seed gives the same batches whatever `num_workers`, and resuming from
`state_dict()` (epoch and batches consumed) continues exactly where the run stopped.

Buckets and batches: a batch holds photos of one bucket only. Each epoch the photos (x repeats) are
shuffled, grouped per bucket in that order, cut into batches, and the batches shuffled.

Prior preservation (DreamBooth): with class images, every batch is `batch_size` instance photos
followed by `batch_size` class images (`Batch.is_prior` marks them), as in diffusers' DreamBooth
script. Class images are fitted into the instance batch's bucket, so with bucketing on, their latents
are cached once per bucket the instance photos use.

Sharding (multi-GPU): the batch sampler shards whole batches itself. Give `build_dataloader` the
`accelerate.Accelerator` (or `num_processes` / `process_index`): every process computes the same
global list of same-bucket batches, pads it by cycling from its start to a multiple of the process
count (so every process runs the same number of steps, as accelerate's `even_batches` does), and
takes every `num_processes`-th batch from `process_index`. Do not pass the returned loader through
`accelerator.prepare`: accelerate's `BatchSamplerShard` would shard again, and with a fixed batch size
it drops a bucket's short last batch. Move batches with `batch.to(accelerator.device)`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from tune.data.batches import Batch, _tokenize, collate
from tune.data.buckets import Bucket, crop_box
from tune.data.cache import (
    CacheStats,
    entry_path,
    fingerprint_model,
    is_readable,
    make_key,
    save_entry,
)
from tune.data.config import DataConfig
from tune.data.dataset import ItemKey, PhotoDataset, build_dataset
from tune.errors import DataError

__all__ = [
    "Batch",
    "BucketBatchSampler",
    "DataConfig",
    "ItemKey",
    "PhotoDataset",
    "PhotoLoader",
    "build_dataloader",
    "build_dataset",
    "cache_latents",
    "cache_text",
    "collate",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- caches


def _is_mine(position: int, accelerator: Any) -> bool:
    """Whether the job at `position` of the full job list is this process's to encode. Sharding the full
    list, not the missing entries, keeps the shares disjoint and complete when a faster process has
    already written its share before another one looks at the disk."""
    return accelerator is None or position % accelerator.num_processes == accelerator.process_index


def _vae_posterior(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = vae.encode(pixels)
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        return dist.mean, dist.std
    # Deterministic encoders (AutoencoderTiny) return latents directly: a posterior with zero spread.
    latents = out.latents if hasattr(out, "latents") else out[0]
    return latents, torch.zeros_like(latents)


@torch.no_grad()
def cache_latents(
    dataset: PhotoDataset,
    vae: torch.nn.Module,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    accelerator: Any = None,
) -> CacheStats:
    """Encode every photo variant the run needs once; later runs on the same photos load from disk.

    Afterwards the dataset yields `latents` (scaled by the VAE's shift/scaling factors) instead of
    `pixel_values`. Returns (and logs) how many entries were encoded vs loaded. With an accelerator,
    each process encodes its share, then all wait for each other.
    """
    cache_dir = dataset.cache_dir
    model_fp = fingerprint_model(vae)
    cfg = dataset.cfg
    jobs = dataset.required_latents()
    paths: dict[tuple[int, Bucket, bool], str] = {}
    mine = []  # this process's share of the missing entries
    stats = CacheStats("latent")
    for position, job in enumerate(jobs):
        index, bucket, flip = job
        record = dataset.records[index]
        box = crop_box(record.width, record.height, bucket, mode="center")
        key = make_key(
            kind="latent",
            model=model_fp,
            image=record.sha256,
            resolution=cfg.resolution,
            bucket=list(bucket),
            box=list(box),
            flip=flip,
        )
        path = entry_path(cache_dir, "latents", model_fp, key)
        paths[job] = str(path)
        if is_readable(path):
            stats.loaded += 1
        elif _is_mine(position, accelerator):
            mine.append((job, box, path))
    if mine:
        vae_device = torch.device(device)
        vae_dtype = dtype or next(vae.parameters()).dtype
        by_bucket: dict[Bucket, list[Any]] = {}
        for item in mine:
            by_bucket.setdefault(item[0][1], []).append(item)
        workers = max(1, min(8, os.cpu_count() or 1))
        with (
            tqdm(total=len(mine), desc="caching latents", unit="img") as bar,
            concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool,
        ):
            for items in by_bucket.values():
                for start in range(0, len(items), batch_size):
                    chunk = items[start : start + batch_size]
                    pixels = list(
                        pool.map(lambda it: dataset.load_pixels(it[0][0], it[0][1], it[1], it[0][2]), chunk)
                    )
                    batch = torch.stack(pixels).to(vae_device, vae_dtype)
                    mean, std = _vae_posterior(vae, batch)
                    for (_, _, path), m, s in zip(chunk, mean.float().cpu(), std.float().cpu(), strict=True):
                        save_entry(path, {"mean": m, "std": s}, {"format": "tune-latent"})
                    stats.encoded += len(chunk)
                    bar.update(len(chunk))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    config = getattr(vae, "config", None)
    dataset.latent_scale = float(getattr(config, "scaling_factor", None) or 1.0)
    dataset.latent_shift = float(getattr(config, "shift_factor", None) or 0.0)
    dataset.latent_files = paths
    dataset.cache_stats["latent"] = stats
    logger.info(str(stats))
    return stats


@torch.no_grad()
def cache_text(
    dataset: PhotoDataset,
    text_encoder: torch.nn.Module,
    tokenizer: Callable[..., Any],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    max_length: int | None = None,
    accelerator: Any = None,
) -> CacheStats:
    """Encode each distinct caption once (`text_encoder(input_ids)[0]`, the `encoder_hidden_states`).

    With caption dropout the empty caption is cached too (one entry per variant). With
    `shuffle_captions` nothing is cached (every step is new text): the stats say so and batches keep
    `input_ids` for the recipe to encode.
    """
    stats = CacheStats("text")
    if dataset.cfg.shuffle_captions:
        stats.note = "off: shuffle_captions makes new text every step"
        dataset.text_files = None
        dataset.cache_stats["text"] = stats
        logger.info(str(stats))
        return stats
    captions = sorted(
        {c for r in dataset.records for c in (r.caption, *r.alt_captions)}
        | ({""} if dataset.cfg.caption_dropout > 0 else set())
    )
    model_fp = fingerprint_model(text_encoder)
    ids = _tokenize(tokenizer, captions, max_length)
    paths: dict[str, str] = {}
    mine = []  # this process's share of the missing entries
    for position, (caption, row) in enumerate(zip(captions, ids, strict=True)):
        key = make_key(kind="text", model=model_fp, input_ids=[int(t) for t in row])
        path = entry_path(dataset.cache_dir, "text", model_fp, key)
        paths[caption] = str(path)
        if is_readable(path):
            stats.loaded += 1
        elif _is_mine(position, accelerator):
            mine.append((row, path))
    with tqdm(total=len(mine), desc="caching text", unit="caption", disable=not mine) as bar:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            input_ids = torch.stack([row for row, _ in chunk]).to(device)
            hidden = text_encoder(input_ids)[0]
            for (_, path), h in zip(chunk, hidden.float().cpu(), strict=True):
                save_entry(path, {"encoder_hidden_states": h}, {"format": "tune-text"})
            stats.encoded += len(chunk)
            bar.update(len(chunk))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    dataset.text_files = paths
    dataset.cache_stats["text"] = stats
    logger.info(str(stats))
    return stats


class BucketBatchSampler(torch.utils.data.Sampler[list[ItemKey]]):
    """Same-bucket batches, deterministic per (seed, epoch), sharded across processes, resumable.

    Iterating yields this process's batches of epoch `start_epoch` from batch `start_position` on;
    `PhotoLoader` sets those and counts what it hands out.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        is_prior: Sequence[bool],
        *,
        batch_size: int,
        seed: int = 0,
        repeats: int = 1,
        drop_last: bool = False,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1; got {batch_size}")
        if not 0 <= process_index < num_processes:
            raise DataError(f"process_index must be in [0, {num_processes}); got {process_index}")
        self.buckets = list(buckets)
        self.instance = [i for i, p in enumerate(is_prior) if not p]
        self.prior = [i for i, p in enumerate(is_prior) if p]
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.drop_last = drop_last
        self.num_processes = num_processes
        self.process_index = process_index
        self.start_epoch = 0
        self.start_position = 0
        if not self.global_batches(0):
            raise DataError(
                f"no full batch of {batch_size} in any bucket with drop_last on; lower the batch size or turn "
                "drop_last off"
            )

    def global_batches(self, epoch: int) -> list[list[ItemKey]]:
        """Every process's batches of `epoch`, before sharding."""
        rng = random.Random(f"{self.seed}:order:{epoch}")
        draws = [(i, r) for r in range(self.repeats) for i in self.instance]
        rng.shuffle(draws)
        per_bucket: dict[Bucket, list[tuple[int, int]]] = {}
        for i, r in draws:
            per_bucket.setdefault(self.buckets[i], []).append((i, r))
        batches: list[list[ItemKey]] = []
        for bucket in sorted(per_bucket):
            items = per_bucket[bucket]
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                if self.drop_last and len(chunk) < self.batch_size:
                    continue
                batches.append([ItemKey(i, epoch, r, bucket) for i, r in chunk])
        rng.shuffle(batches)
        if self.prior:
            # Pair each instance batch with as many class images, cycling a per-epoch shuffle of them.
            order = list(self.prior)
            random.Random(f"{self.seed}:prior:{epoch}").shuffle(order)
            n = 0
            for batch in batches:
                bucket = batch[0].bucket
                for _ in range(len(batch)):
                    batch.append(ItemKey(order[n % len(order)], epoch, n // len(order), bucket))
                    n += 1
        return batches

    def epoch_batches(self, epoch: int) -> list[list[ItemKey]]:
        """This process's batches of `epoch`."""
        batches = self.global_batches(epoch)
        total = math.ceil(len(batches) / self.num_processes) * self.num_processes
        padded = [batches[i % len(batches)] for i in range(total)] if batches else []
        return padded[self.process_index :: self.num_processes]

    def __len__(self) -> int:
        return math.ceil(len(self.global_batches(0)) / self.num_processes)

    def __iter__(self) -> Iterator[list[ItemKey]]:
        yield from self.epoch_batches(self.start_epoch)[self.start_position :]


@dataclass
class PhotoLoader:
    """A torch DataLoader plus the position it has reached, for exact resume.

    Iterate it once per epoch; `state_dict()` is {"epoch", "position", "seed"} (plus "num_processes" when
    sharded) where position is how many batches of that epoch this process has handed out. Breaking out
    of the loop and iterating again continues the same epoch.
    """

    dataloader: torch.utils.data.DataLoader
    sampler: BucketBatchSampler
    epoch: int = 0
    position: int = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.start_epoch, self.sampler.start_position = self.epoch, self.position
        for batch in self.dataloader:
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.sampler.seed}
        if self.sampler.num_processes > 1:  # absent means 1
            state["num_processes"] = self.sampler.num_processes
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` stopped, also with another process count: the position then counts the
        same global batches (rounded up to whole batches of this process count)."""
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise DataError(
                f"resume state was saved with data seed {state['seed']}, this run uses {self.sampler.seed}; "
                "resume with the same seed"
            )
        global_position = int(state["position"]) * int(state.get("num_processes", 1))
        self.epoch = int(state["epoch"])
        self.position = math.ceil(global_position / self.sampler.num_processes)


def build_dataloader(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    tokenizer: Callable[..., Any] | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    accelerator: Any = None,
    num_processes: int = 1,
    process_index: int = 0,
) -> PhotoLoader:
    """Batches of `batch_size` same-bucket samples (plus as many class images with prior preservation).

    tokenizer: any HF-style tokenizer / callable `(texts, padding="max_length", max_length=...,
        truncation=True, return_tensors="pt")`; batches then carry `input_ids` (unless text is cached).
    seed: the order's seed; defaults to the dataset's.
    accelerator / num_processes, process_index: shard across processes (see the module docstring).
    """
    if accelerator is not None:
        num_processes, process_index = accelerator.num_processes, accelerator.process_index
    sampler = BucketBatchSampler(
        [r.bucket for r in dataset.records],
        [r.is_prior for r in dataset.records],
        batch_size=batch_size,
        seed=dataset.seed if seed is None else seed,
        repeats=dataset.cfg.repeats,
        drop_last=dataset.cfg.drop_last,
        num_processes=num_processes,
        process_index=process_index,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, tokenizer=tokenizer, max_length=max_length),
        num_workers=dataset.cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        # Every `iter()` of a DataLoader draws a base seed; from its own generator that draw leaves the
        # global torch RNG alone, so recipes drawing noise from it resume exactly after a checkpoint.
        generator=torch.Generator().manual_seed(sampler.seed),
    )
    return PhotoLoader(dataloader, sampler)
