"""New tokens (tune.tokens): initialisation, training only their rows, files diffusers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tune.errors import ConfigError
from tune.models import load_pipeline
from tune.optim import OptimConfig, build_optimizer
from tune.tokens import add_tokens, load_embeddings, save_embeddings


@pytest.fixture
def pipe(tiny_pipeline_dir: str):  # noqa: ANN201
    return load_pipeline(tiny_pipeline_dir)


def embeddings(pipe) -> torch.Tensor:  # noqa: ANN001
    return pipe.text_encoder.get_input_embeddings().weight


def test_new_rows_start_from_the_initializer_word(pipe) -> None:  # noqa: ANN001
    before = embeddings(pipe).detach().clone()
    toy = pipe.tokenizer.convert_tokens_to_ids("toy</w>")
    new = add_tokens(pipe.tokenizer, pipe.text_encoder, "<toy>", "toy", num_vectors=3)
    assert new.tokens == ("<toy>", "<toy>_1", "<toy>_2")
    assert new.ids == (len(before), len(before) + 1, len(before) + 2)
    after = embeddings(pipe)
    assert after.shape == (len(before) + 3, before.shape[1]) and torch.equal(after[: len(before)], before)
    assert all(torch.equal(after[i], before[toy]) for i in new.ids)
    # A prompt's token stands for all its vectors, exactly as diffusers expands it when sampling.
    prompt = "a photo of <toy> toy"
    assert (
        new.expand(prompt)
        == "a photo of <toy> <toy>_1 <toy>_2 toy"
        == pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    )
    ids = pipe.tokenizer(new.expand(prompt)).input_ids
    assert [i for i in ids if i >= len(before)] == list(new.ids)


def test_a_multi_piece_initializer_starts_from_the_mean(pipe) -> None:  # noqa: ANN001
    pieces = pipe.tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    mean = embeddings(pipe)[pieces].detach().mean(dim=0)
    new = add_tokens(pipe.tokenizer, pipe.text_encoder, "<z>", "zebra")
    torch.testing.assert_close(embeddings(pipe)[new.ids[0]], mean)


def test_bad_tokens_say_what_to_do(pipe) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="already in the tokenizer's vocabulary"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, "<|endoftext|>", "toy")
    with pytest.raises(ConfigError, match="one word"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, "sks toy", "toy")
    with pytest.raises(ConfigError, match="initializer_token"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, "<x>", " ")
    with pytest.raises(ConfigError, match="num_vectors"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, "<x>", "toy", num_vectors=0)


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw8bit"])
def test_training_changes_only_the_new_rows(pipe, optimizer_name: str) -> None:  # noqa: ANN001
    pipe.text_encoder.requires_grad_(False)
    new = add_tokens(pipe.tokenizer, pipe.text_encoder, "<toy>", "toy", num_vectors=2)
    new.train_rows_only()
    weight = new.weight
    original = weight.detach().clone()
    others = torch.ones(len(weight), dtype=torch.bool)
    others[list(new.ids)] = False
    # Weight decay moves every row of the matrix, gradient or not: what restore_frozen_rows is for.
    optimizer = build_optimizer([weight], OptimConfig(name=optimizer_name, lr=1e-2, weight_decay=0.5))
    ids = pipe.tokenizer(
        [new.expand("a photo of <toy> toy"), "a photo of a toy"], padding="max_length", return_tensors="pt"
    ).input_ids
    moved_before_restore = False
    for _ in range(3):
        previous = weight.detach()[list(new.ids)].clone()
        loss = pipe.text_encoder(ids)[0].pow(2).mean()
        loss.backward()
        assert weight.grad[others].abs().sum() == 0 and weight.grad[list(new.ids)].abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moved_before_restore |= not torch.equal(weight.detach()[others], original[others])
        new.restore_frozen_rows()
        assert torch.equal(weight.detach()[others], original[others])  # bit-identical after each step
        assert not torch.equal(weight.detach()[list(new.ids)], previous)  # ...while the new rows train
    if optimizer_name == "adamw":
        assert moved_before_restore  # torch's AdamW decays the zero-gradient rows too


def test_saved_embeddings_load_in_diffusers(pipe, tiny_pipeline_dir: str, tmp_path: Path) -> None:  # noqa: ANN001
    new = add_tokens(pipe.tokenizer, pipe.text_encoder, "<toy>", "toy", num_vectors=2)
    with torch.no_grad():
        new.weight[list(new.ids)] = torch.randn(
            2, new.weight.shape[1], generator=torch.Generator().manual_seed(0)
        )
    path = save_embeddings(new, tmp_path / "learned_embeds.safetensors", {"tune_step": "7"})
    token, vectors = load_embeddings(path)
    assert token == "<toy>" and torch.equal(vectors, new.vectors())
    other = load_pipeline(tiny_pipeline_dir)
    other.load_textual_inversion(str(path))  # the token name comes from the file
    prompt = "a photo of <toy> on a blue background"
    ours = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    theirs = other.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.equal(ours, theirs)
    plain = load_pipeline(tiny_pipeline_dir).encode_prompt(
        "a photo of toy on a blue background", "cpu", 1, False
    )[0]
    assert not torch.equal(theirs, plain)
