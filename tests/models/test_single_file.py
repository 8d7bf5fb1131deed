"""save_single_file writes SD's original (LDM) layout, and diffusers reads it back bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from tune.models import build_pipeline, load_pipeline, save_single_file
from tune.models.families import family_of_checkpoint
from tune.models.single_file import convert_to_ldm


@pytest.fixture(scope="module")
def seed1_pipeline():
    return build_pipeline("tiny", seed=1)


@pytest.fixture(scope="module")
def seed1_file(seed1_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "tiny-seed1.safetensors"
    save_single_file(seed1_pipeline, path, dtype=torch.float32)
    return path


def test_round_trip_is_bit_identical(seed1_pipeline, seed1_file: Path, tiny_pipeline_dir: str) -> None:
    # The config folder holds seed-0 weights, so equality with seed 1 proves every weight came from the file.
    loaded = load_pipeline(seed1_file, config=tiny_pipeline_dir)
    for name in ("unet", "vae", "text_encoder"):
        original = getattr(seed1_pipeline, name).state_dict()
        reloaded = getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys(), name
        for key, tensor in original.items():
            assert reloaded[key].dtype == torch.float32
            assert torch.equal(tensor, reloaded[key]), f"{name}.{key}"


def test_file_uses_original_sd_key_names(seed1_file: Path) -> None:
    with safe_open(str(seed1_file), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [16, 16, 1, 1]
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.0.block.2.conv2.weight",
        "first_stage_model.decoder.up.2.upsample.conv.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in keys)
    # Nothing left in diffusers naming.
    assert not any(
        part in key for key in keys for part in ("down_blocks", "up_blocks", "mid_block", "resnets")
    )


def test_half_precision_export(seed1_pipeline, tmp_path: Path, tiny_pipeline_dir: str) -> None:
    path = save_single_file(seed1_pipeline, tmp_path / "half.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    loaded = load_pipeline(path, config=tiny_pipeline_dir)
    expected = seed1_pipeline.unet.conv_out.weight.detach().half().float()
    assert torch.equal(loaded.unet.conv_out.weight.float(), expected)


def test_rejects_other_formats(seed1_pipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_single_file(seed1_pipeline, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="dtype"):
        save_single_file(seed1_pipeline, tmp_path / "model.safetensors", dtype=torch.int8)


def test_full_size_sd15_mapping(sd15_unet_config: dict, sd15_vae_config: dict) -> None:
    # Real SD1.5 widths on the meta device: the key set of an SD1.5 checkpoint (686 U-Net, 248 VAE and
    # 196 CLIP tensors, as in v1-5-pruned-emaonly without the position_ids buffer).
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config)
        vae = AutoencoderKL(**sd15_vae_config)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        )
    checkpoint = convert_to_ldm(
        unet.state_dict(), unet.config, vae.state_dict(), vae.config, text_encoder.state_dict()
    )
    count = {
        prefix: sum(k.startswith(prefix) for k in checkpoint) for prefix in ("model.", "first_", "cond_")
    }
    assert count == {"model.": 686, "first_": 248, "cond_": 196}
    shapes = {key: tuple(value.shape) for key, value in checkpoint.items()}
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert shapes["model.diffusion_model.input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes["model.diffusion_model.output_blocks.8.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes["model.diffusion_model.input_blocks.10.0.in_layers.2.weight"] == (1280, 1280, 3, 3)
    assert shapes["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)
    assert shapes["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["first_stage_model.encoder.mid.attn_1.k.weight"] == (512, 512, 1, 1)


def test_unsupported_unet_is_refused() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
        )
    with pytest.raises(ValueError, match="SD1.x U-Net layout only"):
        convert_to_ldm(unet.state_dict(), unet.config, {}, {"block_out_channels": [8]}, {})


def test_outer_level_without_attention_round_trips(tmp_path: Path) -> None:
    """SDXL's layout choice (no attention on the outermost level), which our base uses, exports and
    reloads exactly; the file simply has no input_blocks.1.1 / output_blocks.11.1 attention."""
    import dataclasses

    from tune.models.presets import PRESETS, build_unet, mirror_block_types

    down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert mirror_block_types(down) == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    pipe = build_pipeline("tiny", seed=1)
    torch.manual_seed(3)
    pipe.unet = build_unet(dataclasses.replace(PRESETS["tiny"], unet_down_block_types=down))
    assert not hasattr(pipe.unet.down_blocks[0], "attentions")
    config_dir = tmp_path / "config"
    pipe.save_pretrained(config_dir)
    path = save_single_file(pipe, tmp_path / "sdxl-style.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.4.1.proj_in.weight" in keys
    assert not any(
        k.startswith(("model.diffusion_model.input_blocks.1.1.", "model.diffusion_model.output_blocks.11.1."))
        for k in keys
    )
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(1.0)  # the folder keeps the old weights; the file's must win
    path = save_single_file(pipe, tmp_path / "sdxl-style.safetensors", dtype=torch.float32)
    loaded = load_pipeline(path, config=config_dir)
    for key, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, loaded.unet.state_dict()[key]), key


def test_eight_latent_channels_round_trip_and_draw(tmp_path: Path) -> None:
    """A VAE with 8 latent channels (the vae recipe's latent_channels) and a U-Net built to follow it:
    the pipeline draws, and the single file keeps every weight exactly."""
    import dataclasses

    from tune.models.presets import PRESETS, build_unet
    from tune.models.scratch import build_autoencoder

    tiny = PRESETS["tiny"]
    pipe = build_pipeline("tiny", seed=1)
    torch.manual_seed(5)
    pipe.vae = build_autoencoder(tiny.vae_block_out_channels, 1, tiny.vae_norm_num_groups, tiny.resolution, 8)
    pipe.unet = build_unet(dataclasses.replace(tiny), pipe.text_encoder.config.hidden_size, latent_channels=8)
    assert pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape[1] == 8
    image = pipe(
        "a ring", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    )
    assert image.images.shape == (1, 32, 32, 3)
    config_dir = tmp_path / "config"
    pipe.save_pretrained(config_dir)
    path = save_single_file(pipe, tmp_path / "lc8.safetensors", dtype=torch.float32)
    loaded = load_pipeline(path, config=config_dir)
    assert loaded.unet.config.in_channels == loaded.vae.config.latent_channels == 8
    for name in ("unet", "vae"):
        for key, tensor in getattr(pipe, name).state_dict().items():
            assert torch.equal(tensor, getattr(loaded, name).state_dict()[key]), f"{name}.{key}"


# ---------------------------------------------------------------------------------------------------
# SDXL and SD2
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """preset -> (seed-1 pipeline, its fp32 single file, a seed-0 config folder of the same preset)."""
    out = {}
    for preset in ("tiny-sdxl", "tiny-sd2"):
        folder = tmp_path_factory.mktemp(preset)
        build_pipeline(preset, seed=0).save_pretrained(
            folder / "model"
        )  # the sibling config folder of model.safetensors
        pipe = build_pipeline(preset, seed=1)
        out[preset] = (
            pipe,
            save_single_file(pipe, folder / "model.safetensors", torch.float32),
            folder / "model",
        )
    return out


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd2"])
def test_family_round_trip_is_bit_identical(family_files: dict, preset: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe, path, config = family_files[preset]
    pipeline_class = StableDiffusionXLPipeline if preset == "tiny-sdxl" else StableDiffusionPipeline
    # diffusers itself, with the local config (without it, it reaches for the hub), and our loader.
    direct = pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True)
    loaded = load_pipeline(path)  # the config folder is found beside the file
    for reloaded in (direct, loaded):
        assert type(reloaded) is pipeline_class
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is None:
                continue
            original, back = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
            assert original.keys() == back.keys(), name
            for key, tensor in original.items():
                assert torch.equal(tensor, back[key]), f"{name}.{key}"
    with safe_open(str(path), framework="pt") as f:
        assert family_of_checkpoint(f.keys()) == preset.removeprefix("tiny-")
    # diffusers would read a narrow SD2 file as SD1 by width; the config keeps it v-prediction.
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type


def test_sdxl_file_uses_sgm_and_open_clip_names(family_files: dict) -> None:
    pipe, path, _ = family_files["tiny-sdxl"]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
        in_proj = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_weight")
    assert len(keys) == 2509 and sum(k.startswith("model.diffusion_model.") for k in keys) == 1680
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "first_stage_model.decoder.up.3.block.2.conv2.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.ln_final.weight",
    ):
        assert key in keys, key
    # OpenCLIP computes x @ P: P is the transformers Linear weight transposed ([width 24, proj 32]).
    weight = pipe.text_encoder_2.text_projection.weight
    assert tuple(weight.shape) == (32, 24) and torch.equal(projection, weight.T)
    attention = pipe.text_encoder_2.text_model.encoder.layers[9].self_attn
    assert torch.equal(
        in_proj, torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    )


def test_sd2_file_uses_open_clip_names(family_files: dict) -> None:
    _, path, _ = family_files["tiny-sd2"]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_bias" in keys
    assert "cond_stage_model.model.token_embedding.weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_family_file_with_a_config_of_another_family(family_files: dict, tiny_pipeline_dir: str) -> None:
    from tune.errors import ModelError

    _, path, _ = family_files["tiny-sdxl"]
    with pytest.raises(
        ModelError, match="is a SDXL checkpoint but the config folder .* is Stable Diffusion 1.x"
    ):
        load_pipeline(path, config=tiny_pipeline_dir)
