"""The text conditioning every recipe feeds the U-Net, for each base family.

    encoders = TextEncoders.of(pipe)                      # or TextEncoders(te, te2, eos_token_id_2=...)
    hidden, pooled = encoders(input_ids, input_ids_2)     # SDXL: pooled [B, P]; SD1/SD2: None
    kwargs = added_cond_kwargs(pooled, add_time_ids(batch.original_sizes, batch.crop_top_lefts, batch.target_size))
    unet(noisy, t, hidden, added_cond_kwargs=kwargs)

SD1/SD2: `encoder_hidden_states = text_encoder(ids)[0]` (the last hidden state, after the final layer norm).
SDXL (reference sdxl.md 1.1): the penultimate hidden state of each encoder (no final layer norm),
concatenated, plus te2's pooled `text_embeds`, plus the six micro-conditioning numbers per image (1.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _plain(model: Any) -> Any:
    """The module under a DDP wrapper (the projection is applied outside the wrapper's forward)."""
    return getattr(model, "module", model)


def pooled_text_embeds(
    text_encoder_2: Any, last_hidden_state: torch.Tensor, input_ids_2: torch.Tensor, eos_token_id: int
) -> torch.Tensor:
    """te2's `text_embeds`, taken at the FIRST end-of-text token of each row.

    Written by hand (kohya's pool workaround): transformers pools at `argmax(input_ids)` when a legacy
    config says `eos_token_id == 2`, so an added token (a higher id) would become the pooled position.
    `last_hidden_state` is already after the final layer norm."""
    is_eos = (input_ids_2 == eos_token_id).int()
    # argmax returns the first maximum; a row without any eos falls back to its last position.
    first = torch.where(is_eos.any(dim=1), is_eos.argmax(dim=1), input_ids_2.shape[1] - 1)
    rows = torch.arange(input_ids_2.shape[0], device=last_hidden_state.device)
    pooled = last_hidden_state[rows, first.to(last_hidden_state.device)]
    return _plain(text_encoder_2).text_projection(
        pooled.to(_plain(text_encoder_2).text_projection.weight.dtype)
    )


@dataclass(frozen=True)
class TextEncoders:
    """The text encoder(s) of a base model, called as every recipe conditions the U-Net on text.

    `text_encoder_2` is SDXL's second encoder (`CLIPTextModelWithProjection`), None for SD1/SD2;
    `eos_token_id_2` is `tokenizer_2.eos_token_id` (the tokenizer's, not the encoder config's, which
    may carry the legacy 2). The modules may be DDP-wrapped or compiled."""

    text_encoder: Any
    text_encoder_2: Any = None
    eos_token_id_2: int | None = None

    @classmethod
    def of(cls, pipe: Any, text_encoder: Any = None, text_encoder_2: Any = None) -> TextEncoders:
        """The pipeline's encoders, or the given stand-ins for them (e.g. their prepared wrappers)."""
        te = pipe.text_encoder if text_encoder is None else text_encoder
        if getattr(pipe, "text_encoder_2", None) is None:
            return cls(te)
        te2 = pipe.text_encoder_2 if text_encoder_2 is None else text_encoder_2
        return cls(te, te2, pipe.tokenizer_2.eos_token_id)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def device(self) -> torch.device:
        return next(_plain(self.text_encoder).parameters()).device

    def __call__(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder_hidden_states, pooled text_embeds or None) of tokenized prompts.

        A prompt that comes more than once in the batch (prior preservation's class prompt, in every
        batch) is encoded once and its states repeated: the same states and gradients for less of the
        encoder's time. Not while a dropout in the encoders is active: each row then draws its own mask."""
        rows = (
            input_ids if input_ids_2 is None else torch.cat([input_ids, input_ids_2.to(input_ids.device)], 1)
        )
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if len(distinct) == len(rows) or self._dropout_active():
            return self._encode(input_ids, input_ids_2)
        width = input_ids.shape[1]
        hidden, pooled = self._encode(
            distinct[:, :width], None if input_ids_2 is None else distinct[:, width:]
        )
        inverse = inverse.to(hidden.device)
        return hidden[inverse], None if pooled is None else pooled[inverse]

    def _dropout_active(self) -> bool:
        """Whether a module of the encoders drops out now: an nn.Dropout, or a float `dropout` rate that the
        module applies itself (transformers' CLIP attention, from config.attention_dropout)."""
        encoders = [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]
        for module in (m for e in encoders for m in e.modules() if m.training):
            rate = module.p if isinstance(module, torch.nn.Dropout) else getattr(module, "dropout", 0.0)
            if isinstance(rate, float) and rate > 0:
                return True
        return False

    def _encode(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.device
        if not self.is_sdxl:
            return self.text_encoder(input_ids.to(device))[0], None
        if input_ids_2 is None:
            raise ValueError("an SDXL base needs the prompt tokenized by tokenizer_2 too (input_ids_2)")
        out1 = self.text_encoder(input_ids.to(device), output_hidden_states=True)
        ids2 = input_ids_2.to(next(_plain(self.text_encoder_2).parameters()).device)
        out2 = self.text_encoder_2(ids2, output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(device)], dim=-1)
        assert self.eos_token_id_2 is not None
        pooled = pooled_text_embeds(self.text_encoder_2, out2.last_hidden_state, ids2, self.eos_token_id_2)
        return hidden, pooled.to(device)


def add_time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """float [B, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels, per image."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(original_sizes.shape[0], 2)
    return torch.cat(
        [original_sizes.float(), crop_top_lefts.float(), target.to(original_sizes.device)], dim=1
    )


def added_cond_kwargs(
    pooled: torch.Tensor | None, time_ids: torch.Tensor | None
) -> dict[str, torch.Tensor] | None:
    """The U-Net's `added_cond_kwargs` for SDXL (pooled first, as the U-Net concatenates them); None when
    there is no pooled embedding (SD1/SD2)."""
    if pooled is None:
        return None
    assert time_ids is not None
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
