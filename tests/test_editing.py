"""Prompt-to-prompt editing: plain sampling at K = 0, A again for B == A, swaps, refinement alignment,
reweighting, the local blend, restored processors, and `tune sample --edit`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from tune import attention, editing, sampling
from tune import editing_hooks as hooks
from tune.cli import main as tune_main
from tune.errors import ConfigError

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    return tiny_pipe


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def plain(pipe: StableDiffusionPipeline, prompt: str, seed: int, steps: int = STEPS) -> np.ndarray:
    return pixels(sampling.generate(pipe, prompt, seed, steps=steps, guidance=6.0)[0].image)


def test_zero_edit_steps_is_plain_sampling_of_b(pipe: StableDiffusionPipeline) -> None:
    result = editing.edit(pipe, "a red circle", "a blue circle", 3, steps=STEPS, edit_steps=0)
    assert np.array_equal(pixels(result.image_b), plain(pipe, "a blue circle", 3))
    assert not result.blended


def test_b_equal_to_a_with_every_step_edited_draws_a(pipe: StableDiffusionPipeline) -> None:
    result = editing.edit(
        pipe, "a red circle", "a red circle", 3, steps=STEPS, edit_steps=STEPS, self_steps=2
    )
    assert np.array_equal(pixels(result.image_b), pixels(result.image_a))
    # A went through the recording path for every step and is still A, up to float rounding.
    assert np.abs(pixels(result.image_a) - plain(pipe, "a red circle", 3)).max() <= 2


@pytest.mark.parametrize("blend", [False, True])
def test_a_word_swap_changes_b(pipe: StableDiffusionPipeline, blend: bool) -> None:
    result = editing.edit(
        pipe, "a red circle", "a blue circle", 3, steps=STEPS, edit_steps=STEPS, blend=blend
    )
    assert result.plan.mode == "swap" and result.plan.source == tuple(range(77))
    assert result.blended is blend
    assert not np.array_equal(pixels(result.image_b), plain(pipe, "a blue circle", 3))


def test_refinement_aligns_the_shared_tokens(pipe: StableDiffusionPipeline) -> None:
    tokenizer = pipe.tokenizer
    a = attention.prompt_tokens("a red ball", tokenizer)
    b = attention.prompt_tokens("a large red zebrafoo ball", tokenizer)
    new = len(tokenizer.tokenize("large")) + len(tokenizer.tokenize("zebrafoo"))
    assert new > 2  # zebrafoo is several BPE pieces
    plan = editing.plan_edit(a, b, tokenizer)
    assert plan.mode == "refine"
    for j, i in enumerate(plan.source):
        assert i == -1 or a[i] == b[j]
    assert plan.source.count(-1) == new
    assert plan.source[:2] == (0, 1)  # start token, "a"
    red, ball = b.index("red</w>"), b.index("ball</w>")
    assert (plan.source[red], plan.source[ball]) == (2, 3)
    end = tokenizer.eos_token
    assert plan.source[b.index(end)] == a.index(end)  # the end token and the padding after it line up
    assert -1 not in plan.source[b.index(end) :]
    assert editing.align_tokens(["x", "y"], ["x", "new", "y"]) == [0, -1, 1]


def test_prompts_that_are_neither_a_swap_nor_a_refinement_are_refused(pipe: StableDiffusionPipeline) -> None:
    tokenizer = pipe.tokenizer
    a = attention.prompt_tokens("a red ball", tokenizer)
    for b in ("a blue zebrafoo", "a ball", "ball red a square"):
        with pytest.raises(ConfigError, match="a word swap needs the same number of tokens"):
            editing.plan_edit(a, attention.prompt_tokens(b, tokenizer), tokenizer)


def test_reweighting_a_word_changes_the_image(pipe: StableDiffusionPipeline) -> None:
    same = dict(steps=STEPS, edit_steps=0)
    result = editing.edit(pipe, "a red circle", "a red circle", 3, reweight={"red": 3.0}, **same)
    assert result.plan.scale[2] == 3.0 and result.plan.scale.count(1.0) == 76
    assert not np.array_equal(pixels(result.image_b), pixels(result.image_a))
    unchanged = editing.edit(pipe, "a red circle", "a red circle", 3, reweight={"red": 1.0}, **same)
    assert np.array_equal(pixels(unchanged.image_b), pixels(unchanged.image_a))
    with pytest.raises(ConfigError, match="'square' is not in the edited prompt"):
        editing.edit(pipe, "a red circle", "a red circle", 3, reweight={"square": 2.0}, **same)


def test_outside_the_blend_mask_b_keeps_a_latents(pipe: StableDiffusionPipeline) -> None:
    # An empty mask keeps A's U-Net output everywhere, so B, another prompt, is drawn as A exactly.
    a_tokens = attention.prompt_tokens("a red circle", pipe.tokenizer)
    plan = editing.plan_edit(
        a_tokens, attention.prompt_tokens("a blue square", pipe.tokenizer), pipe.tokenizer
    )
    with hooks.edit_attention(pipe.unet, 0) as state, hooks.blend_outside(pipe.unet, state):
        [a] = sampling.generate(pipe, "a red circle", 5, steps=STEPS, guidance=6.0)
        state.keep = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
        hooks.start_edit(pipe.unet, state, plan)
        [b] = sampling.generate(pipe, "a blue square", 5, steps=STEPS, guidance=6.0)
    assert len(state.outputs) == STEPS
    assert np.array_equal(pixels(a.image), pixels(b.image))
    assert not pipe.unet._forward_hooks


def test_the_blend_mask_covers_where_the_swapped_word_looks() -> None:
    maps = torch.full((3, 77, 8, 8), 0.01)
    maps[:, 2, 2:4, 2:4] = 0.05  # the word looks at a 2x2 cell block: 4x4 latent pixels of 16x16
    mask = editing.blend_mask(attention.AttentionMaps(maps, ("x",) * 77), [2], (16, 16))[0, 0]
    assert mask.shape == (16, 16) and mask[5:7, 5:7].all()
    assert not mask[10:].any() and not mask[:, 10:].any()  # far from it: A's latents


def test_processors_and_hooks_are_restored_after_an_error(pipe: StableDiffusionPipeline) -> None:
    before = pipe.unet.attn_processors
    with pytest.raises(ConfigError, match="8"):  # the size check inside generate, after the swap
        editing.edit(pipe, "a red circle", "a blue circle", 0, steps=STEPS, edit_steps=2, width=30)
    assert pipe.unet.attn_processors == before
    assert not pipe.unet._forward_hooks
    with pytest.raises(ConfigError, match=r"edit steps must be in \[0, 4\]"):
        editing.edit(pipe, "a red circle", "a blue circle", 0, steps=STEPS, edit_steps=5)


def test_cli_writes_a_and_b_side_by_side_and_alone(tiny_pipeline_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "edit.png"
    argv = ["sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--edit", "a blue circle"]
    argv += ["--steps", "3", "--reweight", "blue=2", "--device", "cpu", "--out", str(out)]
    assert tune_main(argv) == 0
    with Image.open(tmp_path / "edit_a.png") as a, Image.open(tmp_path / "edit_b.png") as b:
        assert a.size == b.size == (32, 32)
        assert not np.array_equal(pixels(a), pixels(b))
    with Image.open(out) as grid:
        assert grid.width > 2 * 32 and grid.height > 32


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--edit", "a red circle", "--reweight", "square=2"],
            "--reweight: word 'square' is not in the edited prompt",
        ),
        (["--edit", "a blue zebrafoo circle"], "a word swap needs the same number of tokens"),
        (
            ["--edit", "a blue circle", "--edit-steps", "6"],
            r"--edit-steps must be in [0, 5] (--steps); got 6",
        ),
        (["--edit", "a blue circle", "--edit-steps", "-1"], "--edit-steps must be in [0, 5]"),
        (["--edit", "a blue circle", "--reweight", "blue"], "--reweight needs WORD=FACTOR"),
        (["--edit-steps", "2"], "--edit-steps needs --edit B"),
        (["--edit", "a blue circle", "--attention", "red"], "--attention does not combine with --edit"),
    ],
)
def test_cli_edit_errors_are_one_line(
    tiny_pipeline_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["sample", "--model", tiny_pipeline_dir, "--prompt", "a red circle", "--steps", "5"]
    assert tune_main([*argv, "--device", "cpu", "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "x.png").exists()


def test_cli_edit_without_a_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tune_main(["sample", "--edit", "a blue circle", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tune: error: --edit B needs --prompt A, the prompt to edit"


def test_sdxl_edits_with_its_two_text_encoders() -> None:
    from tune.models import build_pipeline

    pipe = build_pipeline("tiny-sdxl-shallow")
    pipe.set_progress_bar_config(disable=True)
    zero = editing.edit(pipe, "a red circle", "a blue circle", 0, steps=2, edit_steps=0)
    assert np.array_equal(pixels(zero.image_b), plain(pipe, "a blue circle", 0, steps=2))
    swapped = editing.edit(pipe, "a red circle", "a blue circle", 0, steps=2, edit_steps=2)
    assert swapped.blended and not np.array_equal(pixels(swapped.image_b), pixels(zero.image_b))


def test_side_by_side_is_a_then_b() -> None:
    a, b = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    plan = editing.EditPlan("swap", tuple(range(77)), (1.0,) * 77)
    grid = editing.EditResult("a red ball", "a blue ball", 0, a, b, plan, 2, 5).side_by_side()
    pixels_ = np.asarray(grid)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    row = pixels_[-16]
    first_red, first_blue = [int(np.flatnonzero((row == c).all(-1))[0]) for c in (red, blue)]
    assert first_red + 32 == first_blue and grid.height > 32  # A left of B, labels above
