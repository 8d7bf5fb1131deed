"""The issue-22 "Editing" figure: does prompt-to-prompt change only what the edited word covers?

40 pairs "a photo of a large {colour} {class} on a {bg} background" -> the same with another colour (even
pairs) or another toy class (odd pairs); colour backgrounds, both colours != bg; seed = pair index. The
shipped base draws A and B (tune.editing.edit: 25 steps, guidance 6, K = 10 edit steps) four ways: the
default edit (A's cross-attention maps for K steps + the local blend), the same plus A's self-attention
(attn1) for K steps, the maps without the blend, and plain B from the same seed (K = 0, which is plain
sampling of B bit for bit). For each:

- the share of B images in which the world judge reads B's new colour (colour pairs) or class (class pairs);
- the mean absolute difference of A and B over the background, 0-255 units: pixels farther than MARGIN
  pixels from the object in A and in B (object: `tune.attention.subject_pixels`, the pixels unlike the
  image's border, as in scripts/attention_figure.py), averaged over the pixels of a pair, then over pairs.

    python scripts/edit_figure.py [MODEL] [--pairs N] [--edit-steps K] [--sheet FILE.png] [--device cpu|cuda]
"""

import argparse

import numpy as np
import torch

from tune.attention import subject_pixels
from tune.editing import edit
from tune.grids import make_grid
from tune.models import load_pipeline
from tune.sampling import generate
from tune.world.scoring import try_load_judge
from tune.world.spec import COLORS, TOYS

MARGIN = 3
parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default="models/world-base")
parser.add_argument("--pairs", type=int, default=40)
parser.add_argument("--edit-steps", type=int, default=10)
parser.add_argument("--sheet", default=None, help="also write the first 8 pairs: A and each B")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()
torch.set_num_threads(1)
pipe = load_pipeline(args.model).to(args.device)
pipe.set_progress_bar_config(disable=True)
judge = try_load_judge()

pairs = []  # (prompt A, prompt B, attribute, B's value)
for i in range(args.pairs):
    colour, cls = COLORS[i % len(COLORS)], TOYS[i % len(TOYS)]
    bg = COLORS[(i % len(COLORS) + 1 + (i // len(COLORS)) * 3) % len(COLORS)]
    if i % 2 == 0:
        new = next(c for k in range(5, 17) if (c := COLORS[(i + k) % len(COLORS)]) not in (colour, bg))
        b, attribute = (new, cls), "color"
    else:
        new = TOYS[(i // 2 + 1 + TOYS.index(cls)) % len(TOYS)]
        if new == cls:
            new = TOYS[(TOYS.index(cls) + 1) % len(TOYS)]
        b, attribute = (colour, new), "cls"
    text = "a photo of a large {} {} on a {} background"
    pairs.append((text.format(colour, cls, bg), text.format(*b, bg), attribute, new))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a mask by `radius` pixels (a (2r+1)-square max filter)."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(t, 2 * radius + 1, 1, radius)[0, 0].numpy() > 0


def pixels(image) -> np.ndarray:  # noqa: ANN001
    return np.asarray(image.convert("RGB"), dtype=np.float64)


K = args.edit_steps
VARIANTS = {  # name -> edit() settings; the first is the default edit
    f"maps (K={K}) + local blend": dict(edit_steps=K),
    f"maps (K={K}) + blend + attn1 (K)": dict(edit_steps=K, self_steps=K),
    f"maps (K={K}), no blend": dict(edit_steps=K, blend=False),
}
PLAIN = "without (plain B)"
results: dict[str, list] = {name: [] for name in [*VARIANTS, PLAIN]}
sheet = []
for i, (a, b, attribute, new) in enumerate(pairs):
    edits = {name: edit(pipe, a, b, i, steps=25, guidance=6.0, **kw) for name, kw in VARIANTS.items()}
    image_a = next(iter(edits.values())).image_a
    drawn = {name: result.image_b for name, result in edits.items()}
    # plain B: what edit(..., edit_steps=0) draws (bit for bit; tests/test_editing.py), without drawing A again
    drawn[PLAIN] = generate(pipe, b, i, steps=25, guidance=6.0, progress=False)[0].image
    pa, object_a = pixels(image_a), subject_pixels(image_a)
    for name, image_b in drawn.items():
        pb = pixels(image_b)
        far = ~dilate(object_a | subject_pixels(image_b), MARGIN)
        mad = float(np.abs(pa - pb).mean(-1)[far].mean()) if far.any() else float("nan")
        results[name].append((image_b, attribute, new, mad))
    if i < 8:
        sheet += [image_a, *drawn.values()]

print(f"{len(pairs)} pairs, 25 steps, guidance 6, seed = pair index")
for name, rows in results.items():
    mads = [r[3] for r in rows]
    line = f"{name:>34}: background |A - B| {np.nanmean(mads):5.2f} / 255 (target < 8)"
    if judge is not None:
        verdicts = judge.read([r[0] for r in rows])
        hits = [getattr(v, at) == new for v, (_, at, new, _) in zip(verdicts, rows, strict=True)]
        line += f", judge reads B's new colour/class in {np.mean(hits):.0%} (target >= 70%)"
    print(line)
if args.sheet:
    n = len(sheet) // (1 + len(results))
    labels = [f"{a} -> {new}" for a, _, _, new in pairs[:n]]
    make_grid(sheet, n, 1 + len(results), row_labels=labels, col_labels=["A", *results]).save(args.sheet)
    print(f"wrote {args.sheet}")
