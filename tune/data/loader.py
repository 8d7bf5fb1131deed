"""The shared data loader: photos (or a dataset, or a concept) to `Batch`es, for every recipe.

    cfg = DataConfig(resolution=512, cache_latents=True)
    dataset = build_dataset("photos/", cfg, instance_prompt="a photo of sks dog", seed=0)
    cache_latents(dataset, vae, device="cuda")              # when cfg.cache_latents
    cache_text(dataset, text_encoder, tokenizer, device="cuda")  # when cfg.cache_text (SDXL: + text_encoder_2=, tokenizer_2=)
    loader = build_dataloader(dataset, batch_size=4, tokenizer=tokenizer, accelerator=accelerator)
    for batch in loader:                                      # Batch; batch.to(device)
        ...
    state = loader.state_dict()                               # save with the checkpoint; load_state_dict to resume

This module orders the batches (`BucketBatchSampler`) and builds the loader (`build_dataloader`,
`PhotoLoader`). What the lines above use from elsewhere is re-exported here: `build_dataset`,
`PhotoDataset`, `ItemKey` from `tune.data.dataset`; `cache_latents` from `tune.data.cache`, `cache_text`
from `tune.data.text_cache`; `Batch`, `collate` from `tune.data.batches`; `DataConfig` from `tune.data.config`.

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

Sharding (multi-GPU): the batch sampler shards itself. Give `build_dataloader` the
`accelerate.Accelerator` (or `num_processes` / `process_index`): every process computes the same
global list of same-bucket batches of `batch_size x num_processes` photos (and as many class images),
the list one process with that batch size draws, and takes its slice of each: process i the i-th
`batch_size` photos and their class images. So N processes x batch b train on the same samples, with
the same noise, as 1 process x batch N*b, and every process runs the same number of steps (a bucket's
short last batch is split as evenly as it goes; a process left without a photo repeats one). Do not
pass the returned loader through `accelerator.prepare`: accelerate's `BatchSamplerShard` would shard
again, and with a fixed batch size it drops a bucket's short last batch. Move batches with
`batch.to(accelerator.device)`.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tune.data.batches import Batch, collate
from tune.data.buckets import Bucket
from tune.data.cache import cache_latents
from tune.data.config import DataConfig
from tune.data.dataset import ItemKey, PhotoDataset, build_dataset
from tune.data.text_cache import cache_text
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
        """The steps' batches of `epoch` across all processes (batch_size x num_processes photos each, then
        as many class images), before each process takes its share: what one process with that batch size
        would draw."""
        size = self.batch_size * self.num_processes
        rng = random.Random(f"{self.seed}:order:{epoch}")
        draws = [(i, r) for r in range(self.repeats) for i in self.instance]
        rng.shuffle(draws)
        per_bucket: dict[Bucket, list[tuple[int, int]]] = {}
        for i, r in draws:
            per_bucket.setdefault(self.buckets[i], []).append((i, r))
        batches: list[list[ItemKey]] = []
        for bucket in sorted(per_bucket):
            items = per_bucket[bucket]
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                if self.drop_last and len(chunk) < size:
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
        """This process's batches of `epoch`: its share of each global batch."""
        return [self._share(batch) for batch in self.global_batches(epoch)]

    def _share(self, batch: list[ItemKey]) -> list[ItemKey]:
        """This process's photos of a global batch (a contiguous slice; the sizes of a short batch's slices
        differ by one at most, and a process left without a photo repeats one), then its class images."""
        n = len(batch) // 2 if self.prior else len(batch)  # the photos, then as many class images
        photos, priors = batch[:n], batch[n:]
        start = self.process_index * n // self.num_processes
        end = (self.process_index + 1) * n // self.num_processes
        if start == end:  # fewer photos than processes: every process still runs the step
            start, end = self.process_index % n, self.process_index % n + 1
        return photos[start:end] + priors[start:end]

    def __len__(self) -> int:
        return len(self.global_batches(0))

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
        if self.sampler.num_processes > 1:  # absent means 1 process (and this run's batch size)
            state["num_processes"] = self.sampler.num_processes
            state["batch_size"] = self.sampler.batch_size
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` stopped, also with another process count: the position then counts the
        same photos (rounded up to whole batches). Exact when the global batch (batch_size x processes)
        is the same, e.g. 2 processes x batch 1 resumed as 1 x batch 2; another global batch cuts the
        rest of the epoch into other batches."""
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise DataError(
                f"resume state was saved with data seed {state['seed']}, this run uses {self.sampler.seed}; "
                "resume with the same seed"
            )
        sampler = self.sampler
        saved_batch = int(state.get("batch_size", sampler.batch_size)) * int(state.get("num_processes", 1))
        photos = int(state["position"]) * saved_batch
        self.epoch = int(state["epoch"])
        self.position = math.ceil(photos / (sampler.batch_size * sampler.num_processes))


def build_dataloader(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    tokenizer: Callable[..., Any] | None = None,
    max_length: int | None = None,
    tokenizer_2: Callable[..., Any] | None = None,
    seed: int | None = None,
    accelerator: Any = None,
    num_processes: int = 1,
    process_index: int = 0,
) -> PhotoLoader:
    """Batches of `batch_size` same-bucket samples (plus as many class images with prior preservation).

    tokenizer: any HF-style tokenizer / callable `(texts, padding="max_length", max_length=...,
        truncation=True, return_tensors="pt")`; batches then carry `input_ids` (unless text is cached).
    tokenizer_2: SDXL's second tokenizer; batches then carry `input_ids_2` too.
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
        collate_fn=functools.partial(
            collate, tokenizer=tokenizer, max_length=max_length, tokenizer_2=tokenizer_2
        ),
        num_workers=dataset.cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        # Every `iter()` of a DataLoader draws a base seed; from its own generator that draw leaves the
        # global torch RNG alone, so recipes drawing noise from it resume exactly after a checkpoint.
        generator=torch.Generator().manual_seed(sampler.seed),
    )
    return PhotoLoader(dataloader, sampler)
