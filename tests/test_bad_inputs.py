"""Every bad input gets one line on stderr and exit code 2, never a traceback (issue 10).

Each case runs the real command line in-process (`tune.cli.main`), which prints a `TuneError` as
`tune: error: ...` and lets anything else escape with its traceback; the test fails on the latter. The
cases are the catalogue of bad inputs tried (base models, LoRA files, photo folders, configs, output
folders, permissions).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tune import PROJECT_ROOT, cli

sys.path.insert(0, str(Path(__file__).parent / "recipes"))
from recipe_testkit import make_concept  # noqa: E402

TINY = str(PROJECT_ROOT / "recipes" / "configs" / "lora" / "tiny.toml")
ROOT = os.geteuid() == 0  # root writes through file permissions


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    concept = make_concept(root / "concept")
    (root / "empty").mkdir()
    (root / "not_images").mkdir()
    (root / "not_images" / "a.jpg").write_bytes(b"not a jpeg")
    (root / "not_images" / "b.png").write_bytes(b"\x89PNG broken")
    (root / "a_file").write_text("x")
    (root / "notes.txt").write_text("hello")
    (root / "garbage.safetensors").write_bytes(os.urandom(64))
    (root / "garbage.ckpt").write_bytes(os.urandom(64))
    (root / "bad.toml").write_text("max_steps = [1,\n")
    (root / "latin1.toml").write_bytes("instance_prompt = 'caf\xe9'\n".encode("latin-1"))
    (root / "unknown.toml").write_text("max_stpes = 3\n")
    # A LoRA file for a module the tiny U-Net has, with shapes of another architecture.
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    save_file(
        {
            f"{q}.lora_down.weight": torch.zeros(4, 320),
            f"{q}.lora_up.weight": torch.zeros(320, 4),
            f"{q}.alpha": torch.tensor(4.0),
        },
        str(root / "sd15_shapes.safetensors"),
    )
    # ...and one for SDXL's second text encoder, which SD1.x does not have.
    k = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file(
        {f"{k}.lora_down.weight": torch.zeros(4, 1280), f"{k}.lora_up.weight": torch.zeros(1280, 4)},
        str(root / "sdxl.safetensors"),
    )
    save_file({"emb_params": torch.zeros(1, 32)}, str(root / "embedding.safetensors"))
    # Non-UTF-8 captions beside photos: an error naming the file (tune.data.captions).
    shutil.copytree(concept / "photos", root / "latin1_captions")
    for photo in (root / "latin1_captions").glob("*.jpg"):
        photo.with_suffix(".txt").write_bytes("une photo de caf\xe9".encode("latin-1"))
    if not ROOT:
        (root / "locked").mkdir()
        (root / "locked").chmod(0o555)
        shutil.copytree(concept / "photos", root / "unreadable")
        (root / "unreadable").chmod(0o000)
    return {
        "root": str(root),
        "base": tiny_pipeline_dir,
        "concept": str(concept),
        "photos": str(concept / "photos"),
        "lora_unet": str(Path(tiny_pipeline_dir) / "unet" / "diffusion_pytorch_model.safetensors"),
    }


def run_args(f: dict[str, str], *extra: str) -> list[str]:
    """`tune run lora` on the tiny config with good inputs, then `extra` (later keys win)."""
    return [
        "run",
        "lora",
        "--config",
        TINY,
        f"base_model={f['base']}",
        f"concept={f['concept']}",
        f"output_dir={f['root']}/out",
        "max_steps=1",
        "sample_every=0",
        *extra,
    ]


# (case id, argv builder, a piece of the expected message)
CASES = [
    ("base missing", lambda f: run_args(f, f"base_model={f['root']}/nope"), "no model file or folder"),
    (
        "base is a folder, not a pipeline",
        lambda f: run_args(f, f"base_model={f['root']}/empty"),
        "model_index.json",
    ),
    ("base is a text file", lambda f: run_args(f, f"base_model={f['root']}/notes.txt"), "is not a model"),
    (
        "base is garbage .safetensors",
        lambda f: run_args(f, f"base_model={f['root']}/garbage.safetensors"),
        "not a readable",
    ),
    (
        "base is garbage .ckpt",
        lambda f: run_args(f, f"base_model={f['root']}/garbage.ckpt"),
        "could not read",
    ),
    (
        "base is a LoRA file",
        lambda f: run_args(f, f"base_model={f['root']}/sd15_shapes.safetensors"),
        "is a LoRA file",
    ),
    (
        "base is an embedding",
        lambda f: run_args(f, f"base_model={f['root']}/embedding.safetensors"),
        "holds no model",
    ),
    (
        "base is one component",
        lambda f: run_args(f, f"base_model={f['lora_unet']}"),
        "one diffusers component",
    ),
    ("concept missing", lambda f: run_args(f, f"concept={f['root']}/nope"), "nope"),
    (
        "photo folder missing",
        lambda f: run_args(f, "concept=", f"instance_dir={f['root']}/nope", "instance_prompt=a sks toy"),
        "nope",
    ),
    (
        "photo folder empty",
        lambda f: run_args(f, "concept=", f"instance_dir={f['root']}/empty", "instance_prompt=a sks toy"),
        "empty",
    ),
    (
        "photo folder is a file",
        lambda f: run_args(f, "concept=", f"instance_dir={f['root']}/a_file", "instance_prompt=a sks toy"),
        "a_file",
    ),
    (
        "photos not decodable",
        lambda f: run_args(
            f, "concept=", f"instance_dir={f['root']}/not_images", "instance_prompt=a sks toy"
        ),
        "not_images",
    ),
    ("config value below range", lambda f: run_args(f, "lora.rank=0"), "lora.rank"),
    ("config value of wrong type", lambda f: run_args(f, "max_steps=many"), "max_steps"),
    ("config float for int", lambda f: run_args(f, "seed=1.5"), "seed"),
    ("config bad choice", lambda f: run_args(f, "mixed_precision=fp8"), "mixed_precision"),
    ("config bad compile mode", lambda f: run_args(f, "compile_mode=fastest"), "compile_mode"),
    ("config unknown key", lambda f: run_args(f, "lora.rnak=4"), "did you mean 'lora.rank'"),
    ("config resolution not a multiple", lambda f: run_args(f, "resolution=33"), "multiple of"),
    ("config max_nonfinite_steps", lambda f: run_args(f, "max_nonfinite_steps=0"), "max_nonfinite_steps"),
    ("config negative lr", lambda f: run_args(f, "optim.lr=-1"), "lr"),
    ("config table as value", lambda f: run_args(f, "optim=3"), "optim"),
    (
        "config file malformed TOML",
        lambda f: ["run", "lora", "--config", f"{f['root']}/bad.toml"],
        "not valid TOML",
    ),
    (
        "config file not UTF-8",
        lambda f: ["run", "lora", "--config", f"{f['root']}/latin1.toml"],
        "not valid TOML",
    ),
    (
        "config file unknown key",
        lambda f: ["run", "lora", "--config", f"{f['root']}/unknown.toml"],
        "did you mean",
    ),
    ("config file missing", lambda f: ["run", "lora", "--config", f"{f['root']}/none.toml"], "not found"),
    ("resume from a missing folder", lambda f: run_args(f, f"resume={f['root']}/nope"), "resume"),
    (
        "resume from a folder that is no checkpoint",
        lambda f: run_args(f, f"resume={f['root']}/empty"),
        "not a complete checkpoint",
    ),
    ("output folder is a file", lambda f: run_args(f, f"output_dir={f['root']}/a_file"), "is a file"),
    ("output folder under a file", lambda f: run_args(f, f"output_dir={f['root']}/a_file/run"), "a_file"),
    (
        "output folder not writable (/sys)",
        lambda f: run_args(f, "output_dir=/sys/tune-test-run"),
        "/sys/tune-test-run",
    ),
    ("output folder holds files", lambda f: run_args(f, f"output_dir={f['concept']}"), "already holds files"),
    (
        "lora inspect: not a LoRA",
        lambda f: ["lora", "inspect", f"{f['root']}/garbage.safetensors"],
        "garbage",
    ),
    ("lora inspect: text file", lambda f: ["lora", "inspect", f"{f['root']}/notes.txt"], ".safetensors"),
    ("lora inspect: missing", lambda f: ["lora", "inspect", f"{f['root']}/nope.safetensors"], "not found"),
    (
        "lora merge: other architecture",
        lambda f: [
            "lora",
            "merge",
            f["base"],
            f"{f['root']}/sd15_shapes.safetensors",
            "--out",
            f"{f['root']}/m1",
        ],
        "shape",
    ),
    (
        "lora merge: SDXL LoRA into an SD1.x base",
        lambda f: ["lora", "merge", f["base"], f"{f['root']}/sdxl.safetensors", "--out", f"{f['root']}/m2"],
        "is for sdxl but the base model is stable diffusion 1.x",
    ),
    (
        "lora merge: out is a file",
        lambda f: [
            "lora",
            "merge",
            f["base"],
            f"{f['root']}/sdxl.safetensors",
            "--out",
            f"{f['root']}/a_file",
        ],
        "is a file",
    ),
    (
        "lora convert: bad scale syntax",
        lambda f: ["lora", "merge", f["base"], f"{f['root']}/sdxl.safetensors:x", "--out", f"{f['root']}/m3"],
        "sdxl",
    ),
    (
        "sample: LoRA of other architecture",
        lambda f: [
            "sample",
            "--model",
            f["base"],
            "--lora",
            f"{f['root']}/sd15_shapes.safetensors",
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            f"{f['root']}/x.png",
        ],
        "shape",
    ),
    (
        "sample: base missing",
        lambda f: ["sample", "--model", f"{f['root']}/nope", "--prompt", "x", "--out", f"{f['root']}/x.png"],
        "nope",
    ),
    ("export: not a run", lambda f: ["export", f["root"] + "/empty"], "not a tune run directory"),
    ("data check: missing folder", lambda f: ["data", "check", f"{f['root']}/nope"], "nope"),
    ("unknown recipe", lambda f: ["run", "lroa"], "did you mean 'lora'"),
    ("setting without =", lambda f: ["run", "lora", "max_steps"], "key=value"),
]
if not ROOT:
    CASES += [
        (
            "output folder not writable (chmod)",
            lambda f: run_args(f, f"output_dir={f['root']}/locked/run"),
            "permission",
        ),
        (
            "photo folder unreadable (chmod)",
            lambda f: run_args(
                f, "concept=", f"instance_dir={f['root']}/unreadable", "instance_prompt=a sks toy"
            ),
            "unreadable",
        ),
    ]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(
    files: dict[str, str], case: str, argv, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = f"{files['root']}/out"
    args = [a.replace(out, f"{out}-{case.replace(' ', '_')}") for a in argv(files)]
    code = cli.main(args)  # anything but a TuneError escapes here with its traceback
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("tune: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected.lower() in lines[0].lower(), lines[0]


def test_non_utf8_captions_are_a_one_line_error_naming_the_file(files: dict[str, str], capsys) -> None:
    folder = Path(files["root"], "latin1_captions")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cli.main(["data", "check", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not UTF-8 (byte 0xe9" in err and ".txt" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # With an instance prompt the sidecars are ignored, so they cannot stop a DreamBooth-style run.
    from tune.data.config import DataConfig
    from tune.data.sources import scan_folder

    scan = scan_folder(folder, DataConfig(resolution=64), instance_prompt="a photo of sks toy")
    assert scan.records and scan.sidecars_ignored == len(scan.records)
