"""`Batch`, the one batch type of every recipe, and `collate`, which stacks dataset items into one.

Images of a batch share one bucket (size). `collate` tokenizes the captions when a tokenizer is given
and text is not cached (SDXL: with `tokenizer_2` too, into `input_ids_2`); `_tokenize` is also how
`cache_text` tokenizes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class Batch:
    """One batch, the same type for every recipe. Images of a batch share one bucket (size)."""

    captions: list[str]
    """Captions after shuffle / dropout, one per sample."""
    is_prior: torch.Tensor
    """bool [B]: class images for prior preservation (they follow the instance photos)."""
    original_sizes: torch.Tensor
    """long [B, 2]: (height, width) of each photo before cropping (SDXL micro-conditioning)."""
    crop_top_lefts: torch.Tensor
    """long [B, 2]: (top, left) of the crop in resized-photo pixels (SDXL micro-conditioning)."""
    target_size: tuple[int, int]
    """(height, width) of this batch's images."""
    pixel_values: torch.Tensor | None = None
    """float32 [B, 3, H, W] in [-1, 1]; None when latents are cached."""
    latents: torch.Tensor | None = None
    """[B, C, H/f, W/f], already shifted and scaled by the VAE's factors; None when not cached."""
    input_ids: torch.Tensor | None = None
    """long [B, L] token ids, when a tokenizer was given and text is not cached."""
    input_ids_2: torch.Tensor | None = None
    """long [B, L] token ids of SDXL's second tokenizer, when it was given and text is not cached."""
    encoder_hidden_states: torch.Tensor | None = None
    """[B, L, D] text-encoder outputs, when text is cached (SDXL: both encoders' penultimate states)."""
    pooled_text_embeds: torch.Tensor | None = None
    """[B, P] SDXL's pooled text embeddings (the U-Net's `text_embeds`), when text is cached."""
    loss_weight: torch.Tensor | None = None
    """float32 [B, 1, H, W] per-pixel loss weights from the photos' subject masks (tune.data.masks; 1 for
    samples without one); None when no photo of the batch has a mask."""
    subject_mask: torch.Tensor | None = None
    """float32 [B, 1, H, W] the photos' subject masks in [0, 1] (zeros for samples without one), when the
    loader keeps masks (DataConfig.keep_masks) and a photo of the batch has one; `has_mask` says which."""
    has_mask: torch.Tensor | None = None
    """bool [B]: which samples' `subject_mask` is a real mask."""
    seeds: torch.Tensor | None = None
    """long [B]: each sample's own seed, a function of (seed, epoch, photo, draw) only, for the noise and
    timestep a recipe draws for it: the same however the photos are split into micro-batches or processes."""

    def __len__(self) -> int:
        return len(self.captions)

    def to(
        self, device: str | torch.device, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> Batch:
        """A copy on `device`; `dtype` applies to the floating-point image/text tensors only."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                changes[f.name] = value.to(device=device, dtype=cast, non_blocking=non_blocking)
            else:
                changes[f.name] = value
        return Batch(**changes)


def _tokenize(tokenizer: Callable[..., Any], texts: list[str], max_length: int | None) -> torch.Tensor:
    length = max_length or getattr(tokenizer, "model_max_length", None) or 77
    out = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    if isinstance(out, torch.Tensor):
        return out
    # BatchEncoding and plain dicts both index by name.
    return out["input_ids"]


def collate(
    items: list[dict[str, Any]],
    *,
    tokenizer: Callable[..., Any] | None = None,
    max_length: int | None = None,
    tokenizer_2: Callable[..., Any] | None = None,
) -> Batch:
    """Stack dataset items into a `Batch`; tokenizes captions when a tokenizer is given and text is not
    cached (with `tokenizer_2` as well, SDXL's second one, into `input_ids_2`)."""
    captions = [it["caption"] for it in items]
    batch = Batch(
        captions=captions,
        is_prior=torch.tensor([it["is_prior"] for it in items], dtype=torch.bool),
        original_sizes=torch.tensor([it["original_size"] for it in items], dtype=torch.long),
        crop_top_lefts=torch.tensor([it["crop_top_left"] for it in items], dtype=torch.long),
        target_size=items[0]["target_size"],
    )
    if "seed" in items[0]:
        batch.seeds = torch.tensor([it["seed"] for it in items], dtype=torch.long)
    if any("loss_weight" in it for it in items):
        width, height = batch.target_size[1], batch.target_size[0]
        ones = torch.ones(1, height, width)
        batch.loss_weight = torch.stack([it.get("loss_weight", ones) for it in items])
    if any("subject_mask" in it for it in items):
        zeros = torch.zeros(1, *batch.target_size)
        batch.subject_mask = torch.stack([it.get("subject_mask", zeros) for it in items])
        batch.has_mask = torch.tensor(["subject_mask" in it for it in items], dtype=torch.bool)
    if "latents" in items[0]:
        batch.latents = torch.stack([it["latents"] for it in items])
    else:
        batch.pixel_values = torch.stack([it["pixel_values"] for it in items])
    if "encoder_hidden_states" in items[0]:
        batch.encoder_hidden_states = torch.stack([it["encoder_hidden_states"] for it in items])
        if "pooled_text_embeds" in items[0]:
            batch.pooled_text_embeds = torch.stack([it["pooled_text_embeds"] for it in items])
    elif tokenizer is not None:
        batch.input_ids = _tokenize(tokenizer, captions, max_length)
        if tokenizer_2 is not None:
            batch.input_ids_2 = _tokenize(tokenizer_2, captions, max_length)
    return batch
