"""The shared sampler and `tune sample` on SDXL and SD2 bases (tiny presets with the real module names):
parity with diffusers' own pipelines (text-to-image, img2img, every scheduler), negative prompt,
trajectories (and their fp32 decode of an fp16 SDXL VAE), LoRA files through `--lora`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image

from tune import lora as lora_io
from tune import sampling
from tune.cli import main
from tune.lora.core import Lora
from tune.models import build_pipeline, load_pipeline

PROMPT = "a red circle on a white background"
NEGATIVE = "a blue square"
# diffusers' own classes, as a user would pick them by hand (no tune code in the reference path).
REFERENCE = {
    "tiny-sdxl-shallow": (
        StableDiffusionXLPipeline,
        StableDiffusionXLImg2ImgPipeline,
        {"add_watermarker": False},
        {"add_watermarker": False, "requires_aesthetics_score": False},
    ),
    "tiny-sd2": (
        StableDiffusionPipeline,
        StableDiffusionImg2ImgPipeline,
        {"safety_checker": None, "requires_safety_checker": False},
        {"safety_checker": None, "requires_safety_checker": False},
    ),
}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference in 0..255 pixel units."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module", params=["tiny-sdxl-shallow", "tiny-sd2"])
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(preset name, saved diffusers folder) of each family's tiny preset."""
    path = tmp_path_factory.mktemp(request.param)
    build_pipeline(request.param, seed=0).save_pretrained(path)
    return request.param, str(path)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny-sdxl-shallow folder for the SDXL-only tests."""
    path = tmp_path_factory.mktemp("tiny-sdxl-shallow-lora")
    build_pipeline("tiny-sdxl-shallow", seed=0).save_pretrained(path)
    return str(path)


def reference(preset: str, folder: str, img2img: bool = False) -> DiffusionPipeline:
    text_cls, img_cls, text_kwargs, img_kwargs = REFERENCE[preset]
    cls, kwargs = (img_cls, img_kwargs) if img2img else (text_cls, text_kwargs)
    pipe = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image(size: int) -> Image.Image:
    init = np.zeros((size, size, 3), np.uint8)
    init[: size // 2] = (255, 0, 0)
    init[size // 2 :, : size // 2] = (0, 0, 255)
    init[size // 2 :, size // 2 :] = (30, 200, 40)
    return Image.fromarray(init)


def test_tune_sample_matches_diffusers(family_dir: tuple[str, str], tmp_path: Path) -> None:
    """Done-when of issue 20: `tune sample` == the family's diffusers pipeline, same seed and settings
    (with a negative prompt, which SDXL encodes with both text encoders)."""
    preset, folder = family_dir
    out = tmp_path / "img.png"
    argv = ["sample", "--model", folder, "--prompt", PROMPT, "--negative", NEGATIVE, "--steps", "6"]
    assert main([*argv, "--guidance", "5", "--seed", "3", "--device", "cpu", "--out", str(out)]) == 0
    expected = reference(preset, folder)(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    with Image.open(out) as written:
        diff = mean_abs_diff(written, expected)
        assert written.size == expected.size == ((64, 64) if preset == "tiny-sdxl-shallow" else (32, 32))
    print(f"{preset}: tune sample vs diffusers: mean abs pixel diff {diff:.6f} / 255")
    assert diff < 2.0
    assert diff == 0.0  # the same pipeline class and settings on the same CPU


def test_tune_sample_img2img_matches_diffusers(family_dir: tuple[str, str], tmp_path: Path) -> None:
    preset, folder = family_dir
    side = 64 if preset == "tiny-sdxl-shallow" else 32
    init_path = tmp_path / "init.png"
    init_image(side).save(init_path)
    out = tmp_path / "img.png"
    argv = ["sample", "--model", folder, "--prompt", PROMPT, "--init-image", str(init_path)]
    argv += ["--strength", "0.6", "--steps", "10", "--seed", "2", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    with Image.open(init_path) as init:
        expected = reference(preset, folder, img2img=True)(
            PROMPT,
            image=init.convert("RGB"),
            strength=0.6,
            num_inference_steps=10,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(2),
        ).images[0]
    with Image.open(out) as written:
        diff = mean_abs_diff(written, expected)
    print(f"{preset}: tune sample img2img vs diffusers: mean abs pixel diff {diff:.6f} / 255")
    assert diff == 0.0
    [text2img] = sampling.generate(load_pipeline(folder), PROMPT, 2, steps=10, progress=False)
    assert mean_abs_diff(expected, text2img.image) > 1  # it really started from the init image


def test_every_scheduler_matches_diffusers(family_dir: tuple[str, str]) -> None:
    """Each SCHEDULERS name is built from the model's scheduler config (SD2 keeps v-prediction) and draws
    what diffusers draws with that scheduler; the pipeline's own scheduler is left alone."""
    preset, folder = family_dir
    pipe = load_pipeline(folder)
    own, own_config = pipe.scheduler, dict(pipe.scheduler.config)
    ref = reference(preset, folder)
    images = {}
    for name, cls in sampling.SCHEDULERS.items():
        [sample] = sampling.generate(pipe, PROMPT, 1, steps=4, scheduler=name, progress=False)
        ref.scheduler = cls.from_config(own_config)
        assert ref.scheduler.config.prediction_type == own_config["prediction_type"]
        seed = torch.Generator("cpu").manual_seed(1)
        expected = ref(PROMPT, num_inference_steps=4, guidance_scale=7.5, generator=seed).images[0]
        assert mean_abs_diff(sample.image, expected) == 0.0, name
        images[name] = pixels(sample.image)
    assert pipe.scheduler is own and dict(own.config) == own_config
    assert np.abs(images["ddim"] - images["euler_a"]).mean() > 1
    [negative] = sampling.generate(pipe, PROMPT, 1, steps=4, negative_prompt=NEGATIVE, progress=False)
    [plain] = sampling.generate(pipe, PROMPT, 1, steps=4, progress=False)
    assert mean_abs_diff(negative.image, plain.image) > 0.5


def test_trajectory_and_grid(family_dir: tuple[str, str], tmp_path: Path) -> None:
    """Film strips of x0 predictions (SD2: from v-prediction) and the grid files, at the native size."""
    pipe = load_pipeline(family_dir[1])
    side = sampling.native_size(pipe)[0]
    samples = sampling.sample_grid(pipe, [PROMPT, NEGATIVE], [0, 5], tmp_path, steps=6, trajectory_every=2)
    sample = samples[0]
    [plain] = sampling.generate(pipe, PROMPT, 0, steps=6, progress=False)
    assert len(sample.frames) == 3 and sample.frames[-1] is sample.image
    assert np.array_equal(pixels(sample.image), pixels(plain.image))  # decoding frames changes nothing
    assert mean_abs_diff(sample.frames[0], sample.image) > 1  # x0 predictions evolve
    with Image.open(tmp_path / "p00_s0_trajectory.png") as strip:
        assert strip.size == (3 * side, side)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "p01_s5.png").is_file()


@pytest.mark.filterwarnings("ignore:.*upcast_vae.*:FutureWarning")  # diffusers deprecating its own call
def test_trajectory_decodes_an_fp16_force_upcast_vae_in_fp32(sdxl_dir: str) -> None:
    """SDXL's VAE overflows fp16; diffusers' pipeline decodes in fp32 when `force_upcast`, and so do
    our trajectory frames. The VAE is fp16 again afterwards."""
    pipe = load_pipeline(sdxl_dir)
    assert pipe.vae.config.force_upcast
    pipe.vae.to(torch.float16)
    seen: list[torch.dtype] = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    try:
        [sample] = sampling.generate(pipe, PROMPT, 0, steps=4, trajectory_every=1, progress=False)
    finally:
        hook.remove()
    assert len(seen) == 4 and set(seen) == {torch.float32}  # 3 frames and the pipeline's final decode
    assert pipe.vae.dtype == torch.float16
    assert len(sample.frames) == 4 and all(np.isfinite(pixels(f)).all() for f in sample.frames)


def add_random_lora(model: torch.nn.Module, targets: list[str], seed: int) -> None:
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)


@pytest.mark.parametrize("file_format", ["diffusers", "kohya"])
def test_tune_sample_lora_on_sdxl_equals_the_in_memory_adapter(
    sdxl_dir: str, tmp_path: Path, file_format: str
) -> None:
    """A LoRA on the U-Net and both text encoders, written as a diffusers or kohya (SGM U-Net names,
    lora_te1_/lora_te2_) file: `tune sample --lora` draws what the PEFT adapters draw in memory."""
    pipe = load_pipeline(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    add_random_lora(pipe.unet, attention, 0)
    add_random_lora(pipe.text_encoder, ["q_proj", "v_proj"], 1)
    add_random_lora(pipe.text_encoder_2, ["q_proj", "v_proj"], 2)
    modules = dict(lora_io.lora_from_peft(pipe.unet, pipe.text_encoder).modules)
    second = lora_io.lora_from_peft(None, pipe.text_encoder_2).modules
    modules |= {f"text_encoder_2.{k.removeprefix('text_encoder.')}": v for k, v in second.items()}
    lora = Lora(modules=modules, formats=frozenset({"peft"}))
    path = lora_io.save_lora(lora, tmp_path / "x.safetensors", file_format, dtype=torch.float32)
    [in_memory] = sampling.generate(pipe, PROMPT, 4, steps=6, progress=False)
    out = tmp_path / "lora.png"
    argv = ["sample", "--model", sdxl_dir, "--prompt", PROMPT, "--lora", str(path), "--steps", "6"]
    assert main([*argv, "--seed", "4", "--device", "cpu", "--out", str(out)]) == 0
    base_pipe = load_pipeline(sdxl_dir)
    read = lora_io.load_lora(path, base_pipe).modules
    assert {k.split(".")[0] for k in read} == {"unet", "text_encoder", "text_encoder_2"}
    [base] = sampling.generate(base_pipe, PROMPT, 4, steps=6, progress=False)
    with Image.open(out) as written:
        diff = mean_abs_diff(written, in_memory.image)
        print(f"tune sample --lora vs in-memory adapter: mean abs pixel diff {diff:.6f} / 255")
        assert diff < 1.0
        assert mean_abs_diff(written, base.image) > 1  # the LoRA changed the image
