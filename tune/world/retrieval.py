"""CLIP on the world: the world dataset's caption table, which captions fit which specs (a partial
caption fits many), and text-to-image / image-to-text retrieval accuracy on fresh renders.

The `clip` recipe trains with `read_captions`, `text_labels` and `fits` (false negatives are masked) and
scores itself with `retrieval` on `retrieval_set`s (its validation metrics and `eval/clip.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPTokenizer

from tune.data.images import to_tensor
from tune.errors import DataError
from tune.world.captions import caption, parse, spec_attributes
from tune.world.judge import HEADS, IGNORE
from tune.world.render import render
from tune.world.spec import TOYS, Spec, sample_spec

SPEC_FIELDS = ("cls", "color", "background", "style", "size", "position", "pattern", "color2", "hair")


def read_captions(data_dir: str) -> dict[str, tuple[tuple[str, ...], Spec]]:
    """canonical caption -> (the image's training captions, its spec)."""
    meta = Path(data_dir) / "metadata.jsonl"
    command = f"tune data world {data_dir} --count 30000 --split train"
    if not meta.is_file():
        raise DataError(f"no world dataset in {data_dir}; write one with `{command}`")
    table = {}
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            try:
                spec = Spec(**{key: row[key] for key in SPEC_FIELDS})
                table[row["text"]] = (tuple(row["captions"]), spec)
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(
                    f"{meta} line {n} is not a world row ({err}); write one with `{command}`"
                ) from None
    return table


def text_labels(text: str) -> list[int]:
    """Attribute labels (the judge's heads, in label order) of what a caption names (IGNORE for what it
    leaves out or calls just "toy")."""
    named = parse(text)
    return [values.index(named[key]) if named.get(key) in values else IGNORE for key, values in HEADS.items()]


def fits(named: dict[str, str], truth: dict[str, str]) -> bool:
    """Whether attributes a caption names (`parse`) fit a spec's (`spec_attributes`); "toy" fits any toy."""
    return all(
        truth.get(key) == value or (key == "cls" and value == "toy" and truth["cls"] in TOYS)
        for key, value in named.items()
    )


def describes(text: str, spec: Spec) -> bool:
    """Whether a caption fits a spec: every attribute it names is the spec's."""
    return fits(parse(text), spec_attributes(spec))


def retrieval_set(split: str, count: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[Spec]]:
    """`count` distinct specs of a split (styles taking turns), rendered fresh: (pixels in [-1, 1], specs)."""
    rng = np.random.default_rng([seed, 3])
    specs: list[Spec] = []
    while len(specs) < count:
        spec = sample_spec(rng, split, style=("photo", "drawing", "sketch", "pixel")[len(specs) % 4])  # type: ignore[arg-type]
        if spec not in specs:
            specs.append(spec)
    images = [
        render(spec, np.random.default_rng([seed, i]), resolution, resolution) for i, spec in enumerate(specs)
    ]
    return torch.stack([to_tensor(im) for im in images]), specs


@torch.no_grad()
def retrieval(model: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor, specs: list[Spec]) -> dict:
    """Top-1 text-to-image and image-to-text accuracy, canonical captions padded to 77 as the U-Net's.
    A pick counts as right when the caption describes the picked image too (two sketches that differ
    only in colour look the same)."""
    was_training, device = model.training, model.device
    texts = [caption(s) for s in specs]
    ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
    model.eval()
    logits = model(input_ids=ids.input_ids.to(device), pixel_values=pixels.to(device)).logits_per_text.float()
    model.train(was_training)
    t2i = [describes(texts[i], specs[j]) for i, j in enumerate(logits.argmax(dim=1).tolist())]
    i2t = [describes(texts[i], specs[j]) for j, i in enumerate(logits.argmax(dim=0).tolist())]
    picked = logits.argmax(dim=1).tolist()
    wrong = [(specs[i], specs[j]) for i, j in enumerate(picked) if not t2i[i]]
    errors = {key: sum(getattr(a, key) != getattr(b, key) for a, b in wrong) for key in SPEC_FIELDS}
    return {
        "t2i_top1": float(np.mean(t2i)),
        "i2t_top1": float(np.mean(i2t)),
        "t2i_errors_by_attribute": errors,
    }
