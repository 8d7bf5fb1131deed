"""TextEncoders encodes each distinct prompt of a batch once: the same states and gradients as row by row."""

from __future__ import annotations

import pytest
import torch

from tune.lora.inject import inject_lora
from tune.models import build_pipeline
from tune.models.conditioning import TextEncoders

PROMPTS = ["a photo of sks toy on sand", "a photo of a toy", "a photo of sks toy", "a photo of a toy"]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def encode(encoders: TextEncoders, ids: torch.Tensor, ids_2: torch.Tensor | None, rows_seen: list[int]):
    """(states, pooled, gradient of every encoder's token embeddings) of one batch; `rows_seen` gets the
    batch size each encoder call received."""
    modules = [m for m in (encoders.text_encoder, encoders.text_encoder_2) if m is not None]

    def count(_module, args, kwargs) -> None:  # noqa: ANN001
        rows_seen.append(len(args[0] if args else kwargs["input_ids"]))

    hooks = [m.register_forward_pre_hook(count, with_kwargs=True) for m in modules]
    tables = [m.get_input_embeddings().weight for m in modules]
    for table in tables:
        table.grad = None
        table.requires_grad_(True)
    hidden, pooled = encoders(ids, ids_2)
    loss = hidden.square().mean() + (0 if pooled is None else pooled.square().mean())
    loss.backward()
    for hook in hooks:
        hook.remove()
    return hidden.detach(), None if pooled is None else pooled.detach(), [t.grad.clone() for t in tables]


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl-shallow"])
def test_a_repeated_prompt_is_encoded_once_with_the_same_states_and_gradients(preset: str) -> None:
    pipe = build_pipeline(preset, seed=0)
    encoders = TextEncoders.of(pipe)
    ids = tokenize(pipe.tokenizer, PROMPTS)
    ids_2 = tokenize(pipe.tokenizer_2, PROMPTS) if encoders.is_sdxl else None
    seen: list[int] = []
    hidden, pooled, grads = encode(encoders, ids, ids_2, seen)
    assert set(seen) == {3}  # four rows, three distinct prompts
    assert hidden.shape[0] == 4 and (pooled is None) == (not encoders.is_sdxl)

    rows = [
        encode(encoders, ids[i : i + 1], None if ids_2 is None else ids_2[i : i + 1], []) for i in range(4)
    ]
    torch.testing.assert_close(hidden, torch.cat([r[0] for r in rows]))
    if pooled is not None:
        torch.testing.assert_close(pooled, torch.cat([r[1] for r in rows]))
    for k, grad in enumerate(grads):  # each row's loss is a quarter of its own row's mean
        torch.testing.assert_close(grad, sum(r[2][k] for r in rows) / 4, rtol=1e-4, atol=1e-7)


def test_with_an_active_dropout_every_row_is_encoded() -> None:
    pipe = build_pipeline("tiny", seed=0)
    inject_lora(pipe.unet, pipe.text_encoder, ("attn2", "text_encoder"), 4, 4.0, 0.1)  # lora.dropout 0.1
    encoders = TextEncoders.of(pipe)
    ids = tokenize(pipe.tokenizer, PROMPTS)
    seen: list[int] = []
    pipe.text_encoder.train()
    encode(encoders, ids, None, seen)
    assert seen == [4]  # each row draws its own dropout mask
    seen.clear()
    pipe.text_encoder.eval()  # the dropout is off: the repeat is encoded once again
    encode(encoders, ids, None, seen)
    assert seen == [3]


def test_with_the_encoders_own_attention_dropout_every_row_is_encoded() -> None:
    pipe = build_pipeline("tiny", seed=0)
    attentions = [m for m in pipe.text_encoder.modules() if type(m).__name__ == "CLIPAttention"]
    assert attentions
    for attention in attentions:  # what config.attention_dropout = 0.1 sets: a rate, not an nn.Dropout
        attention.dropout = 0.1
    seen: list[int] = []
    pipe.text_encoder.train()
    encode(TextEncoders.of(pipe), tokenize(pipe.tokenizer, PROMPTS), None, seen)
    assert seen == [4]
