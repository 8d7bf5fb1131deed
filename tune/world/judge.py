"""The world judge: reads a picture of the toy world and says what it shows.

    judge = load_judge()                      # models/world-judge (shipped), or a folder
    verdicts = judge.read(images)             # one `Verdict` per image
    verdicts[0].cls, verdicts[0].color, verdicts[0].background, verdicts[0].style, ...

A small CNN (about 1M parameters) with one classification head per attribute, trained on renders of
the world with blur, resampling, noise and brightness augmentations (`scripts/train_judge.py`), so that
it also reads VAE reconstructions and generated images. Colours are not judged in a style that draws
none (a sketch): those fields are None. Every figure of the base model and of personalization
(`tune eval` on the world suites) is measured with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from tune.errors import ModelError
from tune.paths import find_path, missing_shipped
from tune.world.spec import (
    BACKGROUNDS,
    CLASSES,
    COLORLESS_STYLES,
    COLORS,
    PATTERNS,
    POSITIONS,
    SIZES,
    STYLES,
    Spec,
)

HEADS: dict[str, tuple[str, ...]] = {
    "cls": CLASSES,
    "color": COLORS,
    "pattern": PATTERNS,
    "color2": COLORS,
    "hair": COLORS,
    "background": BACKGROUNDS,
    "style": STYLES,
    "size": SIZES,
    "position": POSITIONS,
}
"""Attribute -> its values, in label order."""
IGNORE = -100
RESOLUTION = 64
DEFAULT_JUDGE = "models/world-judge"
"""The shipped judge (looked up with tune.paths.find_path: ./models/world-judge first)."""


def labels(spec: Spec) -> dict[str, int]:
    """The judge's training targets for a spec; IGNORE where the picture does not show the attribute
    (colours in a sketch, color2 of a plain object, a toy's hair, a colour background in a sketch)."""
    shown = spec.style not in COLORLESS_STYLES
    out = {
        "cls": CLASSES.index(spec.cls),
        "color": COLORS.index(spec.color) if shown else IGNORE,
        "pattern": PATTERNS.index(spec.pattern),
        "color2": COLORS.index(spec.color2) if shown and spec.color2 else IGNORE,
        "hair": COLORS.index(spec.hair) if shown and spec.hair else IGNORE,
        "background": BACKGROUNDS.index(spec.background)
        if shown or spec.background not in COLORS
        else IGNORE,
        "style": STYLES.index(spec.style),
        "size": SIZES.index(spec.size),
        "position": POSITIONS.index(spec.position),
    }
    return out


@dataclass(frozen=True)
class Verdict:
    """What the judge reads in one picture. Fields a picture cannot show are None: colours (and colour
    backgrounds) in a sketch, color2 of a plain object, hair of a toy."""

    cls: str
    color: str | None
    pattern: str
    color2: str | None
    hair: str | None
    background: str | None
    style: str
    size: str
    position: str
    confidence: float
    """The smallest top-1 probability among the attributes read."""

    def as_dict(self) -> dict:
        return asdict(self)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class JudgeNet(nn.Module):
    """64 px RGB in [0, 1] -> logits per attribute. Global pooling for what an object is, a small
    flattened 4x4 map for where it is and how big.

    pooling="attention" adds learned attention pooling over the 8x8 map (four softmax maps, each a
    weighted mean of the 8x8 features and the upsampled 4x4 ones): a small object's colours and
    pattern are not averaged away with the background, as they are by the global mean alone.
    """

    def __init__(self, width: int = 32, pooling: str = "mean", attention_maps: int = 4) -> None:
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention'; got {pooling!r}")
        w = width
        self.features = nn.Sequential(
            _block(3, w, 2),  # 32: a stride-2 stem still sees 3 px stripes, at a fifth of the cost
            _block(w, w, 1),
            _block(w, 2 * w, 2),  # 16
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),  # 8
            _block(4 * w, 4 * w, 1),
            _block(4 * w, 8 * w, 2),  # 4
            _block(8 * w, 8 * w, 1),
        )
        self.where = nn.Conv2d(8 * w, 16, 1)
        hidden = 8 * w + 16 * 16
        if pooling == "attention":
            self.attend = nn.Conv2d(12 * w, attention_maps, 1)
            hidden += attention_maps * 12 * w
        self.trunk = nn.Sequential(nn.Linear(hidden, 384), nn.SiLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(384, len(values)) for name, values in HEADS.items()})
        self.width, self.pooling = width, pooling

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (pixels - 0.5) / 0.25
        for i, block in enumerate(self.features):
            x = block(x)
            if i == 5:
                eight = x  # the 8x8 map, before the last level
        parts = [x.mean(dim=(2, 3)), self.where(x).flatten(1)]
        if self.pooling == "attention":
            fine = torch.cat([eight, F.interpolate(x, size=eight.shape[-2:], mode="nearest")], dim=1)
            weights = self.attend(fine).flatten(2).softmax(-1)  # [B, maps, 64]
            parts.append(torch.einsum("bkn,bcn->bkc", weights, fine.flatten(2)).flatten(1))
        h = self.trunk(torch.cat(parts, dim=1))
        return {name: head(h) for name, head in self.heads.items()}


def to_pixels(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """Pictures as a float batch [N, 3, 64, 64] in [0, 1] (other sizes: centre square, resized)."""
    out = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        if image.size != (RESOLUTION, RESOLUTION):
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize(
                (RESOLUTION, RESOLUTION), Image.Resampling.BOX
            )
        out.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


class Judge:
    """A trained JudgeNet and how to read pictures with it."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @torch.no_grad()
    def probabilities(
        self, images: Sequence[Image.Image | np.ndarray], batch_size: int = 256
    ) -> dict[str, torch.Tensor]:
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
        for start in range(0, len(images), batch_size):
            logits = self.net(to_pixels(images[start : start + batch_size]))
            for name, value in logits.items():
                chunks[name].append(value.softmax(-1))
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    def read(self, images: Sequence[Image.Image | np.ndarray]) -> list[Verdict]:
        if not images:
            return []
        probs = self.probabilities(images)
        top = {name: p.max(-1) for name, p in probs.items()}
        verdicts = []
        for i in range(len(images)):
            value = {name: HEADS[name][int(top[name].indices[i])] for name in HEADS}
            style = value["style"]
            shown = style not in COLORLESS_STYLES
            read = ["cls", "pattern", "style", "size", "position"]
            color = value["color"] if shown else None
            color2 = value["color2"] if shown and value["pattern"] != "plain" else None
            hair = value["hair"] if shown and value["cls"] == "person" else None
            background = value["background"] if shown or value["background"] not in COLORS else None
            read += [k for k, v in (("color", color), ("color2", color2), ("hair", hair)) if v is not None]
            verdicts.append(
                Verdict(
                    cls=value["cls"],
                    color=color,
                    pattern=value["pattern"],
                    color2=color2,
                    hair=hair,
                    background=background,
                    style=style,
                    size=value["size"],
                    position=value["position"],
                    confidence=min(float(top[k].values[i]) for k in read),
                )
            )
        return verdicts


def load_judge(path: str | Path | None = None) -> Judge:
    """The judge saved in `path` (default: the shipped models/world-judge)."""
    folder = Path(path) if path is not None else find_path(DEFAULT_JUDGE)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config.is_file():
        if path is None:
            raise ModelError(
                f"no world judge (model.safetensors + config.json): "
                f"{missing_shipped(DEFAULT_JUDGE, rebuild='make judge')}, or pass a judge folder"
            )
        raise ModelError(
            f"no world judge at {folder} (model.safetensors + config.json); pass the folder that "
            "`python scripts/train_judge.py --out DIR` wrote"
        )
    settings = json.loads(config.read_text())
    net = JudgeNet(width=int(settings["width"]), pooling=settings.get("pooling", "mean"))
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    net.load_state_dict(state)
    return Judge(net)


def attribute_accuracy(verdicts: Sequence[Verdict], specs: Sequence[Spec]) -> dict[str, float]:
    """Share of pictures whose verdict matches the spec, per attribute, over the pictures that show it
    (see `labels`); 'all' is the share with every shown attribute right."""
    right: dict[str, list[bool]] = {name: [] for name in HEADS}
    every = []
    for verdict, spec in zip(verdicts, specs, strict=True):
        truth = labels(spec)
        ok_all = True
        for name, index in truth.items():
            if index == IGNORE or (name == "position" and spec.size == "large"):
                continue
            ok = getattr(verdict, name) == HEADS[name][index]
            right[name].append(ok)
            ok_all &= ok
        every.append(ok_all)
    out = {name: float(np.mean(v)) for name, v in right.items() if v}
    out["all"] = float(np.mean(every)) if every else float("nan")
    return out


def judge_tensor_labels(specs: Sequence[Spec]) -> dict[str, torch.Tensor]:
    """Training targets for a batch of specs (IGNORE where not shown)."""
    rows = [labels(s) for s in specs]
    return {name: torch.tensor([r[name] for r in rows]) for name in HEADS}


def judge_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [
        F.cross_entropy(logits[name], targets[name], ignore_index=IGNORE)
        for name in HEADS
        if (targets[name] != IGNORE).any()
    ]
    return torch.stack(losses).sum()
