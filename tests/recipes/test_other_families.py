"""The lora and dreambooth recipes on SDXL (tiny-sdxl-shallow) and SD2 (tiny-sd2) bases: a few steps,
exact resume after a crash, both SDXL text encoders, and the SDXL text conditioning itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from recipes import dreambooth, lora
from tune import PROJECT_ROOT
from tune import personalize as p
from tune.config import load_config
from tune.lora import load_lora, read_lora_file
from tune.models import build_pipeline, load_pipeline
from tune.models.conditioning import TextEncoders, add_time_ids
from tune.models.families import family_of_lora
from tune.runs import read_run
from tune.world.render import render
from tune.world.subjects import SUBJECTS

from recipe_testkit import crash_then_resume, losses, make_concept

FAMILY_ARGS = {
    "sdxl": ["resolution=64"],
    "sd2": [],
}
RECIPE_ARGS = {
    # SDXL: adapters on both text encoders too (trained, so text is encoded every step, not cached).
    ("lora", "sdxl"): ["lora.targets=['attn2', 'text_encoder']"],
    ("lora", "sd2"): [],
    # The text stays frozen and cached (hidden states + pooled embeds).
    ("dreambooth", "sdxl"): [],
    ("dreambooth", "sd2"): [],
}
RECIPES = {"lora": lora, "dreambooth": dreambooth}
CASES = sorted(RECIPE_ARGS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    class_dir = root / "class"
    class_dir.mkdir()
    for i, (w, h) in enumerate([(80, 64), (64, 72)]):  # sizes of their own, unlike the photos'
        render(SUBJECTS["sks-toy"].spec("sand"), np.random.default_rng(10 + i), w, h).save(
            class_dir / f"c{i}.png"
        )
    folders = {"concept": make_concept(root / "concept"), "cache": root / "cache", "class": class_dir}
    for family, preset in (("sdxl", "tiny-sdxl-shallow"), ("sd2", "tiny-sd2")):
        build_pipeline(preset, seed=0).save_pretrained(root / family)
        folders[family] = root / family
    return folders


def config(setup: dict, name: str, family: str, out: Path, *extra: str) -> Any:
    recipe = RECIPES[name]
    overrides = [
        f"base_model={setup[family]}",
        f"concept={setup['concept']}",
        f"output_dir={out}",
        f"data.cache_dir={setup['cache']}",
        *FAMILY_ARGS[family],
        *RECIPE_ARGS[(name, family)],
        *([f"prior.class_dir={setup['class']}"] if name == "dreambooth" else []),
        *extra,
    ]
    return load_config(recipe.Config, PROJECT_ROOT / "recipes" / "configs" / name / "tiny.toml", overrides)


RUNS: dict[tuple[str, str], Path] = {}


@pytest.fixture
def first_run(setup: dict, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """One uninterrupted run per (recipe, family), made once per module."""
    case = request.param
    if case not in RUNS:
        out = tmp_path_factory.mktemp("runs") / "-".join(case)
        RUNS[case] = RECIPES[case[0]].main(config(setup, *case, out)).path
    return RUNS[case]


@pytest.mark.parametrize(("case", "first_run"), [(c, c) for c in CASES], indirect=["first_run"])
def test_runs_and_resumes_exactly(
    case: tuple[str, str], first_run: Path, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, family = case
    assert sorted(losses(first_run)) == [1, 2, 3, 4] and all(np.isfinite(list(losses(first_run).values())))
    left, resumed = crash_then_resume(
        RECIPES[name],
        monkeypatch,
        lambda out, *extra: config(setup, name, family, out, *extra),
        tmp_path / "r",
    )
    assert left == [2]
    assert losses(resumed.path) == losses(first_run)  # steps 1-2 before the crash, 3-4 after the resume
    final = Path("checkpoints") / "step_000004"
    files = sorted(p.name for p in (first_run / final).glob("*.safetensors"))
    assert "trainable_0.safetensors" in files or "model.safetensors" in files  # the trained weights
    for file in files:
        whole, parts = (load_file(str(run / final / file)) for run in (first_run, resumed.path))
        assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    assert read_run(resumed.path).info["cache"]["latent"]["encoded"] == 0  # the first run's latents
    assert read_run(first_run).info["base_family"] == family
    for run in (first_run, resumed.path):
        assert read_run(run).status == "done"
        assert sorted(p.name for p in (run / "samples").iterdir()) == [
            "step_000000",
            "step_000002",
            "step_000004",
        ]


@pytest.mark.parametrize("first_run", [("lora", "sdxl")], indirect=True)
def test_sdxl_lora_trains_both_text_encoders(first_run: Path, setup: dict) -> None:
    trained = load_file(str(first_run / "checkpoints" / "step_000004" / "lora.safetensors"))
    components = {k.split(".", 1)[0] for k in trained}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    base = load_pipeline(str(setup["sdxl"]))
    te2_layers = base.text_encoder_2.config.num_hidden_layers
    te2_keys = [k for k in trained if k.startswith("text_encoder_2.")]
    assert len(te2_keys) == 2 * 6 * te2_layers  # lora_A/B on q, k, v, out_proj, fc1, fc2 of every layer
    # The shipped diffusers file moves the U-Net and both text encoders of a plain diffusers SDXL pipeline.
    export = first_run / "export" / "pytorch_lora_weights.safetensors"
    assert {k.split(".", 1)[0] for k in load_file(str(export))} == components
    pipe = StableDiffusionXLPipeline.from_pretrained(setup["sdxl"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 40, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = tokenize(pipe.tokenizer, ["a photo of sks toy"]), tokenize(pipe.tokenizer_2, ["a photo of sks toy"])

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            unet = pipe.unet(latents, 500, hidden, added_cond_kwargs=added).sample
            return [unet, pipe.text_encoder(ids[0])[0], pipe.text_encoder_2(ids[1]).text_embeds]

    before = outputs()
    pipe.load_lora_weights(str(export.parent), weight_name=export.name)
    assert all(not torch.equal(a, b) for a, b in zip(outputs(), before, strict=True))


@pytest.mark.parametrize("first_run", [("lora", "sdxl")], indirect=True)
def test_sdxl_kohya_export(first_run: Path) -> None:
    tensors = load_file(str(first_run / "export" / f"{first_run.name}.safetensors"))
    stems = {k.split(".", 1)[0] for k in tensors}
    assert any(s.startswith("lora_unet_input_blocks_") for s in stems)  # SGM U-Net names
    assert any(s.startswith("lora_te1_text_model_encoder_layers_") for s in stems)
    assert any(s.startswith("lora_te2_text_model_encoder_layers_") for s in stems)
    assert (
        family_of_lora(tensors, read_lora_file(first_run / "export" / f"{first_run.name}.safetensors")[1])
        == "sdxl"
    )


@pytest.mark.parametrize(
    ("family", "first_run"), [(f, ("dreambooth", f)) for f in ("sdxl", "sd2")], indirect=["first_run"]
)
def test_dreambooth_exports_a_pipeline_of_the_base_family(
    family: str, first_run: Path, setup: dict, tmp_path: Path
) -> None:
    base = load_pipeline(str(setup[family]))
    pipe = load_pipeline(str(first_run / "export" / "pipeline"))
    assert type(pipe) is type(base)
    assert read_run(first_run).info["class_images"] == 2
    base_unet = base.unet.state_dict()
    assert any(not torch.equal(q, base_unet[n]) for n, q in pipe.unet.state_dict().items())  # it trained
    for name in ("text_encoder", "text_encoder_2"):  # frozen ones are exported as they were
        if getattr(base, name, None) is not None:
            ours, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    single = first_run / "export" / f"{first_run.name}.safetensors"  # the single file A1111 and ComfyUI load
    assert load_pipeline(
        str(single), config=str(first_run / "export" / "pipeline")
    ).unet.state_dict().keys() == (pipe.unet.state_dict().keys())
    # The fine-tune as a LoRA (SVD): a file of the base's family, every U-Net transformer module in it.
    lora_file = first_run / "export" / f"{first_run.name}_lora.safetensors"
    tensors, metadata = read_lora_file(lora_file)
    assert family_of_lora(tensors, metadata) == family
    transformer = {
        f"unet.{name}"
        for name, module in base.unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and ".attentions." in name
    }
    assert set(load_lora(lora_file, base).modules) == transformer


def test_sdxl_pivotal_tuning_trains_the_token_in_both_encoders(setup: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "p"
    cfg = config(setup, "lora", "sdxl", run_dir, "max_steps=3", "pivotal.enabled=true", "pivotal.lr=1e-2")
    lora.main(cfg)
    base = load_pipeline(setup["sdxl"])
    embeds = load_file(str(run_dir / "export" / "learned_embeds.safetensors"))
    assert sorted(embeds) == ["clip_g", "clip_l"]
    assert embeds["clip_l"].shape == (1, base.text_encoder.config.hidden_size)
    assert embeds["clip_g"].shape == (1, base.text_encoder_2.config.hidden_size)
    # Each encoder's row moved away from its initializer's ("toy"), which both tokenizers know.
    for key, tokenizer, encoder in (
        ("clip_l", base.tokenizer, base.text_encoder),
        ("clip_g", base.tokenizer_2, base.text_encoder_2),
    ):
        [toy] = tokenizer("toy", add_special_tokens=False).input_ids
        start = encoder.get_input_embeddings().weight[toy].float()
        assert not torch.allclose(embeds[key][0].float(), start, atol=1e-4)
    assert (run_dir / "DONE").exists()


# ------------------------------------------------------------------------------ text conditioning


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def test_sdxl_text_conditioning_equals_the_pipeline() -> None:
    pipe = build_pipeline("tiny-sdxl-shallow", seed=0)
    prompts = ["a photo of sks toy", "a red ball on sand"]
    with torch.no_grad():
        want_hidden, _, want_pooled, _ = pipe.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=False
        )
        hidden, pooled = TextEncoders.of(pipe)(
            tokenize(pipe.tokenizer, prompts), tokenize(pipe.tokenizer_2, prompts)
        )
    assert torch.equal(hidden, want_hidden) and torch.equal(pooled, want_pooled)


def test_pooled_embeds_stay_at_the_first_end_of_text_token() -> None:
    # A legacy te2 config (eos_token_id 2) makes transformers pool at the highest id, i.e. at an added
    # token; ours stays at the end-of-text token.
    pipe = build_pipeline("tiny-sdxl-shallow", seed=0)
    ids = tokenize(pipe.tokenizer_2, ["a photo of sks toy"])
    vocab = pipe.text_encoder_2.get_input_embeddings().num_embeddings
    pipe.text_encoder_2.resize_token_embeddings(vocab + 1)
    ids[0, 2] = vocab  # a new token: an id above end-of-text's, as TI and pivotal tuning add
    with torch.no_grad():
        _, expected = TextEncoders.of(pipe)(tokenize(pipe.tokenizer, ["a photo of sks toy"]), ids)
        pipe.text_encoder_2.text_model.eos_token_id = 2
        _, pooled = TextEncoders.of(pipe)(tokenize(pipe.tokenizer, ["a photo of sks toy"]), ids)
        legacy = pipe.text_encoder_2(ids).text_embeds
    assert torch.equal(pooled, expected) and not torch.allclose(legacy, expected)


def test_add_time_ids_are_size_crop_target_per_image() -> None:
    time_ids = add_time_ids(torch.tensor([[480, 640], [64, 64]]), torch.tensor([[0, 16], [4, 0]]), (64, 96))
    assert time_ids.dtype == torch.float32
    assert time_ids.tolist() == [[480, 640, 0, 16, 64, 96], [64, 64, 4, 0, 64, 96]]


def test_sdxl_dreambooth_trains_both_text_encoders(setup: dict, tmp_path: Path) -> None:
    cfg = config(setup, "dreambooth", "sdxl", tmp_path / "te", "train_text_encoder=true", "max_steps=2")
    pipe = load_pipeline(str(dreambooth.main(cfg).path / "export" / "pipeline"))
    base = load_pipeline(str(setup["sdxl"]))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert any(not torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_sdxl_vae_stays_fp32_under_fp16_when_its_config_says_force_upcast() -> None:
    sdxl, sd1 = build_pipeline("tiny-sdxl-shallow"), build_pipeline("tiny")
    assert sdxl.vae.config.force_upcast and p.vae_dtype(sdxl, torch.float16) == torch.float32
    assert p.vae_dtype(sdxl, torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range
    assert sd1.vae.config.force_upcast and p.vae_dtype(sd1, torch.float16) == torch.float16  # as before


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_validation_loss_and_schedule_free_on_other_families(
    setup: dict, tmp_path: Path, family: str
) -> None:
    extra = ("val_every=2", "sample_every=0", "optim.name=adamw_schedulefree", "max_steps=2")
    run = read_run(lora.main(config(setup, "lora", family, tmp_path / "r", *extra)).path)
    rows = [m for m in run.metrics if "val_loss" in m]
    assert [m["step"] for m in rows] == [0, 2] and all(np.isfinite(m["val_loss"]) for m in rows)
    assert run.info["photos"] == 3 and run.status == "done"
