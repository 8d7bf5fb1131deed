"""tune.personalize.weights: a run's tuned weights into its base pipeline and out again, for tiny lora,
textual_inversion and dreambooth runs written in-process through the run directory's own writers.

The reference each time is what the callers did before they shared `apply_run_weights`: the dashboard's
LoraStack at a scale plus diffusers' `load_textual_inversion`, and loading export/pipeline/ whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tune import lora as lora_io
from tune.embeddings import EMBEDDINGS_FILE
from tune.errors import ConfigError, ModelError
from tune.models import build_pipeline, load_pipeline
from tune.personalize import apply_run_weights
from tune.runs import EXPORT_PIPELINE, RunDir
from tune.sampling import generate

PROMPT = "a photo of <sks> toy"


def make_run(path: Path, recipe: str, base: str, steps: tuple[int, ...] = ()) -> Path:
    """A run directory as a recipe leaves it: run.json, config.toml, complete (empty) checkpoints, DONE."""
    run = RunDir.create(path, recipe, f'base_model = "{base}"\n')
    run.update_info(base_model=base)
    for step in steps:
        run.checkpoint_dir(step).mkdir(parents=True)
        run.mark_checkpoint_complete(step)
    run.finish()
    return path


def save_embedding(path: Path, width: int, value: float | None = None, vectors: int = 2) -> torch.Tensor:
    """A learned_embeds.safetensors of the token <sks> (`vectors` rows: <sks>, <sks>_1 ...)."""
    rows = torch.full((vectors, width), value) if value is not None else torch.randn(vectors, width)
    save_file({"<sks>": rows}, str(path))
    return rows


def state(pipe) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every weight the run's files can change, copied (SDXL's text_encoder_2 too)."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
        for key, value in getattr(pipe, name).state_dict().items()
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def assert_is_base(pipe, base: dict[str, torch.Tensor], vocab: dict[str, int]) -> None:  # noqa: ANN001
    assert_same(state(pipe), base)
    assert pipe.tokenizer.get_vocab() == vocab and "<sks>" not in pipe.tokenizer.get_vocab()
    assert pipe.text_encoder.config.vocab_size == len(vocab)


def image(pipe) -> np.ndarray:  # noqa: ANN001
    [sample] = generate(pipe, PROMPT, 0, steps=2, scheduler="ddim", progress=False)
    return np.asarray(sample.image)


# ---------------------------------------------------------------------------------------------------
# lora
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lora run with pivotal tuning: random (non-zero) U-Net and text-encoder adapters, one at step 2
    and another exported, each with its trigger embedding."""
    run = make_run(tmp_path_factory.mktemp("weights") / "lora", "lora", tiny_pipeline_dir, steps=(2,))
    pipe = load_pipeline(tiny_pipeline_dir)
    lora_io.inject_lora(pipe.unet, pipe.text_encoder, ["attn2", "text_encoder"], rank=4, alpha=4)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    torch.manual_seed(0)
    for folder, path in (
        (run / "checkpoints" / "step_000002", lora_io.checkpoint_adapter_path(run, 2)),
        (run / "export", lora_io.final_adapter_path(run)),
    ):
        with torch.no_grad():
            for module in (pipe.unet, pipe.text_encoder):
                for name, param in module.named_parameters():
                    if "lora_" in name:
                        param.copy_(torch.randn_like(param) * 0.5)
        lora_io.save_adapter(pipe.unet, pipe.text_encoder, path)
        save_embedding(folder / EMBEDDINGS_FILE, width)
    return run


@pytest.mark.parametrize("step", [2, None], ids=["checkpoint", "export"])
def test_lora_run_equals_the_stack_and_diffusers_embedding_then_the_base(
    lora_run: Path, tiny_pipeline_dir: str, step: int | None
) -> None:
    folder = lora_run / "checkpoints" / "step_000002" if step else lora_run / "export"
    adapter = lora_io.checkpoint_adapter_path(lora_run, 2) if step else lora_io.final_adapter_path(lora_run)
    expected = load_pipeline(tiny_pipeline_dir)  # the dashboard's way, before apply_run_weights
    expected.load_textual_inversion(str(folder / EMBEDDINGS_FILE), token="<sks>")
    stack = lora_io.LoraStack(expected)
    stack.add(lora_io.load_lora(adapter, expected), 0.7, name="run")

    pipe = load_pipeline(tiny_pipeline_dir)
    base, vocab, base_image = state(pipe), pipe.tokenizer.get_vocab(), image(pipe)
    with apply_run_weights(pipe, lora_run, step, lora_scale=0.7) as applied:
        assert applied.step == step and applied.files == (adapter, folder / EMBEDDINGS_FILE)
        assert_same(state(pipe), state(expected))
        assert pipe.tokenizer.get_vocab() == expected.tokenizer.get_vocab()
        assert np.array_equal(image(pipe), image(expected))
        stack.set_scale("run", 1.0)
        applied.set_lora_scale(1.0)
        assert applied.lora_scale == 1.0
        assert_same(state(pipe), state(expected))
        applied.set_lora_scale(0.0)  # no adapter left in the weights; the embedding stays
        assert_same(
            {k: v for k, v in state(pipe).items() if "token_embedding" not in k},
            {k: v for k, v in base.items() if "token_embedding" not in k},
        )
    assert_is_base(pipe, base, vocab)
    assert np.array_equal(image(pipe), base_image)
    with pytest.raises(RuntimeError, match="boom"), apply_run_weights(pipe, lora_run, step):
        raise RuntimeError("boom")  # an error inside the block takes the weights out too
    assert_is_base(pipe, base, vocab)


# ---------------------------------------------------------------------------------------------------
# textual_inversion
# ---------------------------------------------------------------------------------------------------


def test_textual_inversion_run_adds_the_token_per_step_and_takes_it_out(
    tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "ti", "textual_inversion", tiny_pipeline_dir, steps=(2, 4))
    pipe = load_pipeline(tiny_pipeline_dir)
    base, vocab = state(pipe), pipe.tokenizer.get_vocab()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for step, value in ((2, 0.5), (4, -0.25)):
        save_embedding(run / "checkpoints" / f"step_{step:06d}" / EMBEDDINGS_FILE, width, value)
        with apply_run_weights(pipe, run, step):
            ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
            rows = pipe.text_encoder.get_input_embeddings().weight[ids]
            assert torch.equal(rows, torch.full((2, width), value))
        assert_is_base(pipe, base, vocab)
    # The export, as diffusers' load_textual_inversion (the dashboard's way before) puts it in.
    save_embedding(run / "export" / EMBEDDINGS_FILE, width, vectors=3)
    expected = load_pipeline(tiny_pipeline_dir)
    expected.load_textual_inversion(str(run / "export" / EMBEDDINGS_FILE), token="<sks>")
    with apply_run_weights(pipe, run) as applied:
        assert applied.step is None and applied.lora_scale is None
        assert_same(state(pipe), state(expected))
        assert pipe.tokenizer.get_vocab() == expected.tokenizer.get_vocab()
        assert np.array_equal(image(pipe), image(expected))
        with pytest.raises(ConfigError, match="only lora runs have a LoRA scale"):
            applied.set_lora_scale(0.5)
    assert_is_base(pipe, base, vocab)


# ---------------------------------------------------------------------------------------------------
# dreambooth
# ---------------------------------------------------------------------------------------------------


def test_dreambooth_checkpoint_loads_the_ema_unet_and_restores(
    tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "db", "dreambooth", tiny_pipeline_dir, steps=(1, 2))
    folder = run / "checkpoints" / "step_000001"
    pipe = load_pipeline(tiny_pipeline_dir)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    trained = {k: v + 1.0 for k, v in original.items()}
    save_file(trained, str(folder / "model.safetensors"))
    ema = [p.detach() + 2.0 for p in pipe.unet.parameters()]
    torch.save({"decay": 0.999, "shadow_params": ema}, folder / "custom_checkpoint_1.pkl")
    torch.save({"epoch": 0}, folder / "custom_checkpoint_0.pkl")  # the data loader's state
    text_encoder = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    save_file({k: v - 1.0 for k, v in text_encoder.items()}, str(folder / "model_1.safetensors"))
    with apply_run_weights(pipe, run, 1) as applied:
        for p, e in zip(pipe.unet.parameters(), ema, strict=True):
            assert torch.equal(p, e)
        assert applied.files == (folder / "model.safetensors", folder / "model_1.safetensors")
        for k, v in pipe.text_encoder.state_dict().items():  # trained with train_text_encoder
            assert torch.equal(v, text_encoder[k] - 1.0)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, original[k])
    assert_same({k: v for k, v in pipe.text_encoder.state_dict().items()}, text_encoder)
    with pytest.raises(ModelError, match="no model.safetensors"):
        with apply_run_weights(pipe, run, 2):  # a complete checkpoint without the U-Net
            pass


def test_dreambooth_export_equals_loading_the_exported_pipeline(
    tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "db", "dreambooth", tiny_pipeline_dir)
    tuned = load_pipeline(tiny_pipeline_dir)
    with torch.no_grad():
        for module, shift in ((tuned.unet, 0.01), (tuned.text_encoder, -0.01)):
            for param in module.parameters():
                param.add_(shift)
    tuned.save_pretrained(run / "export" / EXPORT_PIPELINE)
    expected = load_pipeline(str(run / "export" / EXPORT_PIPELINE))  # the dashboard's way before
    pipe = load_pipeline(tiny_pipeline_dir)
    base, vocab = state(pipe), pipe.tokenizer.get_vocab()
    with apply_run_weights(pipe, run) as applied:
        assert applied.files == (run / "export" / EXPORT_PIPELINE,)
        assert_same(state(pipe), state(expected))
    assert_is_base(pipe, base, vocab)


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear error, the pipeline untouched
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "step", "error", "message"),
    [
        ("lora", None, ModelError, "no export/pytorch_lora_weights.safetensors and no complete"),
        ("lora", 2, ModelError, "step_000002 has no lora.safetensors; is it a lora run's checkpoint"),
        ("textual_inversion", None, ModelError, r"export has no learned_embeds.safetensors; .* step \(2\)"),
        ("textual_inversion", 2, ModelError, "step_000002 has no learned_embeds.safetensors"),
        ("dreambooth", None, ModelError, r"export/pipeline has no model_index.json; .*has it finished"),
        ("dreambooth", 3, ConfigError, r"no complete checkpoint at step 3; complete checkpoints: 2"),
        ("unet", None, ModelError, "is a unet run; only lora, dreambooth, textual_inversion runs"),
    ],
)
def test_a_run_without_its_files_says_which_and_what_to_do(
    tiny_pipeline_dir: str, tmp_path: Path, recipe: str, step: int | None, error: type, message: str
) -> None:
    run = make_run(tmp_path / recipe, recipe, tiny_pipeline_dir, steps=(2,))
    pipe = load_pipeline(tiny_pipeline_dir)
    base, vocab = state(pipe), pipe.tokenizer.get_vocab()
    with pytest.raises(error, match=message), apply_run_weights(pipe, run, step):
        pass
    assert_is_base(pipe, base, vocab)


# ---------------------------------------------------------------------------------------------------
# SDXL: the clip_l/clip_g file into both encoders; another family's file refused
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-sdxl-shallow")
    build_pipeline("tiny-sdxl-shallow", seed=0).save_pretrained(path)
    return str(path)


def vocabs(pipe) -> list[dict[str, int]]:  # noqa: ANN001
    return [pipe.tokenizer.get_vocab(), pipe.tokenizer_2.get_vocab()]


def sdxl_image(pipe) -> np.ndarray:  # noqa: ANN001
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images[0]


def test_sdxl_textual_inversion_equals_two_diffusers_calls_then_the_base(
    sdxl_dir: str, tmp_path: Path
) -> None:
    run = make_run(tmp_path / "ti", "textual_inversion", sdxl_dir)
    path = run / "export" / EMBEDDINGS_FILE
    torch.manual_seed(0)
    rows = {"clip_l": torch.randn(2, 16), "clip_g": torch.randn(2, 24)}
    save_file(rows, str(path), metadata={"token": "<sks>"})
    expected = load_pipeline(sdxl_dir)  # what a diffusers user does with the file
    expected.load_textual_inversion(
        rows["clip_l"], token="<sks>", text_encoder=expected.text_encoder, tokenizer=expected.tokenizer
    )
    expected.load_textual_inversion(
        rows["clip_g"], token="<sks>", text_encoder=expected.text_encoder_2, tokenizer=expected.tokenizer_2
    )
    pipe = load_pipeline(sdxl_dir)
    base, vocab, base_image = state(pipe), vocabs(pipe), sdxl_image(pipe)
    with apply_run_weights(pipe, run) as applied:
        assert applied.files == (path,)
        assert_same(state(pipe), state(expected))
        assert vocabs(pipe) == vocabs(expected)
        image = sdxl_image(pipe)
        assert np.array_equal(image, sdxl_image(expected)) and not np.array_equal(image, base_image)
    assert_same(state(pipe), base)
    assert vocabs(pipe) == vocab
    assert [pipe.text_encoder.config.vocab_size, pipe.text_encoder_2.config.vocab_size] == [
        len(v) for v in vocab
    ]
    assert np.array_equal(sdxl_image(pipe), base_image)


def test_an_embedding_of_another_family_is_refused_with_both_names(
    sdxl_dir: str, tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    sdxl_file = {"clip_l": torch.zeros(1, 16), "clip_g": torch.zeros(1, 24)}
    for base, rows, message in (
        (tiny_pipeline_dir, sdxl_file, "is for SDXL but the base model is Stable Diffusion 1.x"),
        (sdxl_dir, {"<sks>": torch.zeros(1, 32)}, "is for Stable Diffusion 1.x but the base model is SDXL"),
    ):
        run = make_run(tmp_path / Path(base).name, "textual_inversion", base)
        save_file(rows, str(run / "export" / EMBEDDINGS_FILE))
        pipe = load_pipeline(base)
        before = state(pipe)
        with pytest.raises(ModelError, match=message), apply_run_weights(pipe, run):
            pass
        assert_same(state(pipe), before)


def test_sdxl_dreambooth_checkpoint_and_export_load_both_text_encoders(sdxl_dir: str, tmp_path: Path) -> None:
    run = make_run(tmp_path / "db", "dreambooth", sdxl_dir, steps=(1,))
    folder = run / "checkpoints" / "step_000001"
    pipe = load_pipeline(sdxl_dir)
    base = state(pipe)
    names = ("unet", "text_encoder", "text_encoder_2")  # model.safetensors, model_1, model_2: prepare order
    for i, name in enumerate(names):
        shifted = {k: v + i + 1.0 for k, v in getattr(pipe, name).state_dict().items()}
        save_file(shifted, str(folder / f"model{'_' + str(i) if i else ''}.safetensors"))
    with apply_run_weights(pipe, run, 1):
        assert all(
            torch.equal(v, base[k] + names.index(k.split(".")[0]) + 1.0) for k, v in state(pipe).items()
        )
    assert_same(state(pipe), base)
    tuned = load_pipeline(sdxl_dir)
    with torch.no_grad():
        for param in tuned.text_encoder_2.parameters():
            param.add_(0.01)
    tuned.save_pretrained(run / "export" / EXPORT_PIPELINE)
    with apply_run_weights(pipe, run):
        assert_same(state(pipe), state(tuned))
    assert_same(state(pipe), base)
