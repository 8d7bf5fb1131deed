"""Cross-attention maps while sampling: softmax sums, word alignment, unchanged images, restore, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from tune import attention, sampling
from tune.cli import main as tune_main
from tune.errors import ConfigError

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    return tiny_pipe


def test_maps_are_a_softmax_over_tokens_and_the_image_is_unchanged(pipe: StableDiffusionPipeline) -> None:
    plain = sampling.generate(pipe, "a red circle", 3, steps=STEPS)[0]
    [recorded] = sampling.generate(pipe, "a red circle", 3, steps=STEPS, attention=True)
    assert np.array_equal(np.asarray(plain.image), np.asarray(recorded.image))
    maps = recorded.attention
    assert maps.maps.shape == (STEPS, 77, 8, 8)  # the tiny preset's most-layered attn2 level
    assert torch.allclose(maps.maps.sum(1), torch.ones(()), atol=1e-5)
    assert maps.tokens[:4] == ("<|startoftext|>", "a</w>", "red</w>", "circle</w>")
    assert plain.attention is None


def test_without_guidance_the_whole_batch_is_the_conditional_half(pipe: StableDiffusionPipeline) -> None:
    [a, b] = sampling.generate(pipe, ["a red circle", "a blue square"], 0, steps=2, guidance=1.0,
                               batch_size=2, attention=True)  # fmt: skip
    assert a.attention.tokens[2] == "red</w>" and b.attention.tokens[2] == "blue</w>"
    assert not torch.equal(a.attention.maps, b.attention.maps)
    assert torch.allclose(b.attention.maps.sum(1), torch.ones(()), atol=1e-5)


def test_a_multi_token_word_is_the_sum_of_its_tokens(pipe: StableDiffusionPipeline) -> None:
    prompt = "a zebrafoo on grass"
    [sample] = sampling.generate(pipe, prompt, 0, steps=2, attention=True)
    maps = sample.attention
    pieces = pipe.tokenizer.tokenize("zebrafoo")
    assert len(pieces) > 1
    positions = maps.word_tokens("zebrafoo", pipe.tokenizer)
    assert positions == list(range(2, 2 + len(pieces)))
    assert torch.allclose(maps.word_map("zebrafoo", pipe.tokenizer), maps.maps[:, positions].sum(1))
    with pytest.raises(ConfigError, match="'cat' is not in the prompt"):
        maps.word_map("cat", pipe.tokenizer)


def test_original_processors_are_restored_after_an_error(pipe: StableDiffusionPipeline) -> None:
    before = pipe.unet.attn_processors
    with pytest.raises(ConfigError), attention.record_attention(pipe.unet) as store:
        assert any(isinstance(p, attention.RecordingProcessor) for p in pipe.unet.attn_processors.values())
        store.resolution()  # nothing recorded yet: a ConfigError inside the block
    assert pipe.unet.attn_processors == before


def test_cli_writes_strips_and_maps_and_refuses_unknown_words(
    tiny_pipeline_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "img.png"
    argv = ["sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--steps", "5"]
    argv += ["--device", "cpu", "--out", str(out)]
    assert tune_main([*argv, "--attention", "red,circle"]) == 0
    maps = attention.load_maps(tmp_path / "img_attention.safetensors")
    assert maps.maps.shape == (5, 77, 8, 8) and maps.tokens[2] == "red</w>"
    with Image.open(tmp_path / "img_attn_red.png") as strip:
        assert strip.size == (5 * 32, 32)
    assert (tmp_path / "img_attn_circle.png").is_file()

    capsys.readouterr()
    assert tune_main([*argv, "--attention", "square"]) == 2
    # stderr may also hold diffusers' "Loading pipeline components" bar (on after some other tests)
    errors = [line for line in capsys.readouterr().err.splitlines() if "Loading" not in line and line.strip()]
    assert len(errors) == 1 and "'square' is not in the prompt" in errors[0]


def test_sdxl_maps_average_layers_with_different_head_counts() -> None:
    from tune.models import build_pipeline

    pipe = build_pipeline("tiny-sdxl-shallow")
    pipe.set_progress_bar_config(disable=True)
    plain = sampling.generate(pipe, "a red circle", 0, steps=2)[0]
    [recorded] = sampling.generate(pipe, "a red circle", 0, steps=2, attention=True)
    assert np.array_equal(np.asarray(plain.image), np.asarray(recorded.image))
    assert torch.allclose(recorded.attention.maps.sum(1), torch.ones(()), atol=1e-5)
