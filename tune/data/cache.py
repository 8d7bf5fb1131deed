"""On-disk caches of VAE latents and text-encoder outputs (safetensors, written atomically).

Layout: `<cache_dir>/<kind>/<model fingerprint[:16]>/<key[:2]>/<key>.safetensors`, kind is
`latents` or `text`. Nothing is ever written into the user's photo folder.

Cache keys (sha256 of a small JSON document) hold everything the stored tensor depends on:
- latents: model fingerprint, the photo's content hash (sha256 of the file bytes, so a renamed photo
  still hits and an edited one misses), training resolution, bucket, crop box and flip;
- text: model fingerprint and the token ids (so a tokenizer change is a miss too); SDXL's entries add
  the second encoder's fingerprint and the second tokenizer's ids (`tune.data.text_cache`).

The model fingerprint (`fingerprint_model`) is a sha256 of the model class, its config (minus keys
starting with "_" and library versions, so the same weights loaded from another path still hit)
and, for every parameter and buffer, its name, shape, dtype and an evenly strided sample of at most
1,024 of its values. Fine-tuning touches almost every value of a tensor it trains, so a sample finds
any real change without reading all weights (a few ms even for SD's 83M-parameter VAE).

A latent entry stores the VAE's posterior (`mean`, `std`) in float32 before scaling: the loader draws
a fresh sample each step, like encoding on the fly would, then applies the VAE's shift/scale factors.

`cache_latents(dataset, vae)` and `cache_text(dataset, text_encoder, tokenizer)` (in
`tune.data.text_cache`) fill the caches for a `PhotoDataset`: each encodes only the entries not on disk yet (with an accelerator, each process
its share), then points the dataset at the files.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tune.data.buckets import Bucket, crop_box

if TYPE_CHECKING:
    from tune.data.dataset import PhotoDataset

CACHE_ENV = "TUNE_CACHE_DIR"
FORMAT_VERSION = 1
"""Bump when what a cache entry means changes; old entries then miss."""
_SAMPLES_PER_TENSOR = 1024

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$TUNE_CACHE_DIR`, else `~/.cache/tune`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tune"


def resolve_cache_dir(*candidates: str | Path | None) -> Path:
    """The first given candidate (argument, then config), else the default; made absolute."""
    for c in candidates:
        if c is not None:
            return Path(c).expanduser().resolve()
    return default_cache_dir().resolve()


def _config_dict(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        k: v
        for k, v in raw.items()
        if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")
    }


@torch.no_grad()
def fingerprint_model(model: torch.nn.Module) -> str:
    """A stable hex id of a model's config and weights (see the module docstring)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    h.update(json.dumps(_config_dict(model), sort_keys=True, default=str).encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::stride][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def make_key(**parts: Any) -> str:
    """sha256 of the parts as canonical JSON (plus the format version)."""
    doc = json.dumps({"v": FORMAT_VERSION, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


def entry_path(cache_dir: Path, kind: str, model_fp: str, key: str) -> Path:
    return cache_dir / kind / model_fp[:16] / key[:2] / f"{key}.safetensors"


def is_readable(path: Path) -> bool:
    """Whether a cache file exists and its header parses (cheap: reads the header, not the tensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys())) > 0
    except Exception:  # missing, truncated by a crashed disk, or not safetensors: re-encode
        return False


def save_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a cache entry atomically: a temp file in the same folder, then `os.replace`.

    A crash mid-write leaves at most a stray temp file, never a half-written entry under the real name;
    two processes writing the same entry both produce a complete file and the last rename wins.
    """
    from tune.durable import check_disk_space

    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    check_disk_space(path.parent, size, "the cache")  # a clear error, not a short file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:  # durable before it is renamed into place
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_entry(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@dataclass
class CacheStats:
    """What a caching pass did: `encoded` new entries, `loaded` entries found from an earlier run."""

    kind: str
    encoded: int = 0
    loaded: int = 0
    note: str = ""
    """Why a cache was not used (e.g. caption shuffle), else empty."""

    @property
    def hit_rate(self) -> float:
        total = self.encoded + self.loaded
        return self.loaded / total if total else 0.0

    def __str__(self) -> str:
        text = f"{self.kind} cache: {self.encoded} encoded, {self.loaded} loaded"
        return f"{text} ({self.note})" if self.note else text


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
