"""Image metrics for personalization: how much of the subject, how much of the prompt, how varied.

    clip = load_clip("models/world-clip")            # any transformers CLIPModel folder
    dino = load_dino("path/to/dinov2-small")         # optional: any ViT / Dinov2 folder
    subject_fidelity(images, photos, clip)           # CLIP-I: mean cosine, generated x concept photos
    subject_fidelity(images, photos, dino)           # DINO: the same with DINO's CLS embedding
    prompt_fidelity(images, prompts, clip)           # CLIP-T: mean cosine of each image with its prompt
    diversity({prompt: images}, clip)                # mean pairwise 1 - cosine among one prompt's images

The first three are the DreamBooth paper's CLIP-I, DINO and CLIP-T; `diversity` catches collapse
(every seed drawing the same picture), a sign of overfitting. Cosines lie in [-1, 1]; identical
images have subject fidelity 1 and diversity 0.

On the built-in toy world the world judge (`tune.world.judge`) adds exact checks: `subject_found`
(is the subject, whose look the judge reads from the concept's own photos, in the picture?),
`background_right` and `style_right` (the background and style the prompt named?) and
`prompt_right` (every attribute a prompt names, for prompts without the subject: does the model still
draw what it is told?).

Models are local folders only; nothing is downloaded. Images are preprocessed by hand the way the
folder's `preprocessor_config.json` says (shortest side resized bicubic, centre crop, mean/std),
with the model's own image size and the usual CLIP / ImageNet statistics where the file is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tune.errors import ModelError
from tune.paths import find_path

log = logging.getLogger(__name__)

DEFAULT_CLIP = "models/world-clip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BATCH = 32


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """How images become pixel values: resize the short side to `size`, centre-crop `crop`, normalise."""

    size: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = []
        for image in images:
            image = image.convert("RGB")
            scale = self.size / min(image.size)
            w, h = max(self.crop, round(image.width * scale)), max(self.crop, round(image.height * scale))
            if (w, h) != image.size:
                image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std


def _preprocess(folder: Path, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Preprocess:
    """The folder's preprocessor_config.json where there is one, else resize and crop to `image_size`."""
    config: dict[str, Any] = {}
    file = folder / "preprocessor_config.json"
    if file.is_file():
        config = json.loads(file.read_text(encoding="utf-8"))

    def side(value: Any, default: int) -> int:
        if isinstance(value, dict):  # {"shortest_edge": 64} or {"height": 64, "width": 64}
            value = value.get("shortest_edge") or value.get("height")
        return int(value) if value else default

    crop = side(config.get("crop_size"), image_size) if config.get("do_center_crop", True) else image_size
    size = side(config.get("size"), crop)
    return Preprocess(
        size=size,
        crop=crop,
        mean=tuple(config.get("image_mean", mean)),  # type: ignore[arg-type]
        std=tuple(config.get("image_std", std)),  # type: ignore[arg-type]
    )


def _check_folder(path: str | Path, what: str, hint: str) -> Path:
    folder = find_path(str(path))
    if not (folder / "config.json").is_file():
        raise ModelError(f"{what} model folder {folder} not found (no config.json); {hint}")
    return folder


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Clip:
    """A CLIP model (both towers) and its tokenizer: unit-length image and text embeddings."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        folder = _check_folder(
            path, "CLIP", "pass --clip PATH, a transformers CLIPModel folder with its tokenizer files"
        )
        try:
            self.model = CLIPModel.from_pretrained(folder).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"cannot load a CLIPModel and tokenizer from {folder}: {first}") from None
        self.path = folder
        self.device = _device(device)
        self.model.to(self.device)
        self.preprocess = _preprocess(folder, self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, d] unit-length image embeddings (float32, CPU)."""
        out = []
        for start in range(0, len(images), _BATCH):
            pixels = self.preprocess(images[start : start + _BATCH]).to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return _unit(torch.cat(out))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, d] unit-length text embeddings (float32, CPU)."""
        out = []
        for start in range(0, len(texts), _BATCH):
            ids = self.tokenizer(
                list(texts[start : start + _BATCH]),
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            )
            features = self.model.get_text_features(
                input_ids=ids.input_ids.to(self.device), attention_mask=ids.attention_mask.to(self.device)
            )
            out.append(_features(features))
        return _unit(torch.cat(out))


class Dino:
    """A self-supervised ViT (DINO's ViTModel or Dinov2Model): the CLS token as the image embedding."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None) -> None:
        from transformers import AutoModel

        folder = _check_folder(path, "DINO", "pass --dino PATH, a transformers ViT or Dinov2 model folder")
        try:
            self.model = AutoModel.from_pretrained(folder).eval()
        except (OSError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"cannot load a ViT/Dinov2 model from {folder}: {first}") from None
        model_type = getattr(self.model.config, "model_type", "")
        if model_type not in ("vit", "dinov2", "dinov2_with_registers"):
            raise ModelError(
                f"{folder} holds a {model_type or 'unknown'} model; DINO needs a vit or dinov2 one"
            )
        self.path = folder
        self.device = _device(device)
        self.model.to(self.device)
        self.preprocess = _preprocess(folder, self.model.config.image_size, IMAGENET_MEAN, IMAGENET_STD)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, d] unit-length CLS embeddings (after the final layer norm), float32 on the CPU."""
        out = []
        for start in range(0, len(images), _BATCH):
            pixels = self.preprocess(images[start : start + _BATCH]).to(self.device)
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return _unit(torch.cat(out))


def _features(output: Any) -> torch.Tensor:
    # transformers 4 returns the projected tensor; 5 may return a model output with pooler_output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


def load_clip(path: str | Path = DEFAULT_CLIP, device: str | torch.device | None = None) -> Clip:
    """A local CLIPModel folder (config.json, weights, tokenizer files); a missing one is a ModelError."""
    return Clip(path, device)


def load_dino(path: str | Path, device: str | torch.device | None = None) -> Dino:
    """A local ViT or Dinov2 folder (e.g. facebook/dino-vits16 saved with save_pretrained)."""
    return Dino(path, device)


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

ImageEncoder = Clip | Dino


def _embed(images: Sequence[Image.Image] | torch.Tensor, encoder: ImageEncoder) -> torch.Tensor:
    """Precomputed embeddings pass through (normalised), so callers can embed reference photos once."""
    if isinstance(images, torch.Tensor):
        return _unit(images)
    if not images:
        raise ValueError("need at least one image")
    return encoder.image_embeddings(images)


def subject_fidelity(
    images: Sequence[Image.Image] | torch.Tensor,
    reference_images: Sequence[Image.Image] | torch.Tensor,
    encoder: ImageEncoder,
) -> float:
    """Mean cosine similarity over every (generated image, reference photo) pair, in [-1, 1].

    With a CLIP encoder this is the DreamBooth paper's CLIP-I, with a DINO encoder its DINO score.
    Either argument may be a tensor of embeddings instead of images.
    """
    a, b = _embed(images, encoder), _embed(reference_images, encoder)
    return float((a @ b.T).mean())


def prompt_fidelity(
    images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str], clip: Clip
) -> float:
    """Mean cosine similarity of each image with its own prompt (CLIP-T), in [-1, 1]."""
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image; got {len(images)} images and {len(prompts)} prompts")
    a = _embed(images, clip)
    unique = sorted(set(prompts))
    texts = clip.text_embeddings(unique)
    t = texts[[unique.index(p) for p in prompts]]
    return float((a * t).sum(dim=-1).mean())


def diversity(
    images_by_prompt: Mapping[str, Sequence[Image.Image] | torch.Tensor], encoder: ImageEncoder
) -> float:
    """Mean pairwise cosine distance (1 - cosine, in [0, 2]) among the images of each prompt, averaged
    over the prompts that have at least two images. 0 means every seed drew the same picture."""
    means = []
    for group in images_by_prompt.values():
        if len(group) < 2:
            continue
        e = _embed(group, encoder)
        n = e.shape[0]
        sims = e @ e.T
        off_diagonal = (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))
        means.append(float(1.0 - off_diagonal))
    if not means:
        raise ValueError("diversity needs a prompt with at least two images (two seeds)")
    return max(0.0, sum(means) / len(means))  # rounding can make identical images a hair below 0


# ---------------------------------------------------------------------------------------------------
# The toy world: what the world judge reads (tune.world.judge)
# ---------------------------------------------------------------------------------------------------

LOOK_FIELDS = ("cls", "color", "pattern", "color2", "hair")
LOOK_AGREEMENT = 0.6
"""A concept's photos are a world subject when the judge reads one look in at least this share of them."""


def prompt_background(prompt: str) -> str | None:
    """The background a prompt asks for (a world colour or surface: "... on a red background", "... on
    grass"), or None."""
    from tune.world.captions import parse

    return parse(prompt).get("background")


def subject_look(photos: Sequence[Image.Image], judge: Any) -> dict[str, str | None] | None:
    """The look (class, colours, pattern, hair) the judge reads in most of a concept's photos, or None
    when no look reaches LOOK_AGREEMENT (the photos are not of one world subject)."""
    if judge is None or not photos:
        return None
    looks = [
        tuple(getattr(v, k) for k in LOOK_FIELDS) for v in judge.read(list(photos)) if v.color is not None
    ]
    if not looks:
        return None
    best = max(set(looks), key=looks.count)
    return (
        dict(zip(LOOK_FIELDS, best, strict=True))
        if looks.count(best) >= LOOK_AGREEMENT * len(photos)
        else None
    )


def found(verdict: Any, look: dict[str, str | None]) -> bool:
    """Whether a verdict shows the look: class and pattern always, colours and hair where the picture's
    style shows colours (a sketch has none); a striped or spotted toy may be read with its two colours
    either way round."""
    if verdict.cls != look["cls"] or verdict.pattern != look["pattern"]:
        return False
    if verdict.color is None:
        return True
    pair, wanted = (verdict.color, verdict.color2), (look["color"], look["color2"])
    return (pair == wanted or (look["cls"] != "person" and pair == wanted[::-1])) and verdict.hair == look[
        "hair"
    ]


def subject_found(
    images: Sequence[Image.Image], look: dict[str, str | None] | None, judge: Any
) -> float | None:
    """Share of images in which the judge sees the subject's look; None without a look."""
    return subject_found_and_parts(images, look, judge)[0]


def look_parts(verdicts: Sequence[Any], look: dict[str, str | None] | None) -> dict[str, float] | None:
    """Share of `verdicts` that read each part of the look right, by LOOK_FIELDS' names: what a miss of
    `found` comes from (w-person's spots drawn orange: color2 0%). Class and pattern over every verdict;
    colours and hair over those whose style shows colours (a sketch has none: a part is left out when no
    verdict shows colours). A part the look lacks (a plain toy's second colour, a toy's hair) is left out.
    A two-coloured toy read with its colours the other way round has both right, as in `found`. None
    without a look or verdicts."""
    if look is None or not verdicts:
        return None
    coloured = [v for v in verdicts if v.color is not None]
    swap = look["cls"] != "person" and look["color2"] is not None

    def right(v: Any, part: str) -> bool:
        if part in ("color", "color2") and swap and (v.color, v.color2) == (look["color2"], look["color"]):
            return True
        return getattr(v, part) == look[part]

    shares = {}
    for part in LOOK_FIELDS:
        pool = verdicts if part in ("cls", "pattern") else coloured
        if look[part] is not None and pool:
            shares[part] = sum(right(v, part) for v in pool) / len(pool)
    return shares


def subject_found_and_parts(
    images: Sequence[Image.Image], look: dict[str, str | None] | None, judge: Any
) -> tuple[float | None, dict[str, float] | None]:
    """(`subject_found`, `look_parts`) of `images` from one reading by the judge; (None, None) without a
    look, judge or images."""
    if look is None or judge is None or not images:
        return None, None
    verdicts = judge.read(list(images))
    return sum(found(v, look) for v in verdicts) / len(verdicts), look_parts(verdicts, look)


def _named(images: Sequence[Image.Image], prompts: Sequence[str], key: str, judge: Any) -> float | None:
    """Share of images whose judged `key` is what their prompt names, over the prompts naming one."""
    from tune.world.captions import parse

    pairs = [(im, parse(p).get(key)) for im, p in zip(images, prompts, strict=True)]
    pairs = [(im, want) for im, want in pairs if want is not None]
    if judge is None or not pairs:
        return None
    verdicts = judge.read([im for im, _ in pairs])
    return sum(getattr(v, key) == want for v, (_, want) in zip(verdicts, pairs, strict=True)) / len(pairs)


def background_right(images: Sequence[Image.Image], prompts: Sequence[str], judge: Any) -> float | None:
    """Share of images on the background (colour or surface) their prompt named; None when none names one."""
    return _named(images, prompts, "background", judge)


def style_right(images: Sequence[Image.Image], prompts: Sequence[str], judge: Any) -> float | None:
    """Share of images in the style (photo, drawing, pencil sketch, pixel art) their prompt named."""
    return _named(images, prompts, "style", judge)


def prompt_right(images: Sequence[Image.Image], prompts: Sequence[str], judge: Any) -> float | None:
    """Share of images whose every attribute the prompt names (class, colours, pattern, background,
    style, size, position) the judge reads as named, over prompts that name a class; "toy" means any toy.
    Attributes a picture's style cannot show (colours in a sketch) are not counted."""
    from tune.world.captions import parse
    from tune.world.spec import TOYS

    pairs = [(im, parse(p)) for im, p in zip(images, prompts, strict=True)]
    pairs = [(im, named) for im, named in pairs if "cls" in named]
    if judge is None or not pairs:
        return None

    def right(verdict: Any, named: dict[str, str]) -> bool:
        for key, want in named.items():
            got = getattr(verdict, key)
            if key == "cls" and want == "toy":
                ok = got in TOYS
            else:
                ok = got is None or got == want  # None: not shown in this style
            if not ok:
                return False
        return True

    verdicts = judge.read([im for im, _ in pairs])
    return sum(right(v, named) for v, (_, named) in zip(verdicts, pairs, strict=True)) / len(pairs)
