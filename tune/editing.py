"""Prompt-to-prompt editing (Hertz et al. 2022): draw prompt A, then prompt B from the same seed with
A's cross-attention maps for B's first K denoising steps, so B keeps A's layout and changes what the
edited words cover.

    result = edit(pipe, "a photo of a large red ball on a blue background",
                  "a photo of a large yellow ball on a blue background", seed=0, edit_steps=10)
    result.side_by_side().save("edit.png")

Two passes through the shared sampler `tune.sampling.generate`, with every cross-attention (attn2)
processor swapped for an `EditProcessor` (`tune.editing_hooks`) through diffusers' attention-processor
API (the originals come back on exit, also on error):

1. A: for steps < K each attn2 layer keeps the attention probabilities of the conditional half of
   classifier-free guidance (diffusers stacks [negative, positive]; the negative half is never edited).
2. B: for steps < K the conditional probabilities are taken from A's, position by position through an
   `EditPlan`; from step K on the layer calls its original processor, so K = 0 without reweighting is
   plain sampling of B, bit for bit.

The plan, from the two prompts' tokens:
- word swap: A and B have the same number of tokens; B uses A's map at every token position.
- refinement: B is A with words added; the tokens B shares with A (aligned by difflib over the token
  lists) take A's maps, the new tokens keep B's own.
- reweight {word: F}: B's attention to the word's tokens is multiplied by F at every step, without
  renormalising over tokens (as the paper's code does): the word's contribution to each pixel changes
  by exactly F and every other token's stays as it was, where renormalising would also scale all the
  others by 1 / (1 + (F - 1) p) for the word's share p. p is small (on the world base, "red" in "a photo
  of a large red ball on a blue background" holds 1% of the final maps; the end token and padding
  58%), and so is the effect there: CLIP's end and padding tokens carry the whole prompt, the word too.

Local blend (`blend=True`, the default; P2P's LocalBlend): on the shipped world base, A's maps alone
keep the layout but not the background's colour (the new colour leaks into it). For a word swap with
K > 0, B therefore keeps A's U-Net output outside the swapped words' region in A (`blend_mask`), which
keeps B's latents equal to A's there (`editing_hooks.blend_outside`). A's self-attention (attn1) for
the first `self_steps` steps is optional and off by default: it keeps the background a little better
but costs class swaps their new shape. scripts/edit_figure.py, 40 pairs, K = 10 of 25 steps:
background |A - B| 3.76 / 255 and judge reads B's new colour/class 82% (this default); + attn1: 3.45,
65%; maps without the blend: 13.07, 92%; plain B from the same seed: 13.32, 95%.

While a step is edited (or recorded), the layer computes attention with its own modules and
`Attention.get_attention_scores` (diffusers' classic AttnProcessor path, needed to reach the
probabilities); A's recorded steps take the same path as B's edited ones, so B == A with K = steps
draws A again bit for bit.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from tune import attention
from tune import editing_hooks as hooks
from tune.errors import ConfigError
from tune.grids import make_grid
from tune.sampling import generate

DEFAULT_EDIT_SHARE = 0.4
"""K defaults to this share of the denoising steps (rounded)."""
BLEND_THRESHOLD = 0.5
"""The local blend keeps B where the swapped words' map in A reaches this share of its range (then grown;
chosen on the first 12 pairs of scripts/edit_figure.py: 0.3 ungrown left patches of A's colour)."""


@dataclass(frozen=True)
class EditPlan:
    """How B's conditional attention is built from A's: for each of B's token positions, the A position
    whose map it takes (-1: B's own map) while editing, and a factor for every step (1: unchanged)."""

    mode: Literal["swap", "refine"]
    source: tuple[int, ...]
    scale: tuple[float, ...]

    @property
    def reweights(self) -> bool:
        return any(f != 1.0 for f in self.scale)


@dataclass(frozen=True)
class EditResult:
    prompt_a: str
    prompt_b: str
    seed: int
    image_a: Image.Image
    image_b: Image.Image
    plan: EditPlan
    edit_steps: int
    steps: int
    blended: bool = False
    """Whether B kept A's latents outside the swapped words' region (the local blend)."""
    reweight: tuple[tuple[str, float], ...] = ()

    def side_by_side(self) -> Image.Image:
        """A left, B right, labelled like tune's other grids: the words that differ above each image, the
        prompt and the settings on the left."""
        words_a, words_b = self.prompt_a.split(), self.prompt_b.split()
        ops = difflib.SequenceMatcher(None, words_a, words_b, autojunk=False).get_opcodes()
        gone = [w for tag, i1, i2, _, _ in ops if tag in ("replace", "delete") for w in words_a[i1:i2]]
        new = [w for tag, _, _, j1, j2 in ops if tag in ("replace", "insert") for w in words_b[j1:j2]]
        changes_b = [*new, *(f"{w} x{f:g}" for w, f in self.reweight)]
        labels = [f"A: {' '.join(gone)}" if gone else "A", f"B: {' '.join(changes_b)}" if changes_b else "B"]
        setting = (
            f"{self.prompt_a} (seed {self.seed}; {self.plan.mode} for {self.edit_steps}/{self.steps} steps"
        )
        setting += ", local blend)" if self.blended else ")"
        return make_grid([self.image_a, self.image_b], 1, 2, row_labels=[setting], col_labels=labels)


# ---------------------------------------------------------------------------------------------------
# Plans: which of A's token maps each of B's positions uses
# ---------------------------------------------------------------------------------------------------


def align_tokens(tokens_a: Sequence[str], tokens_b: Sequence[str]) -> list[int]:
    """For each position of B, the position of the same token in A (difflib's matching blocks over the
    whole token lists, padding included), or -1 for a token A does not have there."""
    source = [-1] * len(tokens_b)
    matcher = difflib.SequenceMatcher(None, list(tokens_a), list(tokens_b), autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            source[block.b + k] = block.a + k
    return source


def _content(tokens: Sequence[str], tokenizer: Any) -> list[str]:
    """The prompt's word pieces: between the start token and the first end token."""
    end = list(tokens).index(tokenizer.eos_token) if tokenizer.eos_token in tokens else len(tokens)
    return list(tokens[1:end])


def plan_edit(
    tokens_a: Sequence[str], tokens_b: Sequence[str], tokenizer: Any, reweight: dict[str, float] | None = None
) -> EditPlan:
    """A word swap (same token count), a refinement (B is A plus words) or a ConfigError saying what
    would work; `reweight` words must be in B."""
    words_a, words_b = _content(tokens_a, tokenizer), _content(tokens_b, tokenizer)
    if len(words_a) == len(words_b):
        mode: Literal["swap", "refine"] = "swap"
        source = list(range(len(tokens_b)))
    else:
        mode, source = "refine", align_tokens(tokens_a, tokens_b)
        shared = sum(1 for j in range(1, len(words_b) + 1) if source[j] >= 0)
        if len(words_b) < len(words_a) or shared != len(words_a):
            raise ConfigError(
                f"the edit has {len(words_b)} tokens and the prompt {len(words_a)}: a word swap needs "
                "the same number of tokens (swap words for words of the same token count), a refinement "
                "needs the edit to keep every word of the prompt, in order, and add words"
            )
    scale = [1.0] * len(tokens_b)
    for word, factor in (reweight or {}).items():
        if not math.isfinite(factor) or factor < 0:
            raise ConfigError(f"--reweight {word}={factor}: the factor must be a number >= 0")
        try:
            positions = attention.word_token_positions(tuple(tokens_b), word, tokenizer)
        except ConfigError as error:
            raise ConfigError(
                f"--reweight: {str(error).replace('the prompt', 'the edited prompt', 1)}"
            ) from None
        for p in positions:
            scale[p] = factor
    return EditPlan(mode, tuple(source), tuple(scale))


# ---------------------------------------------------------------------------------------------------
# Editing
# ---------------------------------------------------------------------------------------------------


def default_edit_steps(steps: int) -> int:
    return round(DEFAULT_EDIT_SHARE * steps)


def parse_reweight(spec: str) -> tuple[str, float]:
    """--reweight's 'WORD=FACTOR' (e.g. 'red=2') -> ('red', 2.0); plan_edit checks the factor."""
    word, _, factor = spec.rpartition("=")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if not word.strip() or value is None:
        raise ConfigError(f"--reweight needs WORD=FACTOR, e.g. --reweight red=2; got {spec!r}")
    return word.strip(), value


def swapped_positions(plan: EditPlan, tokens_a: Sequence[str], tokens_b: Sequence[str]) -> list[int]:
    """The token positions a word swap changes (none for a refinement or B == A)."""
    return (
        [i for i, (a, b) in enumerate(zip(tokens_a, tokens_b, strict=True)) if a != b]
        if plan.mode == "swap"
        else []
    )


def blend_mask(
    maps: attention.AttentionMaps, positions: Sequence[int], latent_hw: tuple[int, int]
) -> torch.Tensor:
    """[1, 1, h, w] bool: where the swapped tokens' maps in A (summed, averaged over all steps, resized to
    the latents) reach BLEND_THRESHOLD of the way from their minimum to their maximum, grown by 1/16 of
    the latent width (P2P's reach: one cell of its 16x16 maps on 64x64 latents)."""
    region = maps.maps[:, list(positions)].sum(1).mean(0)[None, None]
    region = F.interpolate(region, size=latent_hw, mode="bilinear", align_corners=False)
    # Min to max: every pixel gives a word some attention, so its map has a floor well above 0.
    low, high = region.min(), region.max()
    inside = ((region - low) / (high - low).clamp_min(1e-12) > BLEND_THRESHOLD).float()
    grow = max(1, latent_hw[1] // 16)
    return F.max_pool2d(inside, 2 * grow + 1, stride=1, padding=grow) > 0


def edit(
    pipe: Any,
    prompt_a: str,
    prompt_b: str,
    seed: int,
    *,
    steps: int = 25,
    guidance: float = 6.0,
    edit_steps: int | None = None,
    reweight: dict[str, float] | None = None,
    self_steps: int = 0,
    blend: bool = True,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> EditResult:
    """Draw A, then B from the same seed with A's cross-attention maps for B's first `edit_steps`
    steps (default: 40% of `steps`); see the module docstring for swap, refinement, reweight, the
    self-attention injection (`self_steps`) and the local blend (`blend`)."""
    k = default_edit_steps(steps) if edit_steps is None else edit_steps
    if not 0 <= k <= steps:
        raise ConfigError(f"edit steps must be in [0, {steps}] (the denoising steps); got {k}")
    if not 0 <= self_steps <= steps:
        raise ConfigError(f"self_steps must be in [0, {steps}] (the denoising steps); got {self_steps}")
    tokens_a = attention.prompt_tokens(prompt_a, pipe.tokenizer)
    tokens_b = attention.prompt_tokens(prompt_b, pipe.tokenizer)
    plan = plan_edit(tokens_a, tokens_b, pipe.tokenizer, reweight)
    swapped = swapped_positions(plan, tokens_a, tokens_b)
    local = blend and k > 0 and bool(swapped)
    settings = dict(steps=steps, guidance=guidance, negative_prompt=negative_prompt, scheduler=scheduler)
    settings.update(width=width, height=height, progress=False)
    with hooks.edit_attention(pipe.unet, k, self_steps) as state:
        with hooks.blend_outside(pipe.unet, state) if local else contextlib.nullcontext():
            # attention=True records A's maps for the blend mask; the image is the same without it
            [a] = generate(pipe, prompt_a, seed, attention=local, **settings)  # type: ignore[arg-type]
            if local:
                state.keep = blend_mask(a.attention, swapped, state.outputs[0].shape[-2:]).to(
                    state.outputs[0].device
                )
            hooks.start_edit(pipe.unet, state, plan)
            [b] = generate(pipe, prompt_b, seed, **settings)  # type: ignore[arg-type]
    weights = tuple((reweight or {}).items())
    return EditResult(prompt_a, prompt_b, seed, a.image, b.image, plan, k, steps, local, weights)
