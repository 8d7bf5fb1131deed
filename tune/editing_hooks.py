"""The hooks behind `tune.editing`: attention processors that record A's and edit B's attention maps, and
the local blend that keeps A's latents outside the edited words' region.

`edit_attention(unet, K, self_steps)` swaps attn2 processors (and attn1 ones with self_steps > 0) for
`EditProcessor`s through diffusers' attention-processor API; `blend_outside(unet, state)` adds a forward
hook on the U-Net. Both put everything back on exit, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from tune.attention import swapped_processors

if TYPE_CHECKING:
    from tune.editing import EditPlan

SELF_MAX_POSITIONS = 32 * 32
"""Self-attention (attn1) is injected only at levels with at most this many positions: its maps are
positions x positions (a 64x64 SD1.5 latent would keep 4096^2 per head, layer and step)."""


@dataclass
class EditState:
    """What the processors share: the pass ("record" A or "edit" B), K, the plan and A's maps."""

    edit_steps: int
    self_steps: int = 0
    phase: Literal["record", "edit"] = "record"
    plan: EditPlan | None = None
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """layer name -> per recorded step: A's conditional probabilities [heads, hw, tokens or hw]."""
    outputs: list[torch.Tensor] = field(default_factory=list)
    """With `blend_outside`: A's U-Net output (noise prediction, both guidance halves) per step."""
    keep: torch.Tensor | None = None
    """With `blend_outside`: [1, 1, h, w] latent mask where B's U-Net output is kept (True); A's elsewhere."""
    calls: int = 0
    """U-Net calls so far in this pass (the local blend's step)."""


class EditProcessor:
    """One attention layer. attn2: records (pass A) or edits (pass B) the conditional probabilities for
    steps < K, reweights in pass B at every step. attn1: records or replaces them for steps <
    self_steps. Otherwise the original processor runs unchanged."""

    def __init__(self, original: Any, state: EditState, name: str) -> None:
        self.original, self.state, self.name = original, state, name
        self.calls = 0

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        state, step = self.state, self.calls
        self.calls += 1  # one U-Net call per denoising step (guidance batches both halves)
        cross = encoder_hidden_states is not None
        if cross:
            early = step < state.edit_steps
        else:
            early = step < state.self_steps and hidden_states.shape[1] <= SELF_MAX_POSITIONS
        reweight = cross and state.phase == "edit" and state.plan is not None and state.plan.reweights
        if not early and not reweight:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        # diffusers' classic AttnProcessor path, written out to reach the probabilities (attention in a
        # transformer block: 3-d hidden states, no group or spatial norm).
        context = encoder_hidden_states if cross else hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, mask)
        heads = attn.heads  # rows are batch-major: the last `heads` rows are the conditional image
        if state.phase == "record":
            state.maps.setdefault(self.name, []).append(probs[-heads:].clone())
        else:
            own = probs[-heads:]
            edited = self._edited(own, step, early) if cross else state.maps[self.name][step]
            probs = torch.cat([probs[:-heads], edited])
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _edited(self, own: torch.Tensor, step: int, early: bool) -> torch.Tensor:
        plan = self.state.plan
        assert plan is not None
        if early:
            source = torch.tensor(plan.source, device=own.device)
            from_a = self.state.maps[self.name][step][..., source.clamp_min(0)]
            own = torch.where(source >= 0, from_a, own)
        if plan.reweights:
            own = own * torch.tensor(plan.scale, device=own.device, dtype=own.dtype)
        return own


@contextmanager
def edit_attention(unet: torch.nn.Module, edit_steps: int, self_steps: int = 0) -> Iterator[EditState]:
    """Swap every attn2 processor (and attn1, with self_steps > 0) for an EditProcessor sharing the
    yielded state (phase "record"); the original processors are restored after, also on error."""
    state = EditState(edit_steps, self_steps)
    kinds = ("attn2.processor", "attn1.processor") if self_steps else ("attn2.processor",)

    def wrap(name: str, proc: Any) -> Any:
        return EditProcessor(proc, state, name) if name.endswith(kinds) else proc

    with swapped_processors(unet, wrap):
        yield state


def start_edit(unet: torch.nn.Module, state: EditState, plan: EditPlan) -> None:
    """Between the passes: the edit phase, with every step counter back at 0."""
    state.phase, state.plan, state.calls = "edit", plan, 0
    for proc in unet.attn_processors.values():
        if isinstance(proc, EditProcessor):
            proc.calls = 0


@contextmanager
def blend_outside(unet: torch.nn.Module, state: EditState) -> Iterator[None]:
    """P2P's local blend, on the U-Net's output: pass A records it per step; pass B takes A's wherever
    `state.keep` is False. Both passes start from the same latents and every scheduler we offer updates
    each latent pixel from that pixel's own noise predictions (and the same seeded noise), so outside
    the mask B's latents stay A's exactly, at every step; inside, B draws its own."""

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        sample = output[0] if isinstance(output, tuple) else output.sample
        step, state.calls = state.calls, state.calls + 1
        if state.phase == "record":
            state.outputs.append(sample.detach().clone())
            return None
        if state.keep is None:
            return None
        blended = torch.where(state.keep, sample, state.outputs[step])
        if isinstance(output, tuple):
            return (blended, *output[1:])
        output.sample = blended
        return output

    handle = unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
