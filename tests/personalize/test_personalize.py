"""The personalization recipes' shared orchestration (tune.personalize) and class-image cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune import personalize as p
from tune.config import load_config
from tune.data.class_images import generate_class_images
from tune.errors import ConfigError, DataError, ModelError, TuneError
from tune.models import load_pipeline
from tune.training import build_accelerator

CONCEPT = """token = "zwx"
class_word = "dog"
instance_prompt = "a photo of {token} {class}"
validation_prompts = ["a {token} {class} on a beach", "a photo of {class}"]

[prior_preservation]
enabled = true
num_class_images = 7
prior_loss_weight = 0.5
"""


@pytest.fixture
def concept(tmp_path: Path) -> Path:
    (tmp_path / "dog" / "photos").mkdir(parents=True)
    (tmp_path / "dog" / "concept.toml").write_text(CONCEPT)
    return tmp_path / "dog"


def cfg(*overrides: str) -> p.PersonalizeConfig:
    return load_config(p.PersonalizeConfig, None, list(overrides))


def test_subject_from_a_concept_and_explicit_keys(concept: Path, tmp_path: Path) -> None:
    subject = p.resolve_subject(cfg(f"concept={concept}"))
    assert (subject.instance_prompt, subject.class_prompt, subject.token) == (
        "a photo of zwx dog",
        "a photo of dog",
        "zwx",
    )
    assert subject.photos == concept.resolve() / "photos"
    assert subject.validation_prompts == ("a zwx dog on a beach", "a photo of dog")
    other = tmp_path / "other"
    other.mkdir()
    # Keys given explicitly win over the concept's.
    mixed = p.resolve_subject(cfg(f"concept={concept}", f"instance_dir={other}", "instance_prompt=a zwx dog"))
    assert (mixed.photos, mixed.instance_prompt, mixed.token) == (other, "a zwx dog", "zwx")
    assert p.validation_prompts(mixed, p.SampleConfig(prompts=("{token} {class} in snow",))) == [
        "zwx dog in snow"
    ]
    plain = p.resolve_subject(cfg(f"instance_dir={other}", "instance_prompt=a photo of sks cat"))
    # The trigger word comes from the instance prompt.
    assert (plain.class_prompt, plain.token, plain.concept) == ("", "sks", None)
    assert p.validation_prompts(plain, p.SampleConfig()) == ["a photo of sks cat"]


def test_subject_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="instance_dir is required"):
        p.resolve_subject(cfg())
    with pytest.raises(ConfigError, match="instance_prompt is required"):
        p.resolve_subject(cfg(f"instance_dir={tmp_path}"))
    with pytest.raises(DataError, match="is not a folder"):
        p.resolve_subject(cfg(f"instance_dir={tmp_path / 'nope'}", "instance_prompt=a photo of sks cat"))
    with pytest.raises(ConfigError, match="no concept file"):
        p.resolve_subject(cfg(f"concept={tmp_path}"))


def test_prior_follows_the_concept_unless_set(concept: Path, tmp_path: Path) -> None:
    subject = p.resolve_subject(cfg(f"concept={concept}"))
    assert p.resolve_prior(p.PriorConfig(), subject) == p.Prior("a photo of dog", 7, 0.5, None)
    assert p.resolve_prior(p.PriorConfig(enabled=False), subject) is None
    custom = p.resolve_prior(
        p.PriorConfig(num_class_images=3, loss_weight=1.0, class_dir=str(tmp_path)), subject
    )
    assert custom == p.Prior("a photo of dog", 3, 1.0, tmp_path)
    # Without a concept: on exactly when a class prompt is given.
    photos = [f"instance_dir={tmp_path}", "instance_prompt=a photo of sks cat"]
    assert p.resolve_prior(p.PriorConfig(), p.resolve_subject(cfg(*photos))) is None
    with_class = p.resolve_subject(cfg(*photos, "class_prompt=a photo of cat"))
    assert p.resolve_prior(p.PriorConfig(), with_class) == p.Prior("a photo of cat", 100, 1.0, None)
    with pytest.raises(ConfigError, match="needs a class prompt"):
        p.resolve_prior(p.PriorConfig(enabled=True), p.resolve_subject(cfg(*photos)))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="max_steps must be >= 1"):
        cfg("max_steps=0")
    with pytest.raises(ConfigError, match="sample.scheduler"):
        cfg("sample.scheduler=fastest")
    with pytest.raises(ConfigError, match="did you mean 'sample.seeds'"):
        cfg("sample.seed=1")
    assert p.resolve_mixed_precision("fp16") == "fp16"
    if not torch.cuda.is_available():
        assert p.resolve_mixed_precision("auto") == "no"  # CPUs train in fp32
    assert [p.is_due(s, 2, 5) for s in range(1, 6)] == [False, True, False, True, True]
    assert not p.is_due(5, 0, 5)  # 0 turns a periodic action off


def test_missing_default_base_model_says_how_to_get_one(tmp_path: Path, monkeypatch) -> None:
    import tune.models

    monkeypatch.setattr(tune.models, "resolve_model_path", lambda name: tmp_path / "deleted")
    with pytest.raises(
        ModelError, match="is missing from the clone .*; restore it.*make base.*base_model=PATH"
    ):
        p.load_base(p.DEFAULT_BASE_MODEL)


def test_report_to_needs_its_package(tmp_path: Path) -> None:
    assert p.build_trackers("none", None) is None  # type: ignore[arg-type]
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        p.build_trackers("tensorboard", None)  # type: ignore[arg-type]


class TwoPart(torch.nn.Module):
    """A frozen 'base' and a small trainable part, like a LoRA-injected model."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(8, 8)
        self.adapter = torch.nn.Linear(8, 2)
        self.base.requires_grad_(False)


def test_checkpoints_hold_only_trainable_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    accelerator = build_accelerator()
    model = accelerator.prepare(TwoPart())
    p.checkpoint_trainable_only(accelerator)
    accelerator.save_state(str(tmp_path / "step_000001"))
    files = sorted(f.name for f in (tmp_path / "step_000001").iterdir())
    assert files == ["random_states_0.pkl", "trainable_0.safetensors"]  # no copy of the frozen base
    saved = model.adapter.weight.detach().clone()
    base = model.base.weight.detach().clone()
    with torch.no_grad():
        model.adapter.weight.zero_()
    accelerator.load_state(str(tmp_path / "step_000001"))
    assert torch.equal(model.adapter.weight, saved) and torch.equal(model.base.weight, base)
    model.base.requires_grad_(True)  # another trainable set than the checkpoint's
    with pytest.raises(TuneError, match="trained other weights"):
        accelerator.load_state(str(tmp_path / "step_000001"))


def test_class_prompts_follow_the_photos_captions(concept: Path) -> None:
    photos = concept / "photos"
    for name, caption in (
        ("a", "a photo of zwx dog on grass"),
        ("b", "A photo of zwx dog on grass"),
        ("c", None),
    ):
        Image.new("RGB", (8, 8)).save(photos / f"{name}.png")
        if caption:
            (photos / f"{name}.txt").write_text(caption)
    (photos / "d.png").write_bytes((photos / "c.png").read_bytes())
    (photos / "d.txt").write_text("my dog on sand")  # says nothing of the prompt: not a caption of ours
    subject = p.resolve_subject(cfg(f"concept={concept}"))
    prior = p.resolve_prior(p.PriorConfig(from_captions=True), subject)
    assert prior is not None and prior.prompts == ("a photo of dog", "a photo of dog on grass")
    assert p.resolve_prior(p.PriorConfig(), subject).prompts == ()  # off by default
    for f in photos.glob("*.txt"):
        f.unlink()
    assert (
        p.resolve_prior(p.PriorConfig(from_captions=True), subject).prompts == ()
    )  # no captions: the class prompt


def test_class_prompts_follow_the_validation_prompts(concept: Path) -> None:
    subject = p.resolve_subject(cfg(f"concept={concept}"))
    validation = p.validation_prompts(subject, p.SampleConfig())
    assert validation == ["a zwx dog on a beach", "a photo of dog"]
    prior = p.resolve_prior(p.PriorConfig(from_prompts=True), subject, validation)
    assert prior is not None and prior.prompts == (
        "a photo of dog",
        "a dog on a beach",
    )  # trigger out, once each
    assert p.resolve_prior(p.PriorConfig(), subject, validation).prompts == ()  # off by default
    only_class = p.resolve_prior(p.PriorConfig(from_prompts=True), subject, ["a photo of zwx dog"])
    assert only_class.prompts == ()  # the class prompt alone keeps its cache key
    assert p.without_trigger("a pencil sketch of zwx, dog", "zwx") == "a pencil sketch of dog"


def test_class_images_of_several_prompts_carry_their_captions(tiny_pipeline_dir: str, tmp_path: Path) -> None:
    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(base_hash="ab" * 32, seed=0, steps=1, batch_size=2, cache_dir=tmp_path)
    prompts = ["a photo of toy", "a photo of toy on grass"]
    made = generate_class_images(pipe, prompts, 3, **kwargs)
    captions = [(made.folder / f"s{i}.txt").read_text() for i in range(3)]
    assert captions == [prompts[0], prompts[1], prompts[0]]  # in turn
    alone = generate_class_images(pipe, prompts[1], 1, **{**kwargs, "seed": 1})
    pair = [np.asarray(Image.open(f / "s1.png")).astype(int) for f in (made.folder, alone.folder)]
    assert np.abs(pair[0] - pair[1]).max() <= 1  # seed 1 drew its own prompt (batching moves the last bit)
    assert not list(alone.folder.glob("*.txt"))  # one prompt: no sidecars, and the cache key of before
    assert generate_class_images(pipe, [prompts[1]], 1, **{**kwargs, "seed": 1}).folder == alone.folder


def test_class_images_are_generated_once_and_finished_exactly(tiny_pipeline_dir: str, tmp_path: Path) -> None:
    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(base_hash="ab" * 32, seed=3, steps=1, batch_size=2, cache_dir=tmp_path)
    first = generate_class_images(pipe, "a photo of toy", 3, **kwargs)
    assert (first.generated, first.reused) == (3, 0)
    assert sorted(f.name for f in first.folder.glob("*.png")) == ["s3.png", "s4.png", "s5.png"]
    images = {f.name: np.asarray(Image.open(f)) for f in first.folder.glob("*.png")}
    again = generate_class_images(pipe, "a photo of toy", 3, **kwargs)
    assert (again.folder, again.generated, again.reused) == (first.folder, 0, 3)
    # An interrupted generation is finished with the images an uninterrupted one makes.
    (first.folder / "s5.png").unlink()
    (first.folder / "COMPLETE").unlink()
    finished = generate_class_images(pipe, "a photo of toy", 3, **kwargs)
    assert finished.generated == 1  # s5's group of batch_size=2 is (s5) alone
    assert all(np.array_equal(np.asarray(Image.open(first.folder / n)), a) for n, a in images.items())
    assert generate_class_images(pipe, "a photo of dog", 3, **kwargs).folder != first.folder
    assert generate_class_images(pipe, "a photo of toy", 3, **{**kwargs, "steps": 2}).folder != first.folder


def test_pivotal_auto_trains_a_blank_known_word_in_place(
    concept: Path, tiny_pipeline_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.personalize import trigger
    from tune.tokens import text_towers

    towers = text_towers(load_pipeline(tiny_pipeline_dir))
    auto = p.PivotalConfig(enabled="auto")
    assert p.resolve_pivotal(auto, p.resolve_subject(cfg(f"concept={concept}")), *towers) == "new"  # "zwx"
    known = p.resolve_subject(cfg(f"concept={concept}", "token=w", "instance_prompt=a photo of w dog"))
    weight = trigger.trigger_weight(towers[0][0], towers[1][0], known.instance_prompt, "w")
    assert weight > 0 and trigger.trigger_weight(towers[0][0], towers[1][0], "a photo of dog", "w") == 0
    monkeypatch.setattr(trigger, "BLANK_TRIGGER", weight * 2)  # the base reads "w" as next to nothing
    assert p.resolve_pivotal(auto, known, *towers) == "known"
    assert p.resolve_pivotal(p.PivotalConfig(enabled=True), known, *towers) == "known"
    monkeypatch.setattr(trigger, "BLANK_TRIGGER", weight / 2)  # ...or as a word: left alone
    assert p.resolve_pivotal(auto, known, *towers) == "off"
    with pytest.raises(ConfigError, match="already in the tokenizer's vocabulary"):
        p.resolve_pivotal(p.PivotalConfig(enabled=True), known, *towers)
    assert p.resolve_pivotal(p.PivotalConfig(), known, *towers) == "off"
