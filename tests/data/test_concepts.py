"""concept.toml: strict parsing into a frozen Concept, and loading a concept's photos."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tune.data.concepts import Concept, PriorPreservation, load_concept, load_concepts
from tune.data.config import DataConfig
from tune.data.loader import build_dataloader, build_dataset
from tune.errors import ConfigError

from data_testkit import save_photo

FULL = """
token = "sks"
class_word = "dog"
instance_dir = "pics"
instance_prompt = "a photo of {token} {class}"
class_prompt = "a photo of a {class}"
validation_prompts = ["{token} {class} on a beach", "a painting of {token} {class}"]

[prior_preservation]
enabled = true
num_class_images = 50
prior_loss_weight = 0.5
class_dir = "class_images"
"""


def write_concept(root: Path, name: str, text: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "concept.toml").write_text(text)
    return folder / "concept.toml"


def test_full_concept_parses(tmp_path: Path) -> None:
    c = load_concept(write_concept(tmp_path, "rex", FULL))
    assert c.name == "rex" and c.token == "sks" and c.class_word == "dog"
    assert c.instance_dir == (tmp_path / "rex" / "pics").resolve()
    assert c.instance_caption == "a photo of sks dog"
    assert c.class_caption == "a photo of a dog"
    assert c.validation_captions == ("sks dog on a beach", "a painting of sks dog")
    assert c.prior_preservation == PriorPreservation(
        enabled=True,
        num_class_images=50,
        prior_loss_weight=0.5,
        class_dir=(tmp_path / "rex" / "class_images").resolve(),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.token = "xyz"  # type: ignore[misc]


def test_minimal_concept_uses_dataclass_defaults(tmp_path: Path) -> None:
    c = load_concept(write_concept(tmp_path, "cat", 'token = "zwx"\nclass_word = "cat"\n').parent)
    assert c.instance_dir == (tmp_path / "cat" / Concept.instance_dir).resolve()
    assert c.instance_caption == "a photo of zwx cat"
    assert c.prior_preservation == PriorPreservation()
    assert c.validation_prompts == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('tokn = "sks"\nclass_word = "dog"', "unknown key 'tokn'; did you mean 'token'?"),
        (
            'token = "sks"\nclass_word = "dog"\n[prior_preservation]\nprior_los_weight = 1.0',
            "unknown key 'prior_los_weight'; did you mean 'prior_loss_weight'?",
        ),
        ('token = "sks"\nclass_word = "dog"\nzzz = 1', "unknown key 'zzz'; known keys: token"),
        ('token = "sks"', "missing required key 'class_word'"),
        ('token = "sks"\nclass_word = 3', "'class_word' must be str; got 3"),
        (
            'token = "sks"\nclass_word = "dog"\n[prior_preservation]\nnum_class_images = true',
            "'num_class_images' must be int; got True",
        ),
        (
            'token = "sks"\nclass_word = "dog"\ninstance_prompt = "a {tok} {class}"',
            "unknown placeholder {tok}",
        ),
        (
            'token = "sks"\nclass_word = "dog"\nvalidation_prompts = "x"',
            "'validation_prompts' must be list[str]",
        ),
        ('token = "sks"\nclass_word = "dog"\nprior_preservation = 3', "must be a table"),
        ("token = ", "not valid TOML"),
    ],
)
def test_bad_concepts_are_errors_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_concept(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as e:
        load_concept(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_concept_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no concept file"):
        load_concept(tmp_path / "nothing")


def test_load_concepts_sorted(tmp_path: Path) -> None:
    for name in ("zed", "amy"):
        write_concept(tmp_path, name, f'token = "{name}"\nclass_word = "person"\n')
    assert [c.name for c in load_concepts(tmp_path)] == ["amy", "zed"]


def test_concept_dataset_pairs_instance_and_class_images(tmp_path: Path) -> None:
    concept_file = write_concept(tmp_path / "concepts", "rex", FULL)
    for i in range(3):
        save_photo(concept_file.parent / "pics" / f"{i}.jpg", 64, 64, seed=i)
        (concept_file.parent / "pics" / f"{i}.txt").write_text("ignored sidecar")
    for i in range(5):
        save_photo(concept_file.parent / "class_images" / f"{i}.png", 64, 64, seed=50 + i)
    concept = load_concept(concept_file)
    dataset = build_dataset(concept, DataConfig(resolution=64, bucket_step=8), seed=1)
    assert len(dataset.instance_indices) == 3 and len(dataset.prior_indices) == 5
    loader = build_dataloader(dataset, batch_size=2)
    batches = list(loader)
    assert sorted(len(b) for b in batches) == [2, 4]  # 2 + 2 class images, 1 + 1 class image
    for b in batches:
        n = len(b) // 2
        assert b.is_prior.tolist() == [False] * n + [True] * n
        assert b.captions == ["a photo of sks dog"] * n + ["a photo of a dog"] * n
        assert b.pixel_values is not None and b.pixel_values.shape[1:] == (3, 64, 64)


def test_class_images_are_captioned_by_their_own_sidecars(tmp_path: Path) -> None:
    concept_file = write_concept(tmp_path / "concepts", "rex", FULL)
    for i in range(2):
        save_photo(concept_file.parent / "pics" / f"{i}.jpg", 64, 64, seed=i)
    drawn_for = {
        0: "a drawing of a dog",
        1: "pixel art of a dog",
    }  # what a recipe writes beside its class images
    for i in range(3):
        save_photo(concept_file.parent / "class_images" / f"{i}.png", 64, 64, seed=50 + i)
        if i in drawn_for:
            (concept_file.parent / "class_images" / f"{i}.txt").write_text(drawn_for[i])
    dataset = build_dataset(load_concept(concept_file), DataConfig(resolution=64, bucket_step=8), seed=1)
    captions = {Path(r.path).name: r.caption for r in dataset.records if r.is_prior}
    assert captions == {"0.png": drawn_for[0], "1.png": drawn_for[1], "2.png": "a photo of a dog"}
