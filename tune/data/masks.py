"""Subject masks: which pixels of a photo are the subject, so that training weighs them above the rest.

A photo `IMG_0042.jpg` may have a mask beside it, `IMG_0042-masklabel.png` (OneTrainer's name for it):
a greyscale image of the photo's size, white where the subject is, black elsewhere (grey in between).
The folder scan finds it (`tune.data.sources`) and never takes it for a photo; the dataset crops,
resizes and flips it with its photo (`PhotoDataset`); the loss weighs each latent pixel by
`background_weight + (1 - background_weight) * mask` and averages by those weights
(`tune.diffusion.denoising_loss`), so a photo's surface (a table, the grass) costs the adapter little
capacity and the subject the most. Photos without a mask, and class images, weigh every pixel 1.

Masks come from wherever the user makes them (an image editor, a background remover); the world's
subjects get theirs from the renderer (`tune.world.subjects.write_photos`). A mask is read here with
Pillow, by hand: kohya's and OneTrainer's masked training live inside their trainers, not in a library.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tune.errors import DataError

if TYPE_CHECKING:
    import torch

MASK_SUFFIX = "-masklabel.png"
"""A photo's mask is the photo's file name without its suffix, plus this."""


def is_mask_file(name: str | Path) -> bool:
    """Whether a file is a photo's mask (never a photo itself)."""
    return Path(name).name.lower().endswith(MASK_SUFFIX)


def mask_path(photo: str | Path) -> Path:
    """Where `photo`'s mask goes: `IMG_0042.jpg` -> `IMG_0042-masklabel.png` beside it."""
    path = Path(photo)
    return path.with_name(path.stem + MASK_SUFFIX)


def mask_sidecar(photo: str | Path) -> Path | None:
    """The mask file beside `photo`, when there is one."""
    mask = mask_path(photo)
    return mask if mask.is_file() else None


def check_mask(path: str | Path, photo_size: tuple[int, int]) -> None:
    """A one-line DataError unless `path` is an image of the photo's (width, height), as the photo is
    oriented after EXIF."""
    try:
        with Image.open(path) as img:
            size = img.size
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable mask image ({e}); fix or remove it") from None
    if size != tuple(photo_size):
        raise DataError(
            f"{path} is {size[0]}x{size[1]} but its photo is {photo_size[0]}x{photo_size[1]}: "
            "a mask must be the photo's size (or remove it)"
        )


def read_mask(path: str | Path) -> Image.Image:
    """The mask as an 8-bit greyscale image (any mode is converted; an alpha channel is not read)."""
    with Image.open(path) as img:
        return img.convert("L")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """[1, H, W] float32 in [0, 1] from a (cropped, resized) mask: 1 on the subject."""
    import torch  # here, not at the top: the dashboard reads `is_mask_file` and never imports torch

    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def weight_map(share: torch.Tensor, background_weight: float) -> torch.Tensor:
    """[1, H, W] float32 per-pixel loss weights from a `mask_tensor`: 1 on the subject,
    `background_weight` elsewhere, in between where the mask is grey."""
    return background_weight + (1.0 - background_weight) * share
