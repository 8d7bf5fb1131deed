"""(Re)write an example subject's photos, `concepts/<name>/photos/`, deterministically.

    python scripts/make_subject_photos.py sks-toy             # the shipped photos: seed 0, 10 files
    python scripts/make_subject_photos.py w-person --force    # overwrite them (same seed, same bytes)
    python scripts/make_subject_photos.py yellow-cup --out /tmp/cup --count 8 --sheet /tmp/cup.png

Subjects are `tune.world.subjects.SUBJECTS` (sks-toy, w-person, yellow-cup, blue-cone, red-ball); the
photos are rendered in the world's photo style (`tune.world.subjects.render_photo`), each with its
caption and its subject mask (`<stem>-masklabel.png`, `render_photo_mask`). Existing photos of
the same names are an error unless --force; other files in the folder are left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from tune import PROJECT_ROOT
from tune.errors import TuneError
from tune.world.scoring import contact_sheet
from tune.world.subjects import SUBJECTS, write_photos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("subject", choices=sorted(SUBJECTS), help="which example subject")
    parser.add_argument("--out", type=Path, help="photo folder (default: concepts/<subject>/photos)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the pictures (default: 0, the shipped one)"
    )
    parser.add_argument("--count", type=int, default=10, help="number of photos (default: 10)")
    parser.add_argument("--force", action="store_true", help="overwrite photos that already exist")
    parser.add_argument("--sheet", type=Path, help="also write a contact sheet PNG of the photos here")
    args = parser.parse_args(argv)
    subject = SUBJECTS[args.subject]
    out = args.out or PROJECT_ROOT / "concepts" / subject.name / "photos"
    try:
        paths = write_photos(subject, out, args.count, args.seed, overwrite=args.force)
    except (TuneError, ValueError) as e:
        print(f"make_subject_photos: error: {e}", file=sys.stderr)
        return 2
    if args.sheet:
        thumbs = []
        for path in paths:
            with Image.open(path) as image:
                thumbs.append(image.convert("RGB").resize((64, 64), Image.Resampling.BOX))
        contact_sheet(thumbs, [p.name for p in paths], cols=5).save(args.sheet)
    print(f"wrote {len(paths)} photos of {subject.description} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
