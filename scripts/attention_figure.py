"""The issue-22 "Maps" figure: where the class word and the background word look at the last step.

For 40 prompts "a photo of a large {colour} {class} on a {bg} background" (colour backgrounds, colour !=
bg) drawn by the shipped base (25 steps, guidance 6, seed = prompt index), the share of each word's final
cross-attention mass (tune.attention) that falls on the object. Object mask, from the GENERATED image
(the judge gives no mask): pixels whose RGB distance from the background colour (the median of the
image's border pixels) is over the image's own split of those distances (Otsu's, held within 40-80 of 255),
averaged down to the map's grid (a cell's fraction of object pixels): `tune.attention.subject_mask`, which
`tune eval`'s trigger_on_subject uses too. Until stop 49 the split was a fixed 80, which missed most of an
object close to its background in colour (a brown block on red): 58.9% / 24.7% on the shipped base.

    python scripts/attention_figure.py [MODEL] [--device cpu|cuda]
"""

import sys

import numpy as np

from tune.attention import share_on_subject, subject_mask
from tune.models import load_pipeline
from tune.sampling import generate
from tune.world.spec import CLASSES, COLORS

args = [a for a in sys.argv[1:] if not a.startswith("--")]
device = "cuda" if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cuda" else "cpu"
pipe = load_pipeline(args[0] if args else "models/world-base").to(device)
pipe.set_progress_bar_config(disable=True)

rows = []
for i in range(40):
    colour, cls = COLORS[i % len(COLORS)], CLASSES[(i * 7) % len(CLASSES)]
    bg = COLORS[(i % len(COLORS) + 1 + (i // len(COLORS)) * 3) % len(COLORS)]
    rows.append((f"a photo of a large {colour} {cls} on a {bg} background", cls, bg))

samples = generate(
    pipe, [r[0] for r in rows], list(range(40)), paired=True, steps=25, guidance=6.0, attention=True
)


class_share, bg_share, coverage = [], [], []
for sample, (_, cls, bg) in zip(samples, rows, strict=True):
    maps = sample.attention
    coverage.append(float(subject_mask(sample.image, tuple(maps.maps.shape[2:])).mean()))
    for word, shares in ((cls, class_share), (bg, bg_share)):
        shares.append(share_on_subject(maps, word, sample.image, pipe.tokenizer))

print(
    f"map grid {tuple(samples[0].attention.maps.shape[2:])}, object covers {np.mean(coverage):.1%} of the image"
)
print(f"class word on object: {np.mean(class_share):.1%} (target >= 60%)")
print(f"background word on object: {np.mean(bg_share):.1%} (target <= 30%)")
