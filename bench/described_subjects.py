"""Can the base draw each example subject when the prompt spells its look out in words?

    python bench/described_subjects.py [--base models/world-base] [--subjects ...] [--guidance 5 2]
        [--looks CLASS:COLOUR:PATTERN:COLOUR2:HAIR ...] [--name NAME]

Textual inversion trains only a word: the model stays the base, so it can only find a look the base can
draw. This draws, for each subject of `tune.world.subjects.SUBJECTS`, the backgrounds suite's prompts with
the subject described instead of named ("a photo of a person with green hair in a yellow shirt with purple
spots on a red background"), at the suite's seeds and steps, and the world judge reads them: subject found,
and how often each part of the look comes out (class, colour, pattern, second colour, hair). A subject
the base cannot draw from its description is out of textual inversion's reach on that base. Prints one
row per subject and guidance; writes bench/results/described-subjects-<name>.json.

`--looks` adds other looks of the world, drawn and read the same way, e.g. looks the base saw in training
("person:yellow:spotted:red:green": green hair, a yellow shirt with red spots; "person:yellow:plain::green"):
whether a miss is the held-out look's or every look of its kind's.
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


def score(subject: Any, verdicts: Sequence[Any]) -> tuple[float, dict[str, float]]:
    """(share of `verdicts` that show the subject, share that read each part of its look right: the parts
    the subject has, as `tune eval` reports them, `tune.metrics.look_parts`)."""
    from tune.metrics import LOOK_FIELDS, look_parts

    look = {part: getattr(subject, part) for part in LOOK_FIELDS}
    return sum(subject.found(v) for v in verdicts) / len(verdicts), look_parts(verdicts, look) or {}


def parse_look(text: str) -> Any:
    """A `Subject` with the look "class:colour:pattern:colour2:hair" (colour2 empty when plain, hair empty
    for a toy), named by that text."""
    from tune.world.spec import Spec
    from tune.world.subjects import Subject

    fields = text.split(":")
    if len(fields) != 5:
        raise argparse.ArgumentTypeError(f"a look is class:colour:pattern:colour2:hair; got {text!r}")
    cls, color, pattern, color2, hair = (f or None for f in fields)
    try:  # the world's own checks: known words, colour2 with a pattern only, hair on a person only
        Spec(cls=cls, color=color, background="grey", pattern=pattern, color2=color2, hair=hair)  # type: ignore[arg-type]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return Subject(text, "", "person" if cls == "person" else "toy", cls, color, pattern, color2, hair)  # type: ignore[arg-type]


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
    parser.add_argument("--looks", nargs="*", type=parse_look, default=[], help="more looks to describe")
    parser.add_argument("--name", default="world-base")
    args = parser.parse_args()

    suite = load_suite("backgrounds")  # its prompts, seeds and steps; the guidance is --guidance's
    pipe = load_pipeline(args.base)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge()
    rows = []
    for subject in [SUBJECTS[name] for name in args.subjects] + args.looks:
        name = subject.name
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
