"""Can the base draw each example subject when the prompt spells its look out in words?

    python bench/described_subjects.py [--base models/world-base] [--subjects ...] [--guidance 5 2]
        [--name NAME]

Textual inversion trains only a word: the model stays the base, so it can only find a look the base can
draw. This draws, for each subject of `tune.world.subjects.SUBJECTS`, the backgrounds suite's prompts with
the subject described instead of named ("a photo of a person with green hair in a yellow shirt with purple
spots on a red background"), at the suite's seeds and steps, and the world judge reads them: subject found,
and how often each part of the look comes out (class, colour, pattern, second colour, hair). A subject
the base cannot draw from its description is out of textual inversion's reach on that base. Prints one
row per subject and guidance; writes bench/results/described-subjects-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("cls", "color", "pattern", "color2", "hair")


def score(subject: Any, verdicts: Sequence[Any]) -> tuple[float, dict[str, float]]:
    """(share of `verdicts` that show the subject, share that read each part of its look right); the
    parts the subject has (no hair for a toy, no second colour for a plain one)."""
    parts = {
        part: sum(getattr(v, part) == getattr(subject, part) for v in verdicts) / len(verdicts)
        for part in PARTS
        if getattr(subject, part) is not None
    }
    return sum(subject.found(v) for v in verdicts) / len(verdicts), parts


def main() -> None:
    from tune.evaluation import load_suite
    from tune.models import load_pipeline
    from tune.sampling import generate
    from tune.world.captions import article
    from tune.world.judge import load_judge
    from tune.world.subjects import SUBJECTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="models/world-base")
    parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=sorted(SUBJECTS))
    parser.add_argument("--guidance", nargs="+", type=float, default=[5.0, 2.0])
    parser.add_argument("--name", default="world-base")
    args = parser.parse_args()

    suite = load_suite("backgrounds")  # its prompts, seeds and steps; the guidance is --guidance's
    pipe = load_pipeline(args.base)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    rows = []
    for name in args.subjects:
        subject = SUBJECTS[name]
        named = f"{article(subject.description)} {subject.description}"  # "a photo of {token} {class}" spelled out
        prompts = [p.replace("{token} {class}", named) for p in suite.prompts for _ in suite.seeds]
        seeds = [s for _ in suite.prompts for s in suite.seeds]
        for guidance in args.guidance:
            samples = generate(pipe, prompts, seeds, paired=True, steps=suite.steps, guidance=guidance)
            found, parts = score(subject, judge.read([s.image for s in samples]))
            rows.append(
                {"subject": name, "prompt": prompts[0], "guidance": guidance, "found": found, **parts}
            )
            shown = "  ".join(f"{part} {share:.0%}" for part, share in parts.items())
            print(f"{name:10s} guidance {guidance:g}: found {found:.1%}   parts right: {shown}", flush=True)
    out = ROOT / "bench" / "results" / f"described-subjects-{args.name}.json"
    out.write_text(
        json.dumps({"base": args.base, "images_per_row": len(prompts), "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
