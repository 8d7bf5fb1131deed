"""The shipped default models (models/world-base, models/world-clip, models/world-judge) load with plain
diffusers and transformers, without tune, and draw and read what their captions say."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors import safe_open

from tune import PROJECT_ROOT

BASE = PROJECT_ROOT / "models" / "world-base"
CLIP = PROJECT_ROOT / "models" / "world-clip"
MAX_BASE_AND_CLIP_BYTES = 40 * 2**20


def weight_files(folder):
    return sorted(folder.rglob("*.safetensors"))


def folder_bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_base_is_an_fp16_pipeline_folder_under_40_mb_with_its_clip():
    index = json.loads((BASE / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (BASE / part).is_dir(), part
    files = weight_files(BASE)
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    for path in files + weight_files(CLIP):
        with safe_open(str(path), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16"}, (path, dtypes)
    assert folder_bytes(BASE) + folder_bytes(CLIP) <= MAX_BASE_AND_CLIP_BYTES
    card = (BASE / "MODEL_CARD.md").read_text()
    assert "make base" in card and "tune run unet" in card and "held-out" in card


def test_widths_are_multiples_of_32_and_the_unet_has_groupnorm_32():
    """ComfyUI's model code builds SD1.x U-Nets with GroupNorm(32), so it can apply our LoRAs. Its VAE
    loader fixes the widths (128, 256, 512, 512) whatever the file holds, so no GroupNorm lets it build
    ours; the base VAE keeps GroupNorm(8), which holds flat colours at width 32 (vae/default.toml)."""
    unet = json.loads((BASE / "unet" / "config.json").read_text())
    vae = json.loads((BASE / "vae" / "config.json").read_text())
    assert unet["norm_num_groups"] == 32
    for config in (unet, vae):
        assert all(w % 32 == 0 for w in config["block_out_channels"]), config["block_out_channels"]


# Run in a fresh interpreter where `import tune` fails: the folder must not need tune to load.
DRAW = textwrap.dedent(
    """
    import sys, json
    sys.modules["tune"] = None
    import numpy as np, torch
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])  # as a user would: no dtype given
    pipe.set_progress_bar_config(disable=True)
    out = []
    for seed in range(4):
        image = pipe(
            sys.argv[2], num_inference_steps=25, guidance_scale=6.0, generator=torch.Generator().manual_seed(seed),
        ).images[0]
        out.append(np.asarray(image).tolist())
    print(json.dumps(out))
    """
)
PROMPT = "a photo of a large red ball on a blue background"


def test_base_loads_with_plain_diffusers_and_draws_the_prompt():
    from tune.world.judge import load_judge

    result = subprocess.run(
        [sys.executable, "-c", DRAW, str(BASE), PROMPT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    images = [np.asarray(a, dtype=np.uint8) for a in json.loads(result.stdout.strip().splitlines()[-1])]
    assert all(image.shape == (64, 64, 3) for image in images)
    verdicts = load_judge().read(images)
    # The judge reads the prompt on most of four fixed seeds.
    right = [(v.cls, v.color, v.background, v.style) == ("ball", "red", "blue", "photo") for v in verdicts]
    assert sum(right) >= 3, [v.as_dict() for v in verdicts]


def test_world_clip_loads_with_transformers_and_matches_captions():
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    from tune.world.captions import caption
    from tune.world.render import render
    from tune.world.spec import Spec

    model = CLIPModel.from_pretrained(CLIP).eval()
    assert model.dtype == torch.float32  # fp16 on disk, fp32 in memory (the CPU needs it)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP)
    specs = [
        Spec(cls="ball", color="red", background="blue"),
        Spec(cls="cup", color="yellow", background="grass", style="drawing"),
        Spec(cls="person", color="white", hair="black", background="green", style="pixel"),
    ]
    size = model.config.vision_config.image_size
    images = [render(s, np.random.default_rng(i), size, size) for i, s in enumerate(specs)]
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    processor = json.loads((CLIP / "preprocessor_config.json").read_text())
    mean = torch.tensor(processor["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(processor["image_std"]).view(1, 3, 1, 1)
    pixels = (pixels.float() / 255 - mean) / std
    tokens = tokenizer([caption(s) for s in specs], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=pixels).logits_per_text
    assert logits.argmax(dim=1).tolist() == [0, 1, 2]


@pytest.fixture(scope="module")
def round_trip() -> dict:
    from diffusers import AutoencoderKL

    from tune.world.judge import load_judge
    from tune.world.reconstruction import subject_round_trip

    vae = AutoencoderKL.from_pretrained(BASE / "vae").float().eval()
    return subject_round_trip(vae, 64, load_judge())


def test_base_vae_keeps_the_toy_recognisable(round_trip: dict) -> None:
    """The example toy's photos survive the shipped VAE's round trip (the judge still finds it)."""
    assert round_trip["sks-toy_photos"] == 10 and round_trip["sks-toy_found_originals"] >= 9, round_trip
    assert round_trip["sks-toy_found"] >= 9, round_trip


def test_base_vae_keeps_the_person_recognisable(round_trip: dict) -> None:
    """The example person's photos survive the shipped VAE's round trip (green hair, purple spots)."""
    assert round_trip["w-person_photos"] == 10 and round_trip["w-person_found_originals"] >= 9, round_trip
    assert round_trip["w-person_found"] >= 9, round_trip
