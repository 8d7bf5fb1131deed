"""The shared sampler: determinism, parity with diffusers, schedulers, img2img, trajectories, files, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from tune import grids, sampling
from tune.cli import sample as sample_cli
from tune.errors import ConfigError, DataError, ModelError, TuneError
from tune.models import load_pipeline

STEPS = 6


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference in 0..255 pixel units."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir: str) -> StableDiffusionPipeline:
    """Loaded once for this module; tests here only read it (the sampler must not modify it)."""
    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tune sample")
    sample_cli.configure_cli(parser)
    return parser.parse_args(list(argv))


def test_same_seed_is_bit_identical_and_other_seeds_differ(pipe: StableDiffusionPipeline) -> None:
    first = sampling.generate(pipe, "a red circle", [3, 4], steps=STEPS)
    again = sampling.generate(pipe, ["a red circle"], 3, steps=STEPS)
    assert [(s.prompt, s.seed) for s in first] == [("a red circle", 3), ("a red circle", 4)]
    assert np.array_equal(pixels(first[0].image), pixels(again[0].image))
    assert mean_abs_diff(first[0].image, first[1].image) > 5


def test_results_are_prompt_major_with_native_size(pipe: StableDiffusionPipeline) -> None:
    samples = sampling.generate(pipe, ["a red circle", "a blue square"], [0, 1, 2], steps=2)
    assert [(s.prompt_index, s.seed) for s in samples] == [(i, s) for i in range(2) for s in range(3)]
    assert {s.image.size for s in samples} == {sampling.native_size(pipe)} == {(32, 32)}


def test_paired_prompts_batch_across_prompts_like_one_at_a_time(pipe: StableDiffusionPipeline) -> None:
    prompts = ["a red circle", "a blue square", "a green triangle"]
    batched = sampling.generate(pipe, prompts, [7, 8, 9], steps=2, paired=True, batch_size=2, progress=False)
    assert [(s.prompt_index, s.prompt, s.seed) for s in batched] == [
        (0, prompts[0], 7),
        (1, prompts[1], 8),
        (2, prompts[2], 9),
    ]
    for sample in batched:
        [alone] = sampling.generate(pipe, sample.prompt, sample.seed, steps=2, progress=False)
        assert mean_abs_diff(sample.image, alone.image) < 0.5  # batching may change the lowest bits only
    assert mean_abs_diff(batched[0].image, batched[1].image) > 5
    with pytest.raises(ConfigError, match="paired prompts and seeds must match"):
        sampling.generate(pipe, prompts, [1, 2], paired=True)


def test_tune_sample_matches_diffusers_pipeline(tiny_pipeline_dir: str, tmp_path: Path) -> None:
    """Done-when of the sampler issue: `tune sample` == plain diffusers with the same settings."""
    from tune.cli import main

    out = tmp_path / "nested" / "img.png"
    prompt = "a red circle on a white background"
    argv = ["sample", "--model", tiny_pipeline_dir, "--prompt", prompt, "--scheduler", "ddim"]
    argv += ["--steps", "6", "--guidance", "5", "--seed", "3", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0

    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        prompt, num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3)
    ).images[0]
    with Image.open(out) as written:
        diff = mean_abs_diff(written, expected)
    print(f"tune sample vs diffusers: mean abs pixel diff {diff:.6f} / 255")
    assert diff < 2.0
    assert diff == 0.0  # same code path, same CPU: bit-identical is what we expect


def test_tune_sample_embedding_draws_as_diffusers_load_textual_inversion(
    tiny_pipeline_dir: str, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from tune.cli import main

    width = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir).text_encoder.config.hidden_size
    embedding = tmp_path / "sks.safetensors"  # A1111's one-tensor layout: {token: [vectors, width]}
    save_file(
        {"<sks>": torch.randn(1, width, generator=torch.Generator().manual_seed(0)) * 3}, str(embedding)
    )
    prompt = "a photo of <sks> toy"
    argv = ["sample", "--model", tiny_pipeline_dir, "--prompt", prompt, "--scheduler", "ddim", "--steps", "4"]
    argv += ["--guidance", "5", "--seed", "1", "--device", "cpu"]
    assert main([*argv, "--embedding", str(embedding), "--out", str(tmp_path / "with.png")]) == 0
    assert main([*argv, "--out", str(tmp_path / "without.png")]) == 0

    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    reference.load_textual_inversion(str(embedding))
    expected = reference(
        prompt, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(1)
    ).images[0]
    with Image.open(tmp_path / "with.png") as drawn, Image.open(tmp_path / "without.png") as plain:
        assert mean_abs_diff(drawn, expected) == 0.0  # the token means the file's vector, as in diffusers
        assert mean_abs_diff(drawn, plain) > 1  # and not the pieces '<sks>' splits into without it
    missing = [*argv, "--embedding", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.png")]
    assert main(missing) == 2 and not (tmp_path / "x.png").exists()


def test_every_scheduler_runs_and_leaves_the_pipeline_alone(pipe: StableDiffusionPipeline) -> None:
    own = pipe.scheduler
    own_config = dict(own.config)
    images = {}
    for name in sampling.SCHEDULERS:
        [sample] = sampling.generate(pipe, "a green triangle", 0, steps=4, scheduler=name)
        assert sample.image.size == (32, 32)
        images[name] = pixels(sample.image)
    assert pipe.scheduler is own and dict(own.config) == own_config
    # Samplers really differ (ancestral/stochastic ones most of all) ...
    assert np.abs(images["ddim"] - images["euler_a"]).mean() > 1
    # ... and "no scheduler" means the model's own one (DDIM for the tiny preset).
    [default] = sampling.generate(pipe, "a green triangle", 0, steps=4)
    assert np.array_equal(pixels(default.image), images["ddim"])
    with pytest.raises(ConfigError, match="unknown scheduler"):
        sampling.generate(pipe, "x", 0, steps=1, scheduler="plms")


def test_negative_prompt_changes_the_image(pipe: StableDiffusionPipeline) -> None:
    [plain] = sampling.generate(pipe, "a red circle", 0, steps=STEPS)
    [negative] = sampling.generate(pipe, "a red circle", 0, steps=STEPS, negative_prompt="a blue square")
    assert mean_abs_diff(plain.image, negative.image) > 0.5


def test_img2img_strength(pipe: StableDiffusionPipeline) -> None:
    init = np.zeros((32, 32, 3), np.uint8)
    init[:16] = (255, 0, 0)
    init[16:, :16] = (0, 0, 255)
    init[16:, 16:] = (30, 200, 40)
    init_image = Image.fromarray(init)
    # The tiny VAE is random, so "approximately the init image" means: what the VAE gives back for
    # it. img2img encodes with the first draw of the seed's generator; repeat that draw here.
    with torch.no_grad():
        x = pipe.image_processor.preprocess(init_image)
        latent = pipe.vae.encode(x).latent_dist.sample(generator=torch.Generator("cpu").manual_seed(0))
        round_trip = pipe.image_processor.postprocess(pipe.vae.decode(latent).sample)[0]

    # 10 steps x strength 0.1 = one denoising step from the least noisy timestep. The random U-Net
    # cannot remove even that little noise, and the random VAE's latents are small next to it, so
    # "close" is relative: far closer than a full-strength run, which ignores the init image.
    [weak] = sampling.generate(pipe, "a red circle", 0, steps=10, init_image=init_image, strength=0.1)
    [full] = sampling.generate(pipe, "a red circle", 0, steps=10, init_image=init_image, strength=1.0)
    [text2img] = sampling.generate(pipe, "a red circle", 0, steps=10)
    weak_diff, full_diff = mean_abs_diff(weak.image, round_trip), mean_abs_diff(full.image, round_trip)
    assert weak_diff < 0.5 * full_diff
    assert mean_abs_diff(full.image, weak.image) > 10
    # Strength 1 starts from pure noise, yet the noise is added to the init latents' schedule:
    # it is still an img2img run, not the text-to-image sample of the same seed.
    assert mean_abs_diff(full.image, text2img.image) > 0
    with pytest.raises(ConfigError, match="no denoising step"):
        sampling.generate(pipe, "x", 0, steps=10, init_image=init_image, strength=0.05)


def test_trajectory_strip(pipe: StableDiffusionPipeline) -> None:
    [sample] = sampling.generate(pipe, "a red circle", 0, steps=STEPS, trajectory_every=2)
    [plain] = sampling.generate(pipe, "a red circle", 0, steps=STEPS)
    assert len(sample.frames) == 3  # after steps 2 and 4, then the final image
    assert sample.frames[-1] is sample.image
    assert np.array_equal(pixels(sample.image), pixels(plain.image))  # decoding frames changes nothing
    strip = sample.film_strip()
    assert strip is not None and strip.size == (3 * 32, 32)
    assert np.array_equal(pixels(strip.crop((64, 0, 96, 32))), pixels(sample.image))
    # x0 predictions evolve: the first frame is not the final image.
    assert mean_abs_diff(sample.frames[0], sample.image) > 1
    # Ancestral sampling draws noise every step: recording frames must keep passing our generator.
    [odd] = sampling.generate(pipe, "a red circle", 0, steps=STEPS, trajectory_every=4, scheduler="euler_a")
    [odd_plain] = sampling.generate(pipe, "a red circle", 0, steps=STEPS, scheduler="euler_a")
    assert len(odd.frames) == 2  # ceil(6 / 4)
    assert np.array_equal(pixels(odd.image), pixels(odd_plain.image))


def test_make_grid_places_cells_and_labels() -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    images = [Image.new("RGB", (16, 16), c) for c in colors]
    grid = grids.make_grid(images, 2, 3)
    assert grid.size == (48, 32)
    assert grid.getpixel((16 + 8, 16 + 8)) == colors[4]
    labelled = grids.make_grid(images, 2, 3, row_labels=["first", "second"], col_labels=["a", "b", "c"])
    assert labelled.width > 48 and labelled.height > 32
    # The images sit at the bottom right; the margins hold dark text pixels.
    dx, dy = labelled.width - 48, labelled.height - 32
    assert labelled.getpixel((dx + 16 + 8, dy + 16 + 8)) == colors[4]
    margin = np.asarray(labelled)[:, :dx]
    assert margin.min() < 128
    with pytest.raises(ValueError, match="needs 6 images"):
        grids.make_grid(images[:5], 2, 3)


def test_sample_grid_writes_the_documented_files(pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    out = tmp_path / "samples" / "step_000010"
    samples = sampling.sample_grid(
        pipe, ["a red circle", "a blue square"], [0, 7], out, steps=4, trajectory_every=2
    )
    names = {p.name for p in out.iterdir()}
    images = {"p00_s0.png", "p00_s7.png", "p01_s0.png", "p01_s7.png"}
    strips = {n.replace(".png", "_trajectory.png") for n in images}
    assert names == images | strips | {"grid.png", "prompts.json"}
    index = json.loads((out / "prompts.json").read_text())
    assert index["prompts"] == ["a red circle", "a blue square"] and index["seeds"] == [0, 7]
    assert index["scheduler"] == "DDIMScheduler" and (index["width"], index["height"]) == (32, 32)
    assert (index["steps"], index["guidance"], index["trajectory_every"], index["strength"]) == (
        4,
        7.5,
        2,
        None,
    )
    assert [(e["file"], e["prompt_index"], e["seed"]) for e in index["images"]] == [
        ("p00_s0.png", 0, 0),
        ("p00_s7.png", 0, 7),
        ("p01_s0.png", 1, 0),
        ("p01_s7.png", 1, 7),
    ]
    with Image.open(out / "p01_s7.png") as written:
        assert np.array_equal(pixels(written), pixels(samples[3].image))
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 2 * 32 and grid.height >= 2 * 32


def test_cli_writes_trajectory_next_to_the_image(tiny_pipeline_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    argv = ["--model", tiny_pipeline_dir, "--prompt", "a cat", "--steps", "4", "--trajectory", "2"]
    assert sample_cli.run_cli(cli_args(*argv, "--device", "cpu", "--out", str(out))) == 0
    with Image.open(tmp_path / "cat_trajectory.png") as strip, Image.open(out) as image:
        assert strip.size == (2 * 32, 32)
        assert np.array_equal(pixels(strip.crop((32, 0, 64, 32))), pixels(image))


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--width", "36"], ConfigError, "width must be a positive multiple of 8"),
        (["--init-image", "missing.png"], DataError, "init image not found"),
    ],
)
def test_cli_user_errors(
    tiny_pipeline_dir: str, tmp_path: Path, extra: list[str], error: type[TuneError], match: str
) -> None:
    argv = ["--model", tiny_pipeline_dir, "--prompt", "x", "--steps", "1", "--device", "cpu"]
    args = cli_args(*argv, "--out", str(tmp_path / "o.png"), *extra)
    with pytest.raises(error, match=match):
        sample_cli.run_cli(args)
    assert not (tmp_path / "o.png").exists()


def test_cli_refuses_unsafe_outputs_and_missing_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_png = tmp_path / "notes.png"
    not_png.write_text("my notes")
    for out, match in [
        (tmp_path / "x.jpg", "must name a .png"),
        (tmp_path, "must name a .png"),
        (not_png, "not a PNG image; refusing"),
    ]:
        with pytest.raises(ConfigError, match=match):
            sample_cli.run_cli(cli_args("--prompt", "x", "--out", str(out)))
    assert not_png.read_text() == "my notes"
    with pytest.raises(ModelError):
        sample_cli.run_cli(
            cli_args("--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "a.png"))
        )
    # The default model (shipped in models/) may be missing: say so instead of a loader traceback.
    import tune.models

    monkeypatch.setattr(tune.models, "resolve_model_path", lambda name: tmp_path / "not-trained-yet")
    with pytest.raises(ModelError, match="default model models/world-base is missing.*make base"):
        sample_cli.run_cli(cli_args("--prompt", "x", "--out", str(tmp_path / "a.png")))
