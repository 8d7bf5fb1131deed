"""The trigger-attention loss: the trigger word's cross-attention is pulled onto the subject of each photo.

With subject masks (`tune.data.masks`), the denoising loss already weighs the subject above the rest; it
does not say which word of the caption the subject belongs to, so the subject's look can settle on the
class word, the background word or nowhere in particular. Break-A-Scene's loss (`tune.attention_loss`)
on the trigger's map settles it on the trigger. Class images (no trigger, no mask), photos without a mask
and captions without the trigger (caption dropout) take no part.
"""

from __future__ import annotations

from typing import Any

import torch

from tune.attention import prompt_tokens, word_token_positions
from tune.attention_loss import Target, WordAttentionLoss
from tune.errors import ConfigError
from tune.personalize.config import PhotoOptions


class TriggerAttentionLoss(WordAttentionLoss):
    """`weight` x the mean squared difference between each masked photo's trigger map (max 1) and its mask.
    `trigger`: the trigger as the captions spell it (multi-vector tokens expanded)."""

    def __init__(
        self, unet: torch.nn.Module, tokenizer: Any, trigger: str, weight: float, *, narrow: bool = True
    ) -> None:
        super().__init__(unet, tokenizer, self._trigger_targets, weight, narrow)
        self.trigger = trigger

    def _trigger_targets(self, caption: str) -> list[Target]:
        try:
            found = word_token_positions(prompt_tokens(caption, self.tokenizer), self.trigger, self.tokenizer)
        except ConfigError:  # a caption without the trigger (dropped, or a user's own caption)
            return []
        return [(found, True)]


def trigger_attention_loss(
    options: PhotoOptions, unet: torch.nn.Module, tokenizer: Any, trigger: str, *, compiled: bool = False
) -> TriggerAttentionLoss | None:
    """The trigger-attention loss of `options.mask_attention_weight` (None when 0 or no trigger word).
    `unet` is the plain module (not a DDP wrapper); `trigger` as the captions spell it; `compiled`: the
    training forward is compiled (its recording processors then never change)."""
    if not options.mask_attention_weight or not trigger.strip():
        return None
    return TriggerAttentionLoss(unet, tokenizer, trigger, options.mask_attention_weight, narrow=not compiled)
