"""tune.metrics on hand-made images with tiny random CLIP and ViT models saved to disk (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune import metrics
from tune.errors import ModelError
from tune.world.judge import Verdict
from tune.world.render import render
from tune.world.spec import Spec


def save_tiny_clip(folder: Path) -> Path:
    """A random CLIPModel (32 px images, 1 layer per tower) with a small BPE tokenizer, saved to `folder`."""
    from transformers import CLIPConfig, CLIPModel

    from tune.models import build_clip_tokenizer
    from tune.models.tokenizer import DEFAULT_CORPUS

    tokenizer = build_clip_tokenizer(DEFAULT_CORPUS, 700, folder)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **tiny,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tiny),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def save_tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> metrics.Clip:
    return metrics.load_clip(save_tiny_clip(tmp_path_factory.mktemp("clip")), "cpu")


@pytest.fixture(scope="module")
def dino(tmp_path_factory: pytest.TempPathFactory) -> metrics.Dino:
    return metrics.load_dino(save_tiny_vit(tmp_path_factory.mktemp("vit")), "cpu")


def shape(color: str, bg: str, kind: str = "ball", size: str = "large") -> Image.Image:
    spec = Spec(cls=kind, color=color, background=bg, size=size, style="drawing")  # type: ignore[arg-type]
    return render(spec, np.random.default_rng(0), 32, 32)


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_identical_images_have_subject_fidelity_1_and_others_less(
    clip: metrics.Clip, dino: metrics.Dino
) -> None:
    photo = render(Spec(cls="ring", color="pink", background="sand"), np.random.default_rng(0), 48, 48)
    for encoder in (clip, dino):
        assert metrics.subject_fidelity([photo, photo], [photo], encoder) == pytest.approx(1.0, abs=1e-5)
        other = metrics.subject_fidelity([noise(1), shape("red", "blue")], [photo], encoder)
        assert -1.0 <= other < 0.999


def test_embeddings_are_unit_length_and_deterministic(clip: metrics.Clip) -> None:
    images = [shape("red", "blue"), noise(0), noise(1)]
    a = clip.image_embeddings(images)
    assert a.shape == (3, 16) and torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(a, clip.image_embeddings(images))
    t = clip.text_embeddings(["a photo of toy", "a photo of a large red ball on a blue background"])
    assert t.shape == (2, 16) and not torch.allclose(t[0], t[1])
    # Precomputed embeddings give the same numbers as the images.
    assert metrics.subject_fidelity(a[:2], a[2:], clip) == pytest.approx(
        metrics.subject_fidelity(images[:2], images[2:], clip), abs=1e-6
    )


def test_prompt_fidelity_is_the_mean_paired_cosine(clip: metrics.Clip) -> None:
    images = [shape("red", "blue"), shape("green", "white")]
    prompts = ["a large red circle on a blue background", "a large green circle on a white background"]
    value = metrics.prompt_fidelity(images, prompts, clip)
    expected = (clip.image_embeddings(images) * clip.text_embeddings(prompts)).sum(-1).mean()
    assert -1.0 <= value <= 1.0 and value == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        metrics.prompt_fidelity(images, prompts[:1], clip)


def test_diversity_of_identical_images_is_0_and_of_different_ones_positive(clip: metrics.Clip) -> None:
    same = shape("red", "blue")
    assert metrics.diversity({"a": [same, same, same]}, clip) == pytest.approx(0.0, abs=1e-6)
    varied = metrics.diversity({"a": [noise(0), shape("red", "blue")], "b": [same, same]}, clip)
    assert 0.0 < varied <= 2.0
    # A prompt's images are compared only with each other: two collapsed prompts stay at 0.
    assert metrics.diversity({"a": [same, same], "b": [noise(3), noise(3)]}, clip) == pytest.approx(
        0.0, abs=1e-6
    )
    with pytest.raises(ValueError, match="two seeds"):
        metrics.diversity({"a": [same]}, clip)


def test_missing_or_wrong_model_folders_are_model_errors(tmp_path: Path, clip: metrics.Clip) -> None:
    with pytest.raises(ModelError, match="CLIP model folder .* not found.*--clip"):
        metrics.load_clip(tmp_path / "nope")
    with pytest.raises(ModelError, match="DINO model folder .* not found"):
        metrics.load_dino(tmp_path / "nope")
    with pytest.raises(ModelError, match="holds a clip model"):
        metrics.load_dino(clip.path)


def test_preprocessing_follows_the_folder_config(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}, "image_mean": [0.5, 0.5, 0.5],'
        ' "image_std": [0.5, 0.5, 0.5]}'
    )
    prep = metrics._preprocess(tmp_path, 224, metrics.CLIP_MEAN, metrics.CLIP_STD)
    pixels = prep([Image.new("RGB", (40, 20), (255, 0, 0))])
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(pixels[0, 0], torch.ones(16, 16)) and torch.allclose(
        pixels[0, 1], -torch.ones(16, 16)
    )


class FakeJudge:
    """Reads the verdict stored under each image's top-left pixel (the metrics' logic, not the judge's)."""

    def __init__(self, verdicts: dict[int, Verdict]) -> None:
        self.verdicts = verdicts

    def read(self, images):  # noqa: ANN001, ANN201
        return [self.verdicts[im.getpixel((0, 0))[0]] for im in images]


def verdict(**fields) -> Verdict:  # noqa: ANN003
    base = dict(
        cls="ring",
        color="pink",
        pattern="striped",
        color2="teal",
        hair=None,
        background="blue",
        style="photo",
        size="large",
        position="center",
        confidence=0.9,
    )
    return Verdict(**{**base, **fields})


def tagged(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i, 0, 0))


def test_world_metrics_compare_the_judge_with_the_prompt() -> None:
    judge = FakeJudge(
        {
            0: verdict(),
            1: verdict(color="teal", color2="pink", background="red"),  # the toy, colours read the other way
            2: verdict(cls="ball", pattern="plain", color="red", color2=None, background="blue"),
            3: verdict(style="sketch", color=None, color2=None, background="grass"),  # a sketch: no colours
            4: verdict(color2="white", background="sand", style="drawing"),  # a look-alike
        }
    )
    images = [tagged(i) for i in range(5)]
    look = metrics.subject_look(images[:3] + images[:2], judge)
    assert look is None or look["cls"] == "ring"
    look = metrics.subject_look([images[0]] * 4 + [images[2]], judge)
    assert look == {"cls": "ring", "color": "pink", "pattern": "striped", "color2": "teal", "hair": None}
    assert metrics.subject_look([images[0], images[2]], judge) is None  # no look in most photos
    assert metrics.subject_found(images, look, judge) == pytest.approx(3 / 5)
    assert metrics.subject_found(images, None, judge) is None
    prompts = [
        "a photo of sks toy on a blue background",
        "a photo of sks toy on a red background",
        "a photo of sks toy on grass",
        "a pencil sketch of sks toy on grass",
        "a drawing of sks toy",
    ]
    assert metrics.background_right(images, prompts, judge) == pytest.approx(3 / 4)
    assert metrics.style_right(images, prompts, judge) == pytest.approx(3 / 3)
    assert metrics.prompt_background("a photo of sks toy on an orange background") == "orange"
    assert metrics.prompt_background("a photo of sks toy on a rug") == "rug"
    assert metrics.prompt_background("a photo of sks toy") is None
    plain = ["a photo of a large red ball on a blue background", "a photo of a toy", "a photo of a red cup"]
    assert metrics.prompt_right([images[2], images[2], images[2]], plain, judge) == pytest.approx(2 / 3)
    assert metrics.prompt_right(images[:1], ["a photo of sks"], judge) is None
    assert metrics.background_right(images, prompts, None) is None


def test_the_looks_parts_say_what_a_miss_comes_from() -> None:
    ring = {"cls": "ring", "color": "pink", "pattern": "striped", "color2": "teal", "hair": None}
    verdicts = [
        verdict(),
        verdict(color="teal", color2="pink"),  # the toy's colours the other way round: both right
        verdict(color2="white"),  # its second colour missed
        verdict(
            style="sketch", color=None, color2=None, pattern="plain"
        ),  # no colours: class and pattern only
    ]
    assert metrics.look_parts(verdicts, ring) == pytest.approx(
        {"cls": 1, "color": 1, "pattern": 0.75, "color2": 2 / 3}
    )
    assert sum(metrics.found(v, ring) for v in verdicts) == 2  # each miss shows in a part
    person = {"cls": "person", "color": "yellow", "pattern": "spotted", "color2": "purple", "hair": "green"}
    shirt = dict(cls="person", pattern="spotted", color="yellow", color2="purple", hair="green")
    swapped = verdict(
        **shirt | {"color": "purple", "color2": "yellow"}
    )  # a person's colours keep their order
    orange = verdict(**shirt | {"color2": "orange", "hair": "red"})
    assert metrics.look_parts([verdict(**shirt), swapped, orange], person) == pytest.approx(
        {"cls": 1, "color": 2 / 3, "pattern": 1, "color2": 1 / 3, "hair": 2 / 3}
    )
    sketches = [verdict(**shirt | {"color": None, "color2": None, "hair": None, "style": "sketch"})]
    assert metrics.look_parts(sketches, person) == {"cls": 1.0, "pattern": 1.0}  # nothing coloured to read
    assert metrics.look_parts(verdicts, None) is None and metrics.look_parts([], ring) is None
    judge = FakeJudge({0: verdict(), 1: verdict(color2="white")})
    reads = []
    judge.read = lambda images, read=judge.read: reads.append(len(images)) or read(images)  # type: ignore[method-assign]
    found, parts = metrics.subject_found_and_parts([tagged(0), tagged(1)], ring, judge)
    assert found == 0.5 and parts == {"cls": 1.0, "color": 1.0, "pattern": 1.0, "color2": 0.5}
    assert reads == [2]  # one reading of the images gives both
    assert metrics.subject_found_and_parts([tagged(0)], ring, None) == (None, None)
