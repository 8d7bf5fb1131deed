"""Family detection (SD1 / SD2 / SDXL) and the tiny SD2 / SDXL presets with the real module names."""

from __future__ import annotations

import pytest
import torch

from tune.errors import ModelError
from tune.models import build_pipeline, load_pipeline
from tune.models.families import (
    check_same_family,
    family_of_checkpoint,
    family_of_embedding,
    family_of_folder,
    family_of_lora,
    family_of_pipeline,
)


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


def _pair(stem: str, width: int = 4) -> dict[str, torch.Tensor]:
    return {
        f"{stem}.lora_down.weight": torch.zeros(2, width),
        f"{stem}.lora_up.weight": torch.zeros(width, 2),
    }


@pytest.mark.parametrize(
    ("tensors", "metadata", "family"),
    [
        # a second text encoder
        (_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1"), {}, "sdxl"),
        (_pair("text_encoder_2.text_model.encoder.layers.0.mlp.fc1"), {}, "sdxl"),
        # metadata (kohya's and ModelSpec's)
        (
            _pair("lora_unet_mid_block_attentions_0_proj_in"),
            {"ss_base_model_version": "sdxl_base_v1-0"},
            "sdxl",
        ),
        (_pair("lora_unet_x"), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        (_pair("lora_unet_x"), {"ss_base_model_version": "sd_v2_v"}, "sd2"),
        (_pair("lora_unet_x"), {"ss_v2": "True"}, "sd2"),
        (_pair("lora_unet_x"), {"ss_base_model_version": "sd_v1", "ss_v2": "False"}, "sd1"),
        # the real models' cross-attention widths
        (_pair("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 2048), {}, "sdxl"),
        (_pair("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 1024), {}, "sd2"),
        (_pair("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 768), {}, "sd1"),
        # structure: attention only SDXL has (tiny widths)
        (_pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"), {}, "sdxl"),
        (_pair("unet.up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q"), {}, "sdxl"),
        (_pair("lora_unet_output_blocks_0_1_proj_in"), {}, "sdxl"),
        # nothing tells (SD1 and SD2 share their structure); SD1's up-block-0 upsampler is no attention
        (_pair("lora_unet_output_blocks_2_1_conv"), {}, None),
        (_pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), {}, None),
        (
            {
                **_pair("unet.up_blocks.0.attentions.0.proj_in"),
                **_pair("unet.up_blocks.3.attentions.0.proj_in"),
            },
            {},
            None,
        ),
    ],
)
def test_lora_files_tell_the_family(tensors, metadata, family):
    assert family_of_lora(tensors, metadata) == family


@pytest.mark.parametrize(
    ("tensors", "family"),
    [
        ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, "sdxl"),
        ({"clip_l": torch.zeros(2, 16), "clip_g": torch.zeros(2, 24)}, "sdxl"),  # tiny widths too
        ({"emb_params": torch.zeros(2, 768)}, "sd1"),
        ({"emb_params": torch.zeros(2, 1024)}, "sd2"),
        ({"string_to_param.*": torch.zeros(1, 1024)}, "sd2"),
        ({"emb_params": torch.zeros(2, 32)}, None),  # a tiny width: the caller compares with its base
        ({"<sks>": torch.zeros(2, 768)}, "sd1"),  # diffusers names the one tensor after its token
        ({"<sks>": torch.zeros(2, 1024)}, "sd2"),
        ({"a": torch.zeros(2, 768), "b": torch.zeros(2, 768)}, None),  # no embedding file layout
    ],
)
def test_embedding_files_tell_the_family(tensors, family):
    assert family_of_embedding(tensors) == family


def test_other_family_message_names_both():
    with pytest.raises(ModelError, match=r"^LoRA x is for SDXL but the base model is Stable Diffusion 2\.x"):
        check_same_family("LoRA x", "sdxl", "sd2")
    check_same_family("LoRA x", "sd1", "sd1")
