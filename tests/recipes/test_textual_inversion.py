"""The textual_inversion recipe end to end on the tiny pipeline: run-dir contract, only the new rows
train, embeddings that diffusers loads and our sampler reproduces, exact resume, several vectors; and on
tiny SD2 and SDXL bases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recipes import textual_inversion as recipe
from tune import PROJECT_ROOT
from tune import lora as lora_io
from tune.config import load_config
from tune.embeddings import EMBEDDINGS_FILE, load_embeddings
from tune.errors import ConfigError
from tune.models import build_pipeline, load_pipeline
from tune.personalize import trigger
from tune.runs import read_run
from tune.sampling import sample_grid
from tune.tokens import text_towers, token_ids

from recipe_testkit import check_exact_resume, crash_then_resume, losses, make_concept

CONFIGS = PROJECT_ROOT / "recipes" / "configs" / "textual_inversion"
EMBEDDING = "embeddings.token_embedding.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("ti")
    return {"concept": make_concept(root / "concept"), "cache": root / "cache", "base": tiny_pipeline_dir}


def config(setup: dict, out: Path, *extra: str) -> recipe.Config:
    overrides = [
        f"base_model={setup['base']}",
        f"concept={setup['concept']}",
        f"output_dir={out}",
        f"data.cache_dir={setup['cache']}",
        *extra,
    ]
    return load_config(recipe.Config, CONFIGS / "tiny.toml", overrides)


def trained_matrix(run: Path, step: int, encoder: int = 0) -> torch.Tensor:
    """A checkpoint's embedding matrix of text encoder `encoder` (SDXL: 0 and 1)."""
    state = load_file(str(run / "checkpoints" / f"step_{step:06d}" / f"trainable_{encoder}.safetensors"))
    [(name, matrix)] = state.items()  # the embedding matrix is the only trainable tensor
    assert name.removeprefix("text_model.") == EMBEDDING
    return matrix


@pytest.fixture(scope="module")
def first_run(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recipe.main(config(setup, tmp_path_factory.mktemp("runs") / "a")).path


def test_run_directory_contract(first_run: Path, setup: dict) -> None:
    run = read_run(first_run)
    assert run.status == "done" and run.recipe == "textual_inversion"
    assert sorted(losses(first_run)) == [1, 2, 3, 4]
    rows = [m for m in run.metrics if "loss" in m]
    assert all(math.isfinite(m[k]) for m in rows for k in ("loss", "lr", "embedding_norm", "s_per_step"))
    assert run.sample_steps == [0, 2, 4] and run.checkpoint_steps == [2, 4]
    for step in (2, 4):
        assert (first_run / "checkpoints" / f"step_{step:06d}" / "learned_embeds.safetensors").is_file()
    assert [p.name for p in (first_run / "export").iterdir()] == ["learned_embeds.safetensors"]
    base = load_pipeline(setup["base"])
    assert run.info["base_model_hash"] == lora_io.base_model_hash(base.unet, base.text_encoder)
    assert (run.info["trigger"], run.info["initializer_token"], run.info["max_steps"]) == ("sks", "toy", 4)
    assert run.info["cache"]["latent"]["encoded"] + run.info["cache"]["latent"]["loaded"] == 4


def test_only_the_new_row_trains(first_run: Path, setup: dict) -> None:
    base = load_pipeline(setup["base"]).text_encoder.get_input_embeddings().weight.detach()
    toy = load_pipeline(setup["base"]).tokenizer.convert_tokens_to_ids("toy</w>")
    previous = base[toy]
    for step in (2, 4):
        matrix = trained_matrix(first_run, step)
        assert matrix.shape == (len(base) + 1, base.shape[1])
        assert torch.equal(matrix[: len(base)], base)  # every other row bit-identical
        assert not torch.equal(matrix[len(base)], previous)  # the new row moved (from "toy" at step 0)
        previous = matrix[len(base)]


def test_a_word_the_base_reads_as_nothing_trains_in_its_own_row(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trigger, "BLANK_TRIGGER", float("inf"))  # the tiny base reads "w" as next to nothing
    # num_vectors counts a new word's rows: a known word's own row is one vector, and config.toml says so.
    prompt = "instance_prompt=a photo of w toy"
    run = recipe.main(config(setup, tmp_path / "w", "token=w", prompt, "num_vectors=2")).path
    assert read_run(run).config["num_vectors"] == 1
    pipe = load_pipeline(setup["base"])
    base = pipe.text_encoder.get_input_embeddings().weight.detach()
    (w,) = token_ids(pipe.tokenizer, "w")
    matrix = trained_matrix(run, 4)
    others = torch.ones(len(base), dtype=torch.bool)
    others[w] = False
    assert matrix.shape == base.shape and torch.equal(matrix[others], base[others])  # nothing added
    assert not torch.equal(matrix[w], base[w])
    assert torch.equal(load_file(str(run / "export" / EMBEDDINGS_FILE))["w"][0], matrix[w])


def test_embeddings_load_in_diffusers_and_sample_like_the_run(
    first_run: Path, setup: dict, tmp_path: Path
) -> None:
    path = first_run / "export" / "learned_embeds.safetensors"
    embeddings = load_embeddings(path)
    [vectors] = embeddings.vectors
    assert embeddings.token == "sks" and vectors.shape == (1, 32) and embeddings.family == "sd1"
    assert torch.equal(vectors[0], trained_matrix(first_run, 4)[-1])
    pipe = load_pipeline(setup["base"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token="sks")
    sample_grid(
        pipe, ["a photo of sks toy", "a photo of toy"], [0], tmp_path, steps=2, guidance=6.0, progress=False
    )
    for name in ("p00_s0.png", "p01_s0.png"):
        ours = np.asarray(Image.open(first_run / "samples" / "step_000004" / name))
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), ours)
    step0 = np.asarray(Image.open(first_run / "samples" / "step_000000" / "p00_s0.png"))
    assert not np.array_equal(step0, np.asarray(Image.open(tmp_path / "p00_s0.png")))


def test_resume_is_exact(
    first_run: Path, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left, resumed = crash_then_resume(
        recipe, monkeypatch, lambda out, *extra: config(setup, out, *extra), tmp_path / "r"
    )
    assert left == [2]
    resumed = resumed.path
    assert losses(resumed) == losses(first_run)
    assert torch.equal(trained_matrix(resumed, 4), trained_matrix(first_run, 4))
    whole = load_embeddings(first_run / "export" / "learned_embeds.safetensors").vectors[0]
    assert torch.equal(load_embeddings(resumed / "export" / "learned_embeds.safetensors").vectors[0], whole)
    assert read_run(resumed).info["cache"]["latent"] == {"encoded": 0, "loaded": 4}


def test_several_vectors_all_train(setup: dict, tmp_path: Path) -> None:
    run = recipe.main(
        config(
            setup, tmp_path / "v", "num_vectors=2", "max_steps=2", "sample_every=0", "optim.name=adamw8bit"
        )
    ).path
    [vectors] = load_embeddings(run / "export" / "learned_embeds.safetensors").vectors
    pipe = load_pipeline(setup["base"])
    toy = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("toy</w>")]
    # Both rows moved: the captions said "sks sks_1", so the second vector was trained too.
    assert vectors.shape == (2, 32) and all(not torch.equal(v, toy) for v in vectors)
    pipe.load_textual_inversion(str(run / "export" / "learned_embeds.safetensors"))
    assert pipe.maybe_convert_prompt("a photo of sks toy", pipe.tokenizer) == "a photo of sks sks_1 toy"


def test_shipped_configs_load_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tiny", "default", "sd15"):
        assert load_config(recipe.Config, CONFIGS / f"{name}.toml").max_steps > 0
    sd15 = load_config(recipe.Config, CONFIGS / "sd15.toml")  # diffusers' documented SD1.x values
    assert sd15.resolution == 512 and sd15.optim.lr == 2e-3
    with pytest.raises(ConfigError, match="did you mean 'initializer_token'"):
        load_config(recipe.Config, None, ["initialiser_token=toy"])
    with pytest.raises(ConfigError, match="num_vectors"):
        load_config(recipe.Config, None, ["num_vectors=0"])
    photos = tmp_path / "photos"
    photos.mkdir()
    explicit = [
        f"instance_dir={photos}",
        "instance_prompt=a photo of sks toy",
        f"output_dir={tmp_path / 'x'}",
    ]
    with pytest.raises(ConfigError, match="cannot tell the trigger word"):
        recipe.main(load_config(recipe.Config, None, [*explicit, "token=zwx", "initializer_token=toy"]))
    # A letter is a token: 'w' cannot be a new word, and where the base reads it as a word, not trained in place.
    monkeypatch.setattr(trigger, "BLANK_TRIGGER", 0.0)
    taken = [f"instance_dir={photos}", "instance_prompt=a photo of w toy", f"output_dir={tmp_path / 'x'}"]
    with pytest.raises(ConfigError, match="'w' is already in the tokenizer's vocabulary"):
        recipe.main(load_config(recipe.Config, None, [*taken, "token=w", "initializer_token=toy"]))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------
# SD2 and SDXL bases (SDXL: the token's rows in both text encoders, one clip_l/clip_g file)
# ---------------------------------------------------------------------------------------------------

FAMILY_PRESETS = {
    "tiny-sd2": ("sd2", ["resolution=32"]),
    "tiny-sdxl-shallow": ("sdxl", ["resolution=64"]),
}


@pytest.fixture(scope="module", params=sorted(FAMILY_PRESETS))
def family_setup(
    request: pytest.FixtureRequest, setup: dict, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    root = tmp_path_factory.mktemp(request.param)
    build_pipeline(request.param, seed=0).save_pretrained(root / "base")
    family, resolution = FAMILY_PRESETS[request.param]
    return {
        **setup,
        "base": str(root / "base"),
        "cache": root / "cache",
        "family": family,
        "extra": resolution,
    }


def test_other_families_train_only_the_new_rows_and_resume_exactly(
    family_setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(out: Path, *extra: str) -> recipe.Config:
        # with gradient checkpointing: it is enabled on each text encoder (both on SDXL)
        return config(family_setup, out, *family_setup["extra"], "gradient_checkpointing=true", *extra)

    first = recipe.main(make(tmp_path / "a")).path
    rows = [m for m in read_run(first).metrics if "loss" in m]
    assert sorted(losses(first)) == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in rows)
    left, resumed = crash_then_resume(recipe, monkeypatch, make, tmp_path / "r")
    assert left == [2] and losses(resumed.path) == losses(first)
    base = load_pipeline(family_setup["base"])
    tokenizers, encoders = text_towers(base)
    exported = load_embeddings(first / "export" / EMBEDDINGS_FILE, base=family_setup["family"])
    assert exported.family == family_setup["family"] and len(exported.vectors) == len(encoders)
    for i, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders, strict=True)):
        before = encoder.get_input_embeddings().weight.detach()
        start = before[token_ids(tokenizer, "toy")].mean(dim=0)
        matrix = trained_matrix(first, 4, i)
        assert matrix.shape == (len(before) + 1, before.shape[1]) and torch.equal(
            matrix[: len(before)], before
        )
        assert not torch.equal(matrix[-1], start)  # this encoder's row trained
        assert torch.equal(trained_matrix(resumed.path, 4, i), matrix)  # bit-identical after the crash
        assert torch.equal(exported.vectors[i][0], matrix[-1])
    again = load_embeddings(resumed.path / "export" / EMBEDDINGS_FILE).vectors
    assert all(torch.equal(a, b) for a, b in zip(again, exported.vectors, strict=True))
    # The exported file, loaded as a diffusers user would, draws what the trained rows draw.
    export = first / "export" / EMBEDDINGS_FILE
    expected = load_pipeline(family_setup["base"])
    if exported.family == "sdxl":
        state = load_file(str(export))
        for key, tokenizer, encoder in (
            ("clip_l", expected.tokenizer, expected.text_encoder),
            ("clip_g", expected.tokenizer_2, expected.text_encoder_2),
        ):
            expected.load_textual_inversion(
                state[key], token="sks", text_encoder=encoder, tokenizer=tokenizer
            )
    else:
        expected.load_textual_inversion(str(export), token="sks")
    trained = load_pipeline(family_setup["base"])
    for i, (tokenizer, encoder) in enumerate(zip(*text_towers(trained), strict=True)):
        tokenizer.add_tokens(["sks"])
        encoder.resize_token_embeddings(len(tokenizer))
        encoder.get_input_embeddings().weight.data = trained_matrix(first, 4, i)
    image = draw(trained, "a photo of sks toy")
    assert np.array_equal(draw(expected, "a photo of sks toy"), image)
    assert not np.array_equal(draw(base, "a photo of toy"), image)


def draw(pipe, prompt: str) -> np.ndarray:  # noqa: ANN001
    """The diffusers pipeline's own image (seed 0, 2 steps)."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images[0]


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree"])
def test_resume_is_exact_with_prodigy_and_schedule_free(
    optimizer: str, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = lambda out, *extra: config(setup, out, *extra)  # noqa: E731
    whole, resumed = check_exact_resume(recipe, monkeypatch, make, tmp_path, f"optim.name={optimizer}")
    # the export holds the weights the last checkpoint holds (a schedule-free run's averaged ones; switching
    # to the training weights and back rounds in the last bits)
    exported = load_embeddings(whole.path / "export" / "learned_embeds.safetensors").vectors[0]
    token_rows = trained_matrix(whole.path, 4)[-exported.shape[0] :]
    torch.testing.assert_close(exported, token_rows.to(exported.dtype))


def test_validation_loss_on_a_val_dir(setup: dict, tmp_path: Path) -> None:
    val_dir = make_concept(tmp_path / "val", count=2) / "photos"
    run = recipe.main(config(setup, tmp_path / "r", "val_every=3", f"val_dir={val_dir}", "sample_every=0"))
    info = read_run(run.path)
    assert [m["step"] for m in info.metrics if "val_loss" in m] == [0, 3, 4]
    assert info.info["photos"] == 4  # with a val_dir every photo of the subject trains
