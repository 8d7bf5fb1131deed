"""New tokens (tune.tokens): initialisation, training only their rows, files diffusers loads; SD1, SD2 and
SDXL (the token in both tokenizers and text encoders, one clip_l/clip_g file)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tune.embeddings import load_embeddings, save_embeddings
from tune.errors import ConfigError, ModelError
from tune.models import build_pipeline, load_pipeline
from tune.optim import OptimConfig, build_optimizer
from tune.tokens import add_tokens, check_new_token, text_towers, token_ids


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


def test_a_known_word_trains_in_its_own_row(pipe) -> None:  # noqa: ANN001
    before = embeddings(pipe).detach().clone()
    (w,) = token_ids(pipe.tokenizer, "w")  # "w</w>", the id prompts give the word
    (toy,) = token_ids(pipe.tokenizer, "toy")
    new = add_tokens(pipe.tokenizer, pipe.text_encoder, "w", "toy", known=True)
    after = embeddings(pipe).detach()
    assert new.in_place and new.ids == (w,) and after.shape == before.shape  # nothing added
    assert torch.equal(after[w], before[toy])  # starts from the initializer, as a new token does
    others = torch.ones(len(before), dtype=torch.bool)
    others[w] = False
    assert torch.equal(after[others], before[others])
    # A copy of the tuned encoder made base-shaped (the single-file export) has the word's base row again.
    encoder = copy.deepcopy(pipe.text_encoder)
    new.rows[0].base_shaped(encoder)
    assert torch.equal(encoder.get_input_embeddings().weight.detach(), before)
    with pytest.raises(ConfigError, match="in place as one vector"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, "w", "toy", num_vectors=2, known=True)
    with pytest.raises(ConfigError, match="in place as one vector"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, "zebra", "toy", known=True)  # several pieces


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
    embeddings = load_embeddings(path, base="sd1")
    assert embeddings.token == "<toy>" and torch.equal(embeddings.vectors[0], new.vectors())
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


# ---------------------------------------------------------------------------------------------------
# SDXL (the token in both tokenizers and encoders, one clip_l/clip_g file) and SD2
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-sdxl-shallow")
    build_pipeline("tiny-sdxl-shallow", seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-sd2")
    build_pipeline("tiny-sd2", seed=0).save_pretrained(path)
    return str(path)


def sdxl_image(pipe, prompt: str) -> np.ndarray:  # noqa: ANN001
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images[0]


def test_sdxl_token_lives_in_both_encoders(sdxl_dir: str) -> None:
    pipe = load_pipeline(sdxl_dir)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    before = [e.get_input_embeddings().weight.detach().clone() for e in encoders]
    new = add_tokens(*text_towers(pipe), "<toy>", "toy", num_vectors=2)
    assert new.family == "sdxl" and len(new.rows) == 2 and new.tokens == ("<toy>", "<toy>_1")
    for tokenizer, encoder, old, rows in zip(text_towers(pipe)[0], encoders, before, new.rows, strict=True):
        assert tokenizer.convert_tokens_to_ids(list(new.tokens)) == list(rows.ids)
        toy = token_ids(tokenizer, "toy")
        after = encoder.get_input_embeddings().weight
        assert after.shape == (len(old) + 2, old.shape[1]) and torch.equal(after[: len(old)], old)
        assert all(torch.equal(after[i], old[toy].mean(dim=0)) for i in rows.ids)
        assert pipe.maybe_convert_prompt("a <toy> toy", tokenizer) == new.expand("a <toy> toy")
    with pytest.raises(ModelError, match="2 text encoders; use `.weights`"):
        new.weight  # noqa: B018 - one matrix would silently train one encoder of two
    with pytest.raises(ConfigError, match="already in the tokenizer's vocabulary"):
        check_new_token(text_towers(load_pipeline(sdxl_dir))[0], "<|endoftext|>")


def sdxl_text(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """SDXL's conditioning of a prompt: both encoders' penultimate states and te2's pooled embeds."""
    ids = [t(prompt, padding="max_length", return_tensors="pt").input_ids for t in text_towers(pipe)[0]]
    first = pipe.text_encoder(ids[0], output_hidden_states=True)
    second = pipe.text_encoder_2(ids[1], output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def test_sdxl_training_changes_only_the_new_rows_of_both_encoders(sdxl_dir: str) -> None:
    pipe = load_pipeline(sdxl_dir)
    for encoder in text_towers(pipe)[1]:
        encoder.requires_grad_(False)
    new = add_tokens(*text_towers(pipe), "<toy>", "toy", num_vectors=2)
    new.train_rows_only()
    originals = [w.detach().clone() for w in new.weights]
    optimizer = build_optimizer(new.weights, OptimConfig(name="adamw", lr=1e-2, weight_decay=0.5))
    for _ in range(2):
        hidden, pooled = sdxl_text(pipe, new.expand("a photo of <toy> toy"))
        (hidden.pow(2).mean() + pooled.pow(2).mean()).backward()
        previous = [new.vectors(i) for i in range(2)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        new.restore_frozen_rows()
        for i, (rows, original) in enumerate(zip(new.rows, originals, strict=True)):
            others = torch.ones(len(original), dtype=torch.bool)
            others[list(rows.ids)] = False
            assert torch.equal(rows.weight.detach()[others], original[others])
            assert not torch.equal(new.vectors(i), previous[i])  # both vectors of both encoders train


def test_sdxl_file_loads_with_two_diffusers_calls_and_draws_the_same_image(
    sdxl_dir: str, tmp_path: Path
) -> None:
    pipe = load_pipeline(sdxl_dir)
    new = add_tokens(*text_towers(pipe), "<toy>", "toy", num_vectors=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in new.rows:
            rows.weight[list(rows.ids)] = torch.randn(2, rows.weight.shape[1], generator=generator)
    path = save_embeddings(new, tmp_path / "learned_embeds.safetensors")
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]  # what A1111, ComfyUI and kohya read for SDXL
        assert f.metadata()["token"] == "<toy>" and f.metadata()["tune_family"] == "sdxl"
    embeddings = load_embeddings(path, base="sdxl")
    assert embeddings.token == "<toy>" and embeddings.family == "sdxl"
    assert [v.shape for v in embeddings.vectors] == [(2, 16), (2, 24)]
    assert all(torch.equal(v, new.vectors(i)) for i, v in enumerate(embeddings.vectors))

    other = load_pipeline(sdxl_dir)
    state = load_file(str(path))
    other.load_textual_inversion(
        state["clip_l"], token="<toy>", text_encoder=other.text_encoder, tokenizer=other.tokenizer
    )
    other.load_textual_inversion(
        state["clip_g"], token="<toy>", text_encoder=other.text_encoder_2, tokenizer=other.tokenizer_2
    )
    prompt = "a photo of <toy> on a blue background"
    with torch.no_grad():
        ours, theirs = (
            p.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False) for p in (pipe, other)
        )
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2])  # hidden states, pooled
    image = sdxl_image(other, prompt)
    assert np.array_equal(sdxl_image(pipe, prompt), image)
    assert not np.array_equal(
        sdxl_image(load_pipeline(sdxl_dir), "a photo of toy on a blue background"), image
    )


def test_sdxl_pools_at_the_first_eos_with_a_legacy_config(sdxl_dir: str) -> None:
    pipe = load_pipeline(sdxl_dir)
    pipe.text_encoder_2.text_model.eos_token_id = 2  # as configs written before transformers' PR #24773
    new = add_tokens(*text_towers(pipe), "<toy>", "toy")
    assert pipe.text_encoder_2.text_model.eos_token_id == pipe.tokenizer_2.eos_token_id
    ids = pipe.tokenizer_2("a <toy> toy", padding="max_length", return_tensors="pt").input_ids
    eos = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
    at_token = int((ids[0] == new.rows[1].ids[0]).nonzero()[0])
    assert int(ids[0].argmax()) == at_token != eos  # where legacy pooling would have looked
    with torch.no_grad():
        out = pipe.text_encoder_2(ids)
        expected = pipe.text_encoder_2.text_projection(out.last_hidden_state[0, eos])
    torch.testing.assert_close(out.text_embeds[0], expected)


def test_sd2_file_is_one_tensor_diffusers_loads(sd2_dir: str, tmp_path: Path) -> None:
    pipe = load_pipeline(sd2_dir)
    new = add_tokens(*text_towers(pipe), "<toy>", "toy")
    assert new.family == "sd2" and len(new.rows) == 1
    with torch.no_grad():
        new.weight[list(new.ids)] = torch.randn(
            1, new.weight.shape[1], generator=torch.Generator().manual_seed(0)
        )
    path = save_embeddings(new, tmp_path / "learned_embeds.safetensors")
    assert list(load_file(str(path))) == ["<toy>"]
    assert load_embeddings(path, base="sd2").family == "sd2"
    other = load_pipeline(sd2_dir)
    other.load_textual_inversion(str(path))
    prompt = "a photo of <toy>"
    with torch.no_grad():
        assert torch.equal(
            pipe.encode_prompt(prompt, "cpu", 1, False)[0], other.encode_prompt(prompt, "cpu", 1, False)[0]
        )


def test_an_embedding_of_another_family_names_both(
    pipe,
    sdxl_dir: str,
    sd2_dir: str,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    files = {}
    for family, base in (("sd1", pipe), ("sdxl", load_pipeline(sdxl_dir)), ("sd2", load_pipeline(sd2_dir))):
        new = add_tokens(*text_towers(base), "<toy>", "toy")
        files[family] = save_embeddings(new, tmp_path / family / "learned_embeds.safetensors")
    sd1, sd2, xl = "Stable Diffusion 1.x", "Stable Diffusion 2.x", "SDXL"
    for family, base, names in (
        ("sdxl", "sd1", (xl, sd1)),
        ("sd1", "sdxl", (sd1, xl)),
        ("sd2", "sd1", (sd2, sd1)),
    ):
        with pytest.raises(ModelError, match=rf"is for {names[0]} but the base model is {names[1]}"):
            load_embeddings(files[family], base=base)
    # A one-tensor file without our metadata, of an unknown width, is still refused by SDXL.
    save_file({"<toy>": torch.zeros(1, 32)}, str(tmp_path / "a1111.safetensors"))
    assert load_embeddings(tmp_path / "a1111.safetensors", base="sd1").family is None
    with pytest.raises(ModelError, match=f"is for {sd1} but the base model is {xl}"):
        load_embeddings(tmp_path / "a1111.safetensors", base="sdxl")
