"""The world as data: deterministic samples, an imagefolder on disk (`tune data world`), eval prompts.

    tune data world data/world-train --count 30000 --split train --seed 0

Sample `i` of seed `s` depends only on (s, i): streams and folders of different lengths agree on
their common prefix. Each metadata.jsonl row holds `file_name`, `text` (the canonical caption),
`captions` (the eight training captions of `tune.world.captions.training_captions`; the shared loader
draws one per step), and the spec's attributes, so `datasets.load_dataset("imagefolder", ...)` reads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from tune.errors import ConfigError, DataError
from tune.world.captions import caption, madeup_words, training_captions
from tune.world.render import object_mask, render
from tune.world.spec import CLASSES, SPLITS, STYLES, Spec, Split, check_split, sample_spec

logger = logging.getLogger(__name__)


MASK_FOLDER = "masks"
"""Where `write_imagefolder(..., masks=True)` puts the objects' masks, under the same file names."""


class Sample(NamedTuple):
    image: Image.Image
    spec: Spec
    captions: list[str]


class EvalPrompt(NamedTuple):
    """A canonical prompt and the spec it describes (what the judge should read)."""

    prompt: str
    spec: Spec


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    return madeup_words()


def _rng(index: int, split: Split, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, SPLITS.index(split)])


def sample(index: int, split: Split = "train", seed: int = 0, resolution: int = 64) -> Sample:
    """Sample `index` of the stream (split, seed): a spec, its picture and its training captions."""
    rng = _rng(index, split, seed)
    spec = sample_spec(rng, split)
    image = render(spec, rng, resolution, resolution)
    return Sample(image, spec, training_captions(spec, rng, _words()))


def sample_mask(index: int, split: Split = "train", seed: int = 0, resolution: int = 64) -> Image.Image:
    """Where the object of `sample(index, ...)` is: white on the object (a `tune.data.masks` mask)."""
    rng = _rng(index, split, seed)
    spec = sample_spec(rng, split)  # the same draws as `sample`, up to the picture's
    mask = object_mask(spec, rng, resolution, resolution)
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def stream(
    split: Split = "train", count: int | None = None, seed: int = 0, resolution: int = 64
) -> Iterator[Sample]:
    """Samples 0, 1, ... of (split, seed); endless when `count` is None (renders on the fly)."""
    check_split(split)
    index = 0
    while count is None or index < count:
        yield sample(index, split, seed, resolution)
        index += 1


def metadata_row(file_name: str, item: Sample) -> dict:
    return {
        "file_name": file_name,
        "text": caption(item.spec),
        "captions": item.captions,
        **asdict(item.spec),
    }


def _write_one(job: tuple[int, str, str, int, int, str, bool]) -> str:
    index, out, split, seed, resolution, file_name, masks = job
    item = sample(index, split, seed, resolution)  # type: ignore[arg-type]
    item.image.save(Path(out) / file_name, format="PNG")
    row = metadata_row(file_name, item)
    if masks:  # an imagefolder's *_file_name column: datasets reads it as the image column "mask"
        row["mask_file_name"] = f"{MASK_FOLDER}/{file_name}"
        sample_mask(index, split, seed, resolution).save(Path(out) / MASK_FOLDER / file_name, format="PNG")  # type: ignore[arg-type]
    return json.dumps(row)


def write_imagefolder(
    out_dir: str | Path,
    count: int,
    split: Split = "train",
    seed: int = 0,
    resolution: int = 64,
    *,
    workers: int = 1,
    progress: bool = False,
    masks: bool = False,
) -> Path:
    """Write `count` PNGs and metadata.jsonl into a new or empty folder (metadata last: a folder without
    it is visibly unfinished). `workers` processes render in parallel; the files do not depend on it.
    `masks`: also each object's mask (`masks/<file name>`, the metadata's `mask_file_name`), which the
    shared loader reads as the image's subject mask (for the unet recipe's attention loss)."""
    check_split(split)
    if count <= 0:
        raise ConfigError(f"count must be > 0; got {count}")
    if resolution < 16:
        raise ConfigError(f"resolution must be >= 16; got {resolution}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; choose a new folder or empty it first")
    out.mkdir(parents=True, exist_ok=True)
    if masks:
        (out / MASK_FOLDER).mkdir()
    digits = max(6, len(str(count - 1)))
    jobs = [(i, str(out), split, seed, resolution, f"{i:0{digits}d}.png", masks) for i in range(count)]
    bar = tqdm(total=count, desc=f"world {split}", unit="img", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = []
            for row in pool.map(_write_one, jobs, chunksize=64):
                rows.append(row)
                bar.update(1)
    else:
        rows = []
        for job in jobs:
            rows.append(_write_one(job))
            bar.update(1)
    bar.close()
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    logger.info("wrote %d %s world images (%dpx, seed %d) to %s", count, split, resolution, seed, out)
    return out


def make_eval_prompts(
    n: int, split: Split = "train", seed: int = 0, styles: tuple[str, ...] = STYLES
) -> list[EvalPrompt]:
    """`n` canonical prompts with their specs, for evaluation: styles take turns (so each gets n / 4),
    and within a style the classes take turns; everything else is drawn from `split` with `seed`."""
    check_split(split)
    if n <= 0:
        raise ConfigError(f"n must be > 0; got {n}")
    rng = np.random.default_rng([seed, 7])
    classes = ("ball", "ring", "block", "cup", "cone") if split == "heldout" else CLASSES
    prompts: list[EvalPrompt] = []
    while len(prompts) < n:
        style = styles[len(prompts) % len(styles)]
        cls = classes[(len(prompts) // len(styles)) % len(classes)]
        for _ in range(1000):
            spec = sample_spec(rng, split, style=style)  # type: ignore[arg-type]
            if spec.cls == cls:
                break
        prompts.append(EvalPrompt(caption(spec), spec))
    return prompts
