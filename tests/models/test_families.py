"""Family detection (SD1 / SD2 / SDXL) and the tiny SD2 / SDXL presets with the real module names."""

from __future__ import annotations

import pytest

from tune.errors import ModelError
from tune.models import build_pipeline, load_pipeline
from tune.models.families import check_same_family, family_of_checkpoint, family_of_folder, family_of_pipeline


@pytest.mark.parametrize(
    ("preset", "family", "pipeline"),
    [
        ("tiny", "sd1", "StableDiffusionPipeline"),
        ("tiny-sd2", "sd2", "StableDiffusionPipeline"),
        ("tiny-sdxl-shallow", "sdxl", "StableDiffusionXLPipeline"),
    ],
)
def test_presets_detect_and_load_back_as_their_family(tmp_path, preset, family, pipeline):
    pipe = build_pipeline(preset, seed=0)
    assert family_of_pipeline(pipe) == family
    pipe.save_pretrained(tmp_path)
    assert family_of_folder(tmp_path) == family
    loaded = load_pipeline(tmp_path)
    assert type(loaded).__name__ == pipeline
    assert family_of_pipeline(loaded) == family


def test_tiny_sdxl_has_the_real_module_names_and_counts():
    pipe = build_pipeline("tiny-sdxl", seed=0)
    unet = pipe.unet
    assert len(unet.state_dict()) == 1680  # real SDXL's U-Net tensor count
    attention = [n for n, _ in unet.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
    assert len(attention) // 3 * 4 == 560  # q, k, v, out.0 of every attention: diffusers' LoRA targets
    assert "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k" in dict(unet.named_modules())
    # Two text encoders of different widths, a non-square projection, >= 10 layers in bigG.
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert te1.hidden_size != te2.hidden_size and te2.projection_dim != te2.hidden_size
    assert te2.num_hidden_layers >= 10 and te1.hidden_act == "quick_gelu" and te2.hidden_act == "gelu"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.vae.config.scaling_factor == 0.13025
    assert unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size


def test_tiny_sd2_is_v_prediction_with_linear_projections():
    pipe = build_pipeline("tiny-sd2", seed=0)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection and pipe.text_encoder.config.hidden_act == "gelu"


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = (build_pipeline("tiny-sdxl-shallow", seed=s) for s in (0, 0, 1))
    key = "down_blocks.1.attentions.0.proj_in.weight"
    assert a.unet.state_dict()[key].equal(b.unet.state_dict()[key])
    assert not a.unet.state_dict()[key].equal(c.unet.state_dict()[key])
    assert a.text_encoder_2.state_dict()["text_projection.weight"].equal(
        b.text_encoder_2.state_dict()["text_projection.weight"]
    )


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"],
            "sd1",
        ),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"], "sd2"),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "conditioner.embedders.1.model.ln_final.weight",
            ],
            "sdxl",
        ),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], None),
    ],
)
def test_single_file_keys_tell_the_family(keys, family):
    assert family_of_checkpoint(keys) == family


def test_a_file_of_another_family_is_one_line_naming_both():
    check_same_family("x.safetensors", "sdxl", "sdxl")
    with pytest.raises(
        ModelError, match=r"x\.safetensors is for SDXL but the base model is Stable Diffusion 1\.x"
    ):
        check_same_family("x.safetensors", "sdxl", "sd1")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json"):
        family_of_folder(tmp_path)
