"""The trigger-attention loss: the trigger word's cross-attention is pulled onto the subject of each photo.

With subject masks (`tune.data.masks`), the denoising loss already weighs the subject above the rest; it
does not say which word of the caption the subject belongs to, so the subject's look can settle on the
class word, the background word or nowhere in particular. Break-A-Scene (Avrahami et al., SIGGRAPH Asia
2023) adds a loss on the cross-attention maps: each photo's trigger map (the attn2 probabilities of the
trigger's tokens, averaged over heads and over the attn2 layers at one latent resolution, exactly as
`tune.attention` records them for `tune sample --attention` and `trigger_on_subject`), scaled to a maximum
of 1, is compared with the photo's mask averaged down to the map's grid (mean squared difference). Class
images (no trigger, no mask), photos without a mask and captions without the trigger (caption dropout)
take no part. Written here by hand: no maintained library ships it (Break-A-Scene's is a research script).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tune.attention import AttentionStore, prompt_tokens, record_attention, word_token_positions
from tune.data.batches import Batch
from tune.errors import ConfigError


@dataclass
class TriggerAttentionLoss:
    """`weight` x the mean squared difference between each masked photo's trigger map (max 1) and its mask.

    unet: the plain U-Net module (its attention processors are swapped during the forward);
    trigger: the trigger as the captions spell it (multi-vector tokens expanded)."""

    unet: torch.nn.Module
    tokenizer: Any
    trigger: str
    weight: float
    _positions: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def samples(self, batch: Batch) -> list[tuple[int, list[int]]]:
        """(sample, trigger token positions) of each photo of the batch with a mask and the trigger."""
        if batch.has_mask is None:
            return []
        chosen = []
        for i in (batch.has_mask & ~batch.is_prior.to(batch.has_mask.device)).nonzero().flatten().tolist():
            positions = self.positions(batch.captions[i])
            if positions:
                chosen.append((i, positions))
        return chosen

    def positions(self, caption: str) -> list[int]:
        if caption not in self._positions:
            try:
                found = word_token_positions(
                    prompt_tokens(caption, self.tokenizer), self.trigger, self.tokenizer
                )
            except ConfigError:  # a caption without the trigger (dropped, or a user's own caption)
                found = []
            self._positions[caption] = found
        return self._positions[caption]

    @contextmanager
    def recording(self, batch: Batch) -> Iterator[AttentionStore | None]:
        """The maps of the forward run inside, with their graph; None (nothing recorded) when no sample
        of the batch takes part."""
        if not self.samples(batch):
            yield None
            return
        with record_attention(self.unet, grad=True) as store:
            store.reset(len(batch))
            yield store

    def __call__(self, store: AttentionStore, batch: Batch, latent_hw: tuple[int, int]) -> torch.Tensor:
        assert batch.subject_mask is not None
        terms = []
        for i, positions in self.samples(batch):
            trigger_map = store.maps(i, latent_hw)[-1, positions].sum(0)  # [h, w] of the one U-Net call
            trigger_map = trigger_map / trigger_map.max().clamp_min(1e-8)
            mask = F.adaptive_avg_pool2d(batch.subject_mask[i].float(), trigger_map.shape)[0]
            terms.append(F.mse_loss(trigger_map, mask.to(trigger_map.device)))
        return self.weight * torch.stack(terms).mean()
