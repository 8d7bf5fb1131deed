"""(Re)write the example concept's photos, `concepts/sks-toy/photos/`, deterministically.

    python scripts/make_example_concept.py                  # the shipped photos: seed 0, 10 files
    python scripts/make_example_concept.py --force          # overwrite them (same seed, same bytes)
    python scripts/make_example_concept.py --out /tmp/toy --seed 1 --count 4 --sheet /tmp/toy.png

Existing photos of the same names are an error unless --force; other files in the folder are left.
The pictures come from `tune.data.example_concept.render_concept_photo(index, seed)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from tune import PROJECT_ROOT
from tune.data.example_concept import CONCEPT_PHOTOS, contact_sheet, write_concept_photos
from tune.errors import TuneError

DEFAULT_OUT = PROJECT_ROOT / "concepts" / "sks-toy" / "photos"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"photo folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the pictures (default: 0, the shipped one)"
    )
    parser.add_argument(
        "--count",
        type=int,
        default=len(CONCEPT_PHOTOS),
        help=f"number of photos (default: {len(CONCEPT_PHOTOS)})",
    )
    parser.add_argument("--force", action="store_true", help="overwrite photos that already exist")
    parser.add_argument("--sheet", type=Path, help="also write a contact sheet PNG of the photos here")
    args = parser.parse_args(argv)
    try:
        paths = write_concept_photos(args.out, args.count, args.seed, overwrite=args.force)
    except (TuneError, ValueError) as e:
        print(f"make_example_concept: error: {e}", file=sys.stderr)
        return 2
    total_kb = sum(p.stat().st_size for p in paths) / 1024
    print(f"wrote {len(paths)} photos ({total_kb:.0f} KB) to {args.out}")
    if args.sheet is not None:
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        contact_sheet(images).save(args.sheet)
        print(f"contact sheet: {args.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
