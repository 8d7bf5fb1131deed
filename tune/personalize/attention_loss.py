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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tune.attention import AttentionStore, RecordingProcessor, prompt_tokens, word_token_positions
from tune.data.batches import Batch
from tune.errors import ConfigError
from tune.personalize.config import PhotoOptions


@dataclass
class TriggerAttentionLoss:
    """`weight` x the mean squared difference between each masked photo's trigger map (max 1) and its mask.

    unet: the plain U-Net module; trigger: the trigger as the captions spell it (multi-vector tokens
    expanded). `start(batch)` before the training forward, the loss (`self(batch, latent_hw)`) after it.
    The first `start` puts recording processors on the U-Net's attn2 layers (after the first recorded step,
    only on the layers the map is made of); they record training forwards only and otherwise run the
    original, so they stay for the run (through each backward pass, which gradient checkpointing needs);
    `close()` puts the originals back."""

    unet: torch.nn.Module
    tokenizer: Any
    trigger: str
    weight: float
    store: AttentionStore = field(default_factory=AttentionStore, repr=False)
    _positions: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _layers: set[str] | None = field(default=None, repr=False)  # the map's layers, once a step saw them
    _installed: frozenset[str] | None = field(default=None, repr=False)

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

    def start(self, batch: Batch) -> bool:
        """Before the training forward: whether the batch takes part (then its maps are recorded)."""
        self.store.reset(len(batch))
        if not self.samples(batch):
            return False
        names = self._layers or {n for n in self.unet.attn_processors if n.endswith("attn2.processor")}
        if self._installed != frozenset(names):
            self._install(names)
        return True

    def _install(self, names: set[str]) -> None:
        originals = self._originals()
        self.unet.set_attn_processor(
            {
                n: RecordingProcessor(p, self.store, n, training=True) if n in names else p
                for n, p in originals.items()
            }
        )
        self._installed = frozenset(names)

    def _originals(self) -> dict[str, Any]:
        return {
            n: p.original if isinstance(p, RecordingProcessor) and p.store is self.store else p
            for n, p in self.unet.attn_processors.items()
        }

    def close(self) -> None:
        """Put the U-Net's own processors back."""
        if self._installed is not None:
            self.unet.set_attn_processor(self._originals())
            self._installed = None

    def __call__(self, batch: Batch, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The loss of the forward run since `start(batch)` returned True."""
        assert batch.subject_mask is not None
        terms = []
        for i, positions in self.samples(batch):
            trigger_map = self.store.maps(i, latent_hw)[0, positions].sum(0)  # [h, w] of the step's forward
            trigger_map = trigger_map / trigger_map.max().clamp_min(1e-8)
            mask = F.adaptive_avg_pool2d(batch.subject_mask[i].float(), trigger_map.shape)[0]
            terms.append(F.mse_loss(trigger_map, mask.to(trigger_map.device)))
        if self._layers is None:  # later steps record only the layers the map is made of: less work
            self._layers = set(self.store.layers[self.store.resolution()])
        return self.weight * torch.stack(terms).mean()


def trigger_attention_loss(
    options: PhotoOptions, unet: torch.nn.Module, tokenizer: Any, trigger: str
) -> TriggerAttentionLoss | None:
    """The trigger-attention loss of `options.mask_attention_weight` (None when 0 or no trigger word).
    `unet` is the plain module (not a DDP wrapper); `trigger` as the captions spell it."""
    if not options.mask_attention_weight or not trigger.strip():
        return None
    return TriggerAttentionLoss(unet, tokenizer, trigger, options.mask_attention_weight)
