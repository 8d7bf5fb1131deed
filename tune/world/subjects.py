"""Example subjects: instances of the world the base model has never seen, and their photos.

* `sks-toy`: "sks toy", a pink ring with teal stripes (every pink-and-teal striped ring is held out);
* `w-person`: "w person", a person with green hair in a yellow shirt with purple spots;
* three more (a yellow cup with purple spots, a blue and orange striped cone, a red ball with white
  spots) that show the default settings are not tuned to one subject.

Each subject's photos are rendered in the world's photo style on assorted surfaces, at assorted
sizes and aspect ratios (`write_photos`); `Subject.found(verdict)` says whether the judge sees it
(in a sketch, which has no colours, by class and pattern alone).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from tune.data.masks import mask_path
from tune.errors import DataError
from tune.world.captions import STYLE_PREFIX, background_phrase, object_phrase
from tune.world.render import object_mask, render
from tune.world.spec import COLORS, HELDOUT_LOOKS, Spec, allowed


@dataclass(frozen=True)
class Subject:
    name: str
    """Folder name under concepts/."""
    token: str
    """The made-up word that will mean the subject ("sks")."""
    class_word: str
    """Its class noun in prompts: "toy" or "person"."""
    cls: str
    color: str
    pattern: str
    color2: str | None
    hair: str | None = None
    either_order: bool = False
    """The two colours may be read either way round (a small ring's stripes, a third of it, can read as its colour)."""

    def spec(
        self, background: str, style: str = "photo", size: str = "large", position: str = "center"
    ) -> Spec:
        return Spec(
            cls=self.cls,  # type: ignore[arg-type]
            color=self.color,  # type: ignore[arg-type]
            pattern=self.pattern,  # type: ignore[arg-type]
            color2=self.color2,  # type: ignore[arg-type]
            hair=self.hair,  # type: ignore[arg-type]
            background=background,
            style=style,  # type: ignore[arg-type]
            size=size,  # type: ignore[arg-type]
            position=position if size == "small" else "center",  # type: ignore[arg-type]
        )

    @property
    def description(self) -> str:
        return object_phrase(self.spec("grey"), size=False)

    def found(self, verdict) -> bool:  # noqa: ANN001 - a tune.world.judge.Verdict
        """Whether a judge's verdict shows this subject: class and pattern always; colours (and hair)
        where the picture's style shows colours."""
        if verdict.cls != self.cls or verdict.pattern != self.pattern:
            return False
        if verdict.color is None:  # a sketch: no colours to check
            return True
        colors = (verdict.color, verdict.color2)
        wanted = (self.color, self.color2)
        ok = colors == wanted or (self.either_order and colors == wanted[::-1])
        return ok and (self.hair is None or verdict.hair == self.hair)


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("sks-toy", "sks", "toy", "ring", "pink", "striped", "teal", either_order=True),
        Subject("w-person", "w", "person", "person", "yellow", "spotted", "purple", hair="green"),
        Subject("yellow-cup", "zqv", "toy", "cup", "yellow", "spotted", "purple"),
        Subject("blue-cone", "vbk", "toy", "cone", "blue", "striped", "orange"),
        Subject("red-ball", "fmt", "toy", "ball", "red", "spotted", "white"),
    )
}
assert {(s.cls, s.color, s.pattern, s.color2, s.hair) for s in SUBJECTS.values()} <= set(HELDOUT_LOOKS)

PHOTO_LAYOUT: tuple[tuple[int, int, str, str], ...] = (
    (512, 512, "wooden table", "large"),
    (640, 480, "sand", "large"),
    (384, 512, "grey", "large"),
    (96, 96, "grass", "large"),
    (320, 240, "rug", "small"),
    (240, 320, "white", "large"),
    (448, 336, "brown", "large"),
    (256, 256, "blue", "small"),
    (360, 480, "wooden table", "large"),
    (160, 128, "black", "large"),
)
"""(width, height, background, size) of a subject's photos, in file order: square, landscape and
portrait, 96 to 640 pixels; four surfaces and five colours, mostly large."""
SPARE_BACKGROUNDS = ("teal", "orange", "purple", "sand", "grey")
"""Used in order when a layout's background clashes with the subject's colours."""
JPEG_QUALITY = 85


def photo_spec(subject: Subject, index: int) -> tuple[int, int, Spec]:
    width, height, background, size = PHOTO_LAYOUT[index % len(PHOTO_LAYOUT)]
    for bg in (background, *SPARE_BACKGROUNDS):
        spec = subject.spec(bg, size=size, position="center")
        if allowed(spec):
            return width, height, spec
    raise AssertionError(f"no background fits {subject.name}")


def render_photo(subject: Subject, index: int, seed: int = 0) -> Image.Image:
    """Photo `index` of a subject (before JPEG): size and background from `PHOTO_LAYOUT`, jitter from
    a generator seeded with (seed, index)."""
    width, height, spec = photo_spec(subject, index)
    return render(spec, _photo_rng(seed, index), width, height)


def render_photo_mask(subject: Subject, index: int, seed: int = 0) -> Image.Image:
    """Where the subject is in photo `index` (`render_photo`'s same draw): its `-masklabel.png`, white on
    the object (tune.data.masks)."""
    width, height, spec = photo_spec(subject, index)
    mask = object_mask(spec, _photo_rng(seed, index), width, height)
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def _photo_rng(seed: int, index: int) -> np.random.Generator:
    """The generator photo `index` is drawn with (its jitter), the same for the photo and its mask."""
    return np.random.default_rng([seed, index, 17])


def photo_names(subject: Subject, count: int) -> list[str]:
    return [f"{subject.name.replace('-', '_')}_{i:02d}.jpg" for i in range(count)]


def photo_caption(subject: Subject, index: int) -> str:
    """Photo `index`'s caption sidecar: the concepts' instance prompt ("a photo of sks toy") and the
    surface it stands on, so that training binds the token to the subject and not to the surfaces."""
    _, _, spec = photo_spec(subject, index)
    prefix = STYLE_PREFIX[spec.style]  # "a photo of": the photos' own style, from the captions' table
    return f"{prefix} {subject.token} {subject.class_word} on {background_phrase(spec.background)}"


def write_photos(
    subject: Subject, out_dir: str | Path, count: int = 10, seed: int = 0, *, overwrite: bool = False
) -> list[Path]:
    """Write `count` JPEGs of the subject into `out_dir` (the same seed gives the same files), each with
    its caption sidecar (`photo_caption`, <stem>.txt) and its subject mask (`render_photo_mask`,
    <stem>-masklabel.png). Existing files of those names are an error unless `overwrite`; other files are
    left alone."""
    if count <= 0:
        raise ValueError(f"count must be > 0; got {count}")
    out = Path(out_dir)
    paths = [out / name for name in photo_names(subject, count)]
    existing = [p for p in paths if p.exists() or p.with_suffix(".txt").exists() or mask_path(p).exists()]
    if existing and not overwrite:
        raise DataError(
            f"{len(existing)} photo(s) already exist in {out} (e.g. {existing[0].name}); pass --force to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(paths):
        render_photo(subject, index, seed).save(path, "JPEG", quality=JPEG_QUALITY)
        path.with_suffix(".txt").write_text(photo_caption(subject, index) + "\n")
        render_photo_mask(subject, index, seed).save(mask_path(path))
    return paths


def look_alikes(subject: Subject) -> list[Spec]:
    """The subject's look with one part changed (a colour, the pattern, the hair, or the class), on
    assorted scenes: what the judge must not take for the subject."""
    base = subject.spec("grey")
    changes: list[dict] = [dict(color=c) for c in COLORS if c not in (subject.color, subject.color2)]
    changes += [dict(color2=c) for c in COLORS if c not in (subject.color, subject.color2)]
    other = "spotted" if subject.pattern == "striped" else "striped"
    changes += [dict(pattern=other), dict(pattern="plain", color2=None)]
    if subject.hair:
        changes += [dict(hair=c) for c in COLORS if c != subject.hair]
    else:
        changes += [dict(cls=c) for c in ("ball", "cup", "cone", "block") if c != subject.cls]
    specs = []
    for i, change in enumerate(changes):
        try:
            spec = replace(base, **change, background=("grey", "wooden table", "white", "sand")[i % 4])
        except ValueError:
            continue
        if allowed(spec):
            specs.append(spec)
    return specs
