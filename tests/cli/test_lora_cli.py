"""`tune export` and `tune lora inspect | convert | merge | extract | resize`: output, files, and one-line
errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tune import lora as lora_io
from tune.cli import main
from tune.models import load_pipeline
from tune.runs import RunDir

TARGETS = {
    "unet.down_blocks.0.attentions.0.proj_in": (4, 2.0),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, 8.0),
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2": (8, 2.0),
    "unet.down_blocks.1.resnets.0.conv1": (2, 2.0),
    "text_encoder.encoder.layers.0.self_attn.q_proj": (4, 1.0),
    "text_encoder.encoder.layers.1.mlp.fc1": (2, 2.0),
}


@pytest.fixture(scope="module")
def small_lora(tiny_pipeline_dir: str) -> lora_io.Lora:
    """Seven modules of the tiny pipeline, random weights, mixed ranks and alphas."""
    pipe = load_pipeline(tiny_pipeline_dir)
    torch.manual_seed(0)
    modules = {}
    for target, (rank, alpha) in TARGETS.items():
        component, path = target.split(".", 1)
        shape = getattr(pipe, component).get_submodule(path).weight.shape
        down = torch.randn(rank, *shape[1:]) * 0.1
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else [])) * 0.1
        modules[target] = lora_io.LoraModule(down=down, up=up, alpha=alpha)
    return lora_io.Lora(modules=modules, formats=frozenset({"peft"}))


@pytest.fixture(scope="module")
def files(small_lora: lora_io.Lora, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    paths = {
        "kohya": lora_io.save_lora(small_lora, folder / "style.safetensors", "kohya"),
        "diffusers": lora_io.save_lora(small_lora, folder / "pytorch_lora_weights.safetensors", "diffusers"),
    }
    sdxl = {}
    for i in range(2):  # SDXL's input_blocks.4.1 is two transformer blocks deep
        for stem in (
            f"lora_unet_input_blocks_4_1_transformer_blocks_{i}_attn1_to_q",
            f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1",
        ):
            sdxl |= {
                f"{stem}.lora_down.weight": torch.zeros(4, 64),
                f"{stem}.lora_up.weight": torch.zeros(64, 4),
                f"{stem}.alpha": torch.tensor(4.0),
            }
    save_file(sdxl, folder / "sdxl.safetensors")
    paths["sdxl"] = folder / "sdxl.safetensors"
    lycoris = {
        "lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4),
        "lora_unet_conv_in.hada_w1_b": torch.zeros(4, 4),
    }
    save_file(lycoris, folder / "loha.safetensors")
    paths["loha"] = folder / "loha.safetensors"
    sd2 = {k: v.half() for k, v in lora_io.to_kohya_state_dict(small_lora)[0].items()}
    save_file(sd2, folder / "sd2.safetensors", metadata={"ss_v2": "True", "ss_base_model_version": "sd_v2"})
    paths["sd2"] = folder / "sd2.safetensors"
    (folder / "notes.txt").write_text("not a LoRA")
    paths["txt"] = folder / "notes.txt"
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    paths["garbage"] = folder / "garbage.safetensors"
    return paths


@pytest.fixture(scope="module")
def run_dir(small_lora: lora_io.Lora, tiny_pipeline_dir: str, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "toy"
    run = RunDir.create(path, "lora", f'base_model = "{tiny_pipeline_dir}"\ntrigger = "sks"\n')
    run.update_info(base_model=tiny_pipeline_dir, trigger="sks")
    lora_io.save_lora(small_lora, lora_io.checkpoint_adapter_path(path, 5), "diffusers", dtype=torch.float32)
    run.mark_checkpoint_complete(5)
    lora_io.save_lora(small_lora, lora_io.checkpoint_adapter_path(path, 9), "diffusers")  # never COMPLETE
    lora_io.save_lora(small_lora, lora_io.final_adapter_path(path), "diffusers", dtype=torch.float32)
    run.finish()
    return path


@pytest.fixture(scope="module")
def tuned_dir(tiny_pipeline_dir: str, tmp_path_factory) -> Path:
    """The tiny base with a rank-3 change in every attention projection (a stand-in fine-tune)."""
    pipe = load_pipeline(tiny_pipeline_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in pipe.unet.named_modules():
            if name.endswith(("to_q", "to_k", "to_v")):
                out, width = layer.weight.shape
                layer.weight += (
                    0.05
                    * torch.randn(out, 3, generator=generator)
                    @ torch.randn(3, width, generator=generator)
                )
    path = tmp_path_factory.mktemp("tuned") / "model"
    pipe.save_pretrained(path)
    return path


def tune(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------


def test_inspect_prints_the_figures(files: dict[str, Path], capsys) -> None:
    code, out, err = tune(capsys, "lora", "inspect", str(files["kohya"]))
    assert code == 0, err
    assert "format:        kohya (21 tensors, float16)" in out
    assert "architecture:  SD1.x topology, cross-attention width 32" in out
    assert "modules:       7 (text_encoder 2, unet 5)" in out
    rows = {
        line.split()[1]: line.split()[2:]
        for line in out.splitlines()
        if line.strip().startswith(("unet ", "text_encoder "))
    }
    # One alpha in a kohya file (2, the most common); the others' scales are folded into their up weights.
    assert rows["attn2"] == ["1", "4", "2", "0.5"]
    assert rows["resnets"] == ["1", "2", "2", "1"]
    assert rows["ff"] == ["1", "8", "2", "0.25"]
    assert "targets:       unet: attn1.to_q, attn2.to_k, conv1, ff.net.2, proj_in" in out
    assert "targets:       text_encoder: mlp.fc1, self_attn.q_proj" in out
    assert f"sshs hash:     ok {lora_io.safetensors_data_hash(files['kohya'])}" in out
    assert "  ss_network_alpha = 2.0" in out and "  ss_output_name = style" in out

    code, out, _ = tune(capsys, "lora", "inspect", str(files["diffusers"]))
    assert code == 0 and "format:        diffusers (14 tensors, float16)" in out
    assert "lora_adapter_metadata = <" in out and "A1111 loads none of them" in out


def test_inspect_flags_a_wrong_hash_and_foreign_files(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    with safe_open(str(files["kohya"]), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file(tensors, tmp_path / "tampered.safetensors", metadata={**metadata, "sshs_model_hash": "0" * 64})
    code, out, _ = tune(capsys, "lora", "inspect", str(tmp_path / "tampered.safetensors"))
    assert code == 1 and "sshs hash:     MISMATCH: metadata says 0000" in out

    code, out, _ = tune(capsys, "lora", "inspect", str(files["sdxl"]))
    assert code == 0 and "architecture:  SDXL (no cross-attention module" in out
    assert "modules:       4 (text_encoder_2 2, unet 2)" in out and "text_encoder_2 mlp" in out
    assert "sshs hash:     not recorded" in out
    code, out, _ = tune(capsys, "lora", "inspect", str(files["loha"]))
    assert code == 0 and "architecture:  unreadable:" in out
    assert "lora_unet_conv_in is a LoHa module without hada_w2_a, hada_w2_b" in out

    # A kohya file as naive exporters write it: each attention module with its own alpha.
    naive = {}
    for target in [t for t in TARGETS if ".attn" in t]:
        rank, alpha = TARGETS[target]
        stem = lora_io.kohya_stem(target)
        naive[f"{stem}.lora_down.weight"] = torch.ones(rank, 32)
        naive[f"{stem}.lora_up.weight"] = torch.ones(32, rank)
        naive[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(naive, tmp_path / "naive.safetensors")
    code, out, _ = tune(capsys, "lora", "inspect", str(tmp_path / "naive.safetensors"))
    out = " ".join(out.split())  # notes are wrapped
    assert code == 0 and "diffusers loads them at the wrong scale" in out


# ---------------------------------------------------------------------------------------------------
# export, convert, merge: files
# ---------------------------------------------------------------------------------------------------


def test_export_refuses_to_overwrite_unless_forced(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "toy.safetensors"
    code, printed, _ = tune(capsys, "export", str(run_dir), "--out", str(out), "--dtype", "bf16")
    assert code == 0 and printed.strip() == str(out)
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.bfloat16
        assert f.metadata()["modelspec.trigger_phrase"] == "sks"
    before = out.read_bytes()
    code, _, err = tune(capsys, "export", str(run_dir), "--out", str(out))
    assert code == 2 and "exists; pass --force to overwrite it" in err and out.read_bytes() == before
    code, _, _ = tune(capsys, "export", str(run_dir), "--out", str(out), "--force", "--step", "5")
    assert code == 0 and out.read_bytes() != before


def test_merge_to_a_single_file_equals_applying_the_lora(
    files: dict[str, Path], tiny_pipeline_dir: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "merged.safetensors"
    code, _, err = tune(
        capsys,
        "lora",
        "merge",
        tiny_pipeline_dir,
        f"{files['kohya']}:0.5",
        "--out",
        str(out),
        "--dtype",
        "fp32",
    )
    assert code == 0, err
    merged = load_pipeline(out, config=tiny_pipeline_dir)
    expected = load_pipeline(tiny_pipeline_dir)
    lora_io.apply_loras(expected, [(files["kohya"], 0.5)])
    for component in ("unet", "text_encoder"):
        ours = dict(getattr(merged, component).named_parameters())
        for name, param in getattr(expected, component).named_parameters():
            assert torch.equal(ours[name], param), name


def test_extract_and_resize_print_their_errors(
    tuned_dir: Path, tiny_pipeline_dir: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "extracted.safetensors"
    argv = ["lora", "extract", str(tuned_dir), "--base", tiny_pipeline_dir, "--rank", "3", "--out", str(out)]
    code, printed, err = tune(capsys, *argv)
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[0] == f"{out}: 96 modules"  # to_q, to_k, to_v of attn1 and attn2 in 16 blocks
    errors = {line.split(" relative error ")[0].strip(): float(line.split()[-1]) for line in lines[1:]}
    assert list(errors) == ["unet attn1", "unet attn2", "overall"]
    assert all(value < 2e-3 for value in errors.values())  # rank 3 of a rank-3 change, in fp16
    code, _, err = tune(capsys, *argv)
    assert code == 2 and "exists; pass --force" in err

    resized = tmp_path / "r1.safetensors"
    code, printed, err = tune(capsys, "lora", "resize", str(out), "--rank", "1", "--out", str(resized))
    assert code == 0, err
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith("unet.")]
    assert len(rows) == 96 and {row[2] for row in rows} == {"1"}
    assert all(0.1 < float(row[-1]) < 1 for row in rows)
    assert "overall" in printed.splitlines()[-1]
    code, printed, _ = tune(
        capsys, "lora", "resize", str(out), "--energy", "1", "--out", str(tmp_path / "all.safetensors")
    )
    assert code == 0 and {
        line.split()[2] for line in printed.splitlines() if line.strip().startswith("unet.")
    } == {"3"}


# ---------------------------------------------------------------------------------------------------
# Every user error: exit 2, one line, no traceback
# ---------------------------------------------------------------------------------------------------

ERRORS = [
    (["export", "{tmp}/nowhere"], "is not a tune run directory"),
    (["export", "{empty_run}"], "has no trained LoRA adapter yet"),
    (["export", "{run}", "--step", "7"], "checkpoint step 7 of"),
    (["export", "{run}", "--step", "9"], "is not complete; steps with an adapter: 5"),
    (["export", "{run}", "--step", "-1"], "--step must be >= 0"),
    (["export", "{run}", "--out", "{tmp}/x.pt"], "--out must name a .safetensors file"),
    (["export", "{run}", "--out", "{tmp}"], "is a folder; name a .safetensors file"),
    (["export", "{run}", "--format", "onnx"], "'onnx'"),
    (["export", "{run}", "--dtype", "fp8"], "'fp8'"),
    (["export"], "required: RUN_DIR"),
    (["lora", "inspect", "{tmp}/missing.safetensors"], "LoRA file not found"),
    (["lora", "inspect", "{txt}"], "LoRA files must be .safetensors"),
    (["lora", "inspect", "{garbage}"], "cannot read LoRA file"),
    (["lora", "inspekt", "{kohya}"], "unknown command 'inspekt' (did you mean 'inspect'?)"),
    (["lora", "convert", "{kohya}"], "required: --to"),
    (["lora", "convert", "{tmp}/missing.safetensors", "--to", "kohya"], "LoRA file not found"),
    (
        ["lora", "convert", "{loha}", "--to", "diffusers"],
        "lora_unet_conv_in is a LoHa module without hada_w2_a",
    ),
    (
        ["lora", "merge", "{base}", "{sd2}", "--out", "{tmp}/m"],
        "is for Stable Diffusion 2.x but the base model is Stable Diffusion 1.x",
    ),
    (
        ["lora", "convert", "{kohya}", "--to", "diffusers", "--out", "{kohya}"],
        "exists (the file being read); pass --force",
    ),
    (["lora", "merge", "{tmp}/nobase", "{kohya}", "--out", "{tmp}/m"], "no model file or folder"),
    (["lora", "merge", "{base}", "{tmp}/none.safetensors", "--out", "{tmp}/m"], "LoRA file not found"),
    (["lora", "merge", "{base}", "{kohya}:loud", "--out", "{tmp}/m"], "SCALE must be a number"),
    (
        ["lora", "merge", "{base}", "{sdxl}", "--out", "{tmp}/m"],
        "is for SDXL but the base model is Stable Diffusion 1.x",
    ),
    (
        ["lora", "merge", "{base}", "{kohya}", "--out", "{base}"],
        "is the base model; write the merged model elsewhere",
    ),
    (
        ["lora", "merge", "{base}", "{kohya}", "--out", "{tmp}/m.ckpt"],
        "--out must be a folder or a .safetensors file",
    ),
    (["lora", "merge", "{base}", "{kohya}", "--out", "{run}"], "exists; pass --force"),
    (["lora", "merge", "{base}", "{kohya}"], "required: --out"),
    (["lora", "extract", "{tuned}", "--rank", "4", "--out", "{tmp}/e.safetensors"], "--base is required"),
    (["lora", "extract", "{tuned}", "--base", "{base}", "--out", "{tmp}/e.safetensors"], "required: --rank"),
    (
        ["lora", "extract", "{tuned}", "--base", "{base}", "--rank", "0", "--out", "{tmp}/e.safetensors"],
        "--rank must be >= 1",
    ),
    (
        ["lora", "extract", "{tuned}", "--base", "{base}", "--rank", "4", "--out", "{tmp}/e.pt"],
        "--out must name a .safetensors file",
    ),
    (["lora", "extract", "{run}", "--rank", "4", "--out", "{tmp}/e.safetensors"], "has no exported model"),
    (
        ["lora", "extract", "{base}", "--base", "{base}", "--rank", "4", "--out", "{tmp}/e.safetensors"],
        "equal the base's in every extracted module",
    ),
    (
        ["lora", "extract", "{tmp}/none", "--base", "{base}", "--rank", "4", "--out", "{tmp}/e.safetensors"],
        "no model file or folder",
    ),
    (["lora", "resize", "{kohya}", "--out", "{tmp}/r.safetensors"], "one of the arguments --rank --energy"),
    (
        ["lora", "resize", "{kohya}", "--rank", "2", "--energy", "0.5", "--out", "{tmp}/r.safetensors"],
        "not allowed with argument",
    ),
    (
        ["lora", "resize", "{kohya}", "--energy", "1.5", "--out", "{tmp}/r.safetensors"],
        "--energy must be in (0, 1]",
    ),
    (["lora", "resize", "{kohya}", "--rank", "0", "--out", "{tmp}/r.safetensors"], "--rank must be >= 1"),
    (
        ["lora", "resize", "{loha}", "--rank", "2", "--out", "{tmp}/r.safetensors"],
        "lora_unet_conv_in is a LoHa module without hada_w2_a",
    ),
    (["lora", "resize", "{kohya}", "--rank", "2", "--out", "{kohya}"], "exists (the file being read)"),
]


@pytest.mark.parametrize(
    "argv, message", ERRORS, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(ERRORS)]
)
def test_user_errors_exit_2_with_one_line(
    argv: list[str],
    message: str,
    files: dict[str, Path],
    run_dir: Path,
    tiny_pipeline_dir: str,
    tuned_dir: Path,
    tmp_path: Path,
    capsys,
) -> None:
    empty_run = tmp_path / "empty-run"
    RunDir.create(empty_run, "lora", "seed = 0\n").finish()
    names = {k: str(v) for k, v in files.items()} | {
        "tmp": str(tmp_path), "run": str(run_dir), "empty_run": str(empty_run), "base": tiny_pipeline_dir,
        "tuned": str(tuned_dir),
    }  # fmt: skip
    code, out, err = tune(capsys, *(arg.format(**names) for arg in argv))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune: error: ") and "Traceback" not in err, err
    assert message.format(**names) in lines[0]
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob("[er].safetensors"))


def test_sd2_file_inspects_and_converts_as_sd2(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    code, out, _ = tune(capsys, "lora", "inspect", str(files["sd2"]))
    assert code == 0 and "architecture:  SD2.x topology, cross-attention width 32; declared sd_v2" in out
    out_file = tmp_path / "sd2_kohya.safetensors"
    code, _, err = tune(capsys, "lora", "convert", str(files["sd2"]), "--to", "kohya", "--out", str(out_file))
    assert code == 0, err
    with safe_open(str(out_file), framework="pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["ss_base_model_version"] == "sd_v2" and metadata["ss_v2"] == "True"
    # q_proj alone in the source: k, v and out_proj are written too (zero), as A1111 needs all four.
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"lora_te_text_model_encoder_layers_0_self_attn_{proj}.lora_down.weight" in keys
