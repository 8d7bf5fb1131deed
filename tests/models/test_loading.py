"""load_pipeline: diffusers folders, single files, path resolution, and a ModelError for every mistake."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from tune.errors import ModelError
from tune.models import load_pipeline, save_single_file


@pytest.fixture(scope="module")
def tiny_file(tiny_pipeline_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_single_file(load_pipeline(tiny_pipeline_dir), path, dtype=torch.float32)
    return path


def test_saved_tiny_pipeline_loads_in_plain_diffusers(tiny_pipeline_dir: str) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_pipeline_dir, local_files_only=True, safety_checker=None
    )
    image = pipe(
        "a photo of a dog",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)


def test_load_pipeline_from_folder(tiny_pipeline_dir: str) -> None:
    pipe = load_pipeline(tiny_pipeline_dir)
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32
    half = load_pipeline(Path(tiny_pipeline_dir), torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_single_file_with_sibling_config_folder(
    tiny_pipeline_dir: str, tiny_file: Path, tmp_path: Path
) -> None:
    # Convention: `<name>.safetensors` next to a diffusers folder `<name>/`.
    shutil.copytree(tiny_pipeline_dir, tmp_path / "model")
    shutil.copy(tiny_file, tmp_path / "model.safetensors")
    pipe = load_pipeline(tmp_path / "model.safetensors")
    reference = load_pipeline(tiny_pipeline_dir)
    assert torch.equal(pipe.unet.conv_in.weight, reference.unet.conv_in.weight)


def test_single_file_inside_a_diffusers_folder(
    tiny_pipeline_dir: str, tiny_file: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "export")
    shutil.copy(tiny_file, folder / "model.safetensors")
    assert load_pipeline(folder / "model.safetensors").vae is not None


# --- every user mistake is one ModelError line ------------------------------------------------------


def _error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ModelError) as info:
        load_pipeline(*args, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path: Path) -> None:
    assert "no model file or folder" in _error(str(tmp_path / "nope"))
    assert "check the path" in _error("./models/does-not-exist-anywhere")


def test_hub_id_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error("someone/some-model")
    assert "HF_HUB_OFFLINE" in message and "local" in message


def test_folder_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    assert "without model_index.json" in _error(tmp_path)


def test_broken_diffusers_folder(tiny_pipeline_dir: str, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "broken")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    assert "could not load the diffusers folder" in _error(folder)


def test_lora_file_as_checkpoint(tmp_path: Path, tiny_pipeline_dir: str) -> None:
    path = tmp_path / "lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    assert "is a LoRA file" in _error(path, config=tiny_pipeline_dir)
    peft_style = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 16)}, str(peft_style))
    assert "is a LoRA file" in _error(peft_style)


def test_random_bytes_as_checkpoint(tmp_path: Path, tiny_pipeline_dir: str) -> None:
    noise = os.urandom(4096)
    for name in ("random.safetensors", "random.ckpt"):
        (tmp_path / name).write_bytes(noise)
    assert "not a readable .safetensors file" in _error(
        tmp_path / "random.safetensors", config=tiny_pipeline_dir
    )
    assert "convert it to .safetensors" in _error(tmp_path / "random.ckpt", config=tiny_pipeline_dir)


def test_file_of_the_wrong_kind(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert "expected a diffusers folder, a .safetensors file or a .ckpt file" in _error(
        tmp_path / "notes.txt"
    )


def test_component_weights_as_checkpoint(tiny_pipeline_dir: str) -> None:
    unet_file = Path(tiny_pipeline_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    assert "one diffusers component" in _error(unet_file, config=tiny_pipeline_dir)


def test_single_file_without_config(tiny_file: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(tiny_file, lonely)
    message = _error(lonely)
    assert "needs a config folder" in message and "--config DIR" in message and "recipes" in message


def test_config_that_is_not_a_diffusers_folder(tiny_file: Path, tmp_path: Path) -> None:
    assert "not a diffusers folder" in _error(tiny_file, config=str(tmp_path))


def test_config_of_another_architecture(tiny_pipeline_dir: str, tiny_file: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "wider")
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 64
    config_path.write_text(json.dumps(config))
    message = _error(tiny_file, config=str(folder))
    assert "does not match the config folder" in message and "other shapes" in message


def test_checkpoint_missing_a_component(tiny_pipeline_dir: str, tiny_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(tiny_file)).items() if not k.startswith("cond_stage_model.")}
    path = tmp_path / "no-text.safetensors"
    save_file(state, str(path))
    assert "text encoder tensors missing" in _error(path, config=tiny_pipeline_dir)


def test_safe_ckpt_loads(tiny_pipeline_dir: str, tiny_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_file))}, path)
    pipe = load_pipeline(path, config=tiny_pipeline_dir)
    reference = load_pipeline(tiny_pipeline_dir)
    ours, theirs = pipe.unet.state_dict(), reference.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_ckpt_with_pickled_code_is_refused(tmp_path: Path, tiny_pipeline_dir: str) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("/tmp")}, path)
    assert "convert it to .safetensors" in _error(path, config=tiny_pipeline_dir)
