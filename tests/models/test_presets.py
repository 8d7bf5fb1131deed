"""Presets keep SD1.5's module topology exactly, at small widths, deterministically."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from tune.errors import ModelError
from tune.models import PRESETS, build_pipeline
from tune.models.presets import build_unet, get_preset

SD15_ATTN2 = (
    [f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in range(3)]
)


@pytest.fixture(scope="module")
def tiny():
    return build_pipeline("tiny", seed=0)


def _module_types(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_unet_has_sd15_module_names_and_types(preset: str, sd15_unet_config: dict) -> None:
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**sd15_unet_config)
        ours = build_unet(PRESETS[preset])
    assert _module_types(ours) == _module_types(sd15)


def test_representative_sd15_modules(tiny) -> None:
    modules = dict(tiny.unet.named_modules())
    assert len(SD15_ATTN2) == 16
    for block in SD15_ATTN2:
        to_k = modules[f"{block}.transformer_blocks.0.attn2.to_k"]
        assert isinstance(to_k, torch.nn.Linear)
        assert to_k.in_features == tiny.text_encoder.config.hidden_size  # cross-attends to the text
        proj_in = modules[f"{block}.proj_in"]
        assert isinstance(proj_in, torch.nn.Conv2d) and proj_in.kernel_size == (1, 1)
    attn2 = [name for name in modules if name.endswith(".attn2")]
    assert sorted(attn2) == sorted(f"{b}.transformer_blocks.0.attn2" for b in SD15_ATTN2)
    for name in ("conv_in", "time_proj", "time_embedding.linear_1", "time_embedding.linear_2", "conv_out"):
        assert name in modules
    assert "down_blocks.3.attentions" not in modules and "up_blocks.0.attentions" not in modules


def test_tiny_text_encoder_and_vae_layout(tiny) -> None:
    text_keys = set(tiny.text_encoder.state_dict())
    assert "encoder.layers.0.self_attn.q_proj.weight" in text_keys
    assert "final_layer_norm.weight" in text_keys
    assert tiny.text_encoder.config.vocab_size == len(tiny.tokenizer)
    assert tiny.text_encoder.config.max_position_embeddings == 77
    assert tiny.text_encoder.config.eos_token_id == tiny.tokenizer.eos_token_id
    assert tiny.vae.config.latent_channels == 4
    assert tiny.vae_scale_factor == 4
    vae_modules = dict(tiny.vae.named_modules())
    assert isinstance(vae_modules["encoder.mid_block.attentions.0.to_q"], torch.nn.Linear)


def test_scheduler_is_sd15s_schedule(tiny) -> None:
    config = tiny.scheduler.config
    assert isinstance(tiny.scheduler, DDIMScheduler)
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.num_train_timesteps == 1000
    assert config.prediction_type == "epsilon"
    assert config.steps_offset == 1
    assert config.clip_sample is False and config.set_alpha_to_one is False


def test_same_seed_same_weights_other_seed_other_weights(tiny) -> None:
    again = build_pipeline("tiny", seed=0)
    other = build_pipeline("tiny", seed=1)
    for name in ("unet", "vae", "text_encoder"):
        ours, same, different = (getattr(p, name).state_dict() for p in (tiny, again, other))
        assert all(torch.equal(ours[k], same[k]) for k in ours), name
        assert not all(torch.equal(ours[k], different[k]) for k in ours), name


def test_tiny_draws_an_image(tiny) -> None:
    size = PRESETS["tiny"].resolution
    images = tiny(
        "a photo of a red circle",
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, size, size, 3)
    assert (images >= 0).all() and (images <= 1).all()


def test_preset_sizes() -> None:
    tiny, small = PRESETS["tiny"], PRESETS["small"]
    assert (tiny.resolution, tiny.latent_size) == (32, 8)
    assert (small.resolution, small.latent_size) == (64, 16)
    with torch.device("meta"):
        small_params = sum(p.numel() for p in build_unet(small).parameters())
        tiny_params = sum(p.numel() for p in build_unet(tiny).parameters())
    assert 3e6 <= small_params <= 15e6
    assert tiny_params < 1e6
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.resolution = 64  # type: ignore[misc]


def test_unknown_preset_suggests_the_nearest() -> None:
    with pytest.raises(ModelError, match="did you mean 'tiny'"):
        get_preset("tiyn")
    with pytest.raises(ModelError, match="choose one of: tiny, small"):
        build_pipeline("sd15")


def test_given_tokenizer_sets_the_text_vocabulary(tmp_path) -> None:
    from tune.models.tokenizer import DEFAULT_CORPUS, build_clip_tokenizer

    tokenizer = build_clip_tokenizer(["a photo of a green triangle", *DEFAULT_CORPUS[:60]], 540, tmp_path)
    pipe = build_pipeline("tiny", seed=0, tokenizer=tokenizer)
    assert pipe.tokenizer is tokenizer
    assert pipe.text_encoder.config.vocab_size == len(tokenizer) == 540
    assert pipe.text_encoder.config.eos_token_id == len(tokenizer) - 1


def test_small_preset_builds() -> None:
    pipe = build_pipeline("small", seed=0)
    assert pipe.unet.config.sample_size == 16
    assert pipe.vae.config.sample_size == 64
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 128
    assert pipe.text_encoder.config.num_hidden_layers == 4
