"""The unet recipe's attention loss on the toy world: the object's noun looks at the object, the words of
the background ("blue background", "wooden table") look elsewhere.

The base's cross-attention is what `tune sample --attention`, prompt-to-prompt editing and
`trigger_on_subject` read; trained on denoising alone, the class word's map spreads past the object
(about 59% of its mass on it). With the renderer's object masks (`tune data world --masks`), the unet
recipe's `attention_weight` adds `tune.attention_loss` with these targets. The background's words are
pulled off the object too: pulling the noun alone drew the background words' maps onto the object as well
(a pilot: 35% of the background word's mass on the object, from 25%), and the backgrounds came out wrong
more often.
"""

from __future__ import annotations

from typing import Any

from tune.attention import prompt_tokens, token_starts
from tune.attention_loss import Target, WordAttentionLoss
from tune.world.captions import background_phrase, parse

_FILLER = {"on", "a", "an"}


def world_targets(caption: str, tokenizer: Any) -> list[Target]:
    """The caption's object noun (on the mask) and its background phrase's words but "a"/"an" (off it);
    [] for a caption that names neither (a dropped caption, "a photo")."""
    attributes = parse(caption)
    tokens = prompt_tokens(caption.lower(), tokenizer)
    targets: list[Target] = []
    if "background" in attributes:
        pieces = tokenizer.tokenize(background_phrase(attributes["background"]))
        for start in token_starts(tokens, pieces)[:1]:
            keep = [start + k for k, p in enumerate(pieces) if p.removesuffix("</w>") not in _FILLER]
            targets.append((keep, False))
    if "cls" in attributes:
        taken = {p for positions, _ in targets for p in positions}
        pieces = tokenizer.tokenize(attributes["cls"])
        for start in token_starts(tokens, pieces):  # the noun's first place outside the background
            span = list(range(start, start + len(pieces)))
            if not taken & set(span):
                targets.insert(0, (span, True))
                break
    return targets


def world_attention_loss(unet: Any, tokenizer: Any, weight: float) -> WordAttentionLoss:
    """The loss over the world's captions; `unet` is the plain module (not a DDP wrapper)."""
    return WordAttentionLoss(unet, tokenizer, lambda caption: world_targets(caption, tokenizer), weight)
