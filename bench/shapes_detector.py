"""How often the shapes attribute detector agrees with the generator, per attribute.

    python bench/shapes_detector.py [--count 5000] [--seed 1234] [--robustness]

Renders `count` images of the "all" split per condition (default jitter) and prints one row per
condition: per-attribute accuracy, all-correct rate and milliseconds per detection. The required
conditions are "clean" and "noise 8" (slight Gaussian noise, `noise_std=8` in 0-255 levels);
`--robustness` adds the distortions model samples show (stronger noise, blur, colour drift,
other resolutions), which have no target but show where the detector's margins end.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from tune.data.shapes import build_sample
from tune.data.shapes_detect import ATTRIBUTES, detect


@dataclass(frozen=True)
class Condition:
    name: str
    noise_std: float = 0.0
    resolution: int = 64
    distort: Callable[[Image.Image, np.random.Generator], Image.Image] | None = None


def blur(radius_at_64: float) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    def apply(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius_at_64 * image.width / 64))

    return apply


def drift(levels: float) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    """Shift each channel of the whole image by U(-levels, levels): a colour cast."""

    def apply(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float32) + rng.uniform(-levels, levels, size=3)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")

    return apply


REQUIRED = [Condition("clean"), Condition("noise 8", noise_std=8.0)]
ROBUSTNESS = [
    Condition("noise 16", noise_std=16.0),
    Condition("blur 1.0", distort=blur(1.0)),
    Condition("blur 1.5", distort=blur(1.5)),
    Condition("blur 2.0 + noise 8", noise_std=8.0, distort=blur(2.0)),
    Condition("drift +-20", distort=drift(20.0)),
    Condition(
        "blur 1 + noise 8 + drift 20", noise_std=8.0, distort=lambda im, r: drift(20.0)(blur(1.0)(im, r), r)
    ),
    Condition("32px", resolution=32),
    Condition("256px", resolution=256),
]


def measure(condition: Condition, count: int, seed: int) -> dict[str, float]:
    correct = dict.fromkeys(ATTRIBUTES, 0)
    all_correct = 0
    seconds = 0.0
    rng = np.random.default_rng(seed)
    for index in range(count):
        sample = build_sample(
            index, split="all", resolution=condition.resolution, seed=seed, noise_std=condition.noise_std
        )
        image = condition.distort(sample.image, rng) if condition.distort else sample.image
        start = time.perf_counter()
        detection = detect(image)
        seconds += time.perf_counter() - start
        matches = detection.matches(sample.spec)
        for name, ok in matches.items():
            correct[name] += ok
        all_correct += all(matches.values())
    return {
        **{name: correct[name] / count for name in ATTRIBUTES},
        "all": all_correct / count,
        "ms": 1000 * seconds / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="images per condition (default: 5000)")
    parser.add_argument("--seed", type=int, default=1234, help="generator seed (default: 1234)")
    parser.add_argument("--robustness", action="store_true", help="also run the distortion conditions")
    args = parser.parse_args()

    conditions = REQUIRED + (ROBUSTNESS if args.robustness else [])
    columns = [*ATTRIBUTES, "all", "ms"]
    print(f"detector accuracy over {args.count} images per condition (seed {args.seed}, split all)")
    print(f"{'condition':<30}" + "".join(f"{c:>9}" for c in columns))
    for condition in conditions:
        row = measure(condition, args.count, args.seed)
        cells = "".join(f"{row[c]:>9.2f}" if c == "ms" else f"{100 * row[c]:>8.2f}%" for c in columns)
        print(f"{condition.name:<30}{cells}", flush=True)


if __name__ == "__main__":
    main()
