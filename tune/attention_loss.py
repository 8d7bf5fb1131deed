"""Cross-attention losses: chosen words' maps pulled onto, or off, each training image's mask.

With masks (`tune.data.masks`), the denoising loss can weigh the subject above the rest; it does not say
which word of the caption the subject belongs to. Break-A-Scene (Avrahami et al., SIGGRAPH Asia 2023)
adds a loss on the cross-attention maps: a word's map (the attn2 probabilities of its tokens, averaged
over heads and over the attn2 layers at one latent resolution, exactly as `tune.attention` records them
for `tune sample --attention` and `trigger_on_subject`), scaled to a maximum of 1, is compared with the
image's mask averaged down to the map's grid (mean squared difference), or with the mask's complement
for a word that names what is around the subject. Which words, and which side of the mask, a caption
gives is the caller's `targets`: the personalization recipes pull their trigger onto the subject
(`tune.personalize.attention_loss`), the unet recipe pulls the world's class noun onto the object and its
background words off it (`tune.world.attention_loss`). Class images (no mask), images without a mask and
captions that name no target (a dropped caption) take no part. Written here by hand: no maintained
library ships it (Break-A-Scene's is a research script).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tune.attention import AttentionStore, RecordingProcessor
from tune.data.batches import Batch

Target = tuple[list[int], bool]
"""A word's token positions in the caption, and whether its map belongs on the mask (else off it)."""


@dataclass
class WordAttentionLoss:
    """`weight` x the mean squared difference between each target word's map (max 1) and its image's mask
    (or the mask's complement), over every target of every masked image of the batch.

    unet: the plain U-Net module; targets(caption): the caption's targets ([] when none). `start(batch)`
    before the training forward, the loss (`self(batch, latent_hw)`) after it. The first `start` puts
    recording processors on the U-Net's attn2 layers (after the first recorded step, only on the layers
    the map is made of); they record training forwards only and otherwise run the original, so they stay
    for the run (through each backward pass, which gradient checkpointing needs); `close()` puts the
    originals back. `narrow=False` puts them on every attn2 layer at once and keeps them there: a forward
    compiled without guards on module attributes (`tune.training.compiled`) would go on running the
    processors it was traced with."""

    unet: torch.nn.Module
    tokenizer: Any
    targets: Callable[[str], list[Target]]
    weight: float
    narrow: bool = True
    store: AttentionStore = field(default_factory=AttentionStore, repr=False)
    _cache: dict[str, list[Target]] = field(default_factory=dict, repr=False)
    _layers: set[str] | None = field(default=None, repr=False)  # the map's layers, once a step saw them
    _installed: frozenset[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.narrow:  # in place before the first (compiled) forward, whichever batch it runs
            self._install(self._cross_attention())

    def _cross_attention(self) -> set[str]:
        """The names of the U-Net's attn2 processors."""
        return {n for n in self.unet.attn_processors if n.endswith("attn2.processor")}

    def samples(self, batch: Batch) -> list[tuple[int, list[Target]]]:
        """(sample, its targets) of each image of the batch with a mask and a target in its caption."""
        if batch.has_mask is None:
            return []
        chosen = []
        for i in (batch.has_mask & ~batch.is_prior.to(batch.has_mask.device)).nonzero().flatten().tolist():
            caption = batch.captions[i]
            if caption not in self._cache:
                self._cache[caption] = self.targets(caption)
            if self._cache[caption]:
                chosen.append((i, self._cache[caption]))
        return chosen

    def start(self, batch: Batch) -> bool:
        """Before the training forward: whether the batch takes part (then its maps are recorded)."""
        self.store.reset(len(batch))
        if not self.samples(batch):
            return False
        # the map's layers once known; else what is in place (every attn2 layer, kept when not narrowing)
        names = self._layers or self._installed or self._cross_attention()
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
        for i, targets in self.samples(batch):
            maps = self.store.maps(i, latent_hw)[0]  # [tokens, h, w] of the step's forward
            mask = F.adaptive_avg_pool2d(batch.subject_mask[i].float(), maps.shape[-2:])[0].to(maps.device)
            for positions, on_mask in targets:
                word_map = maps[positions].sum(0)
                word_map = word_map / word_map.max().clamp_min(1e-8)
                terms.append(F.mse_loss(word_map, mask if on_mask else 1.0 - mask))
        if self._layers is None and self.narrow:  # later steps record only the map's layers: less work
            self._layers = set(self.store.layers[self.store.resolution()])
        return self.weight * torch.stack(terms).mean()
