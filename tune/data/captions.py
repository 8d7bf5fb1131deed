"""Captions: sidecar files, and the per-step caption augmentations (shuffle, keep-N, dropout).

Where a caption comes from (documented choice, what a DreamBooth user expects):
- an instance prompt, when one is given, is the caption of every photo in that folder, except where the
  photo's sidecar contains the instance prompt and says more ("a photo of sks toy on sand" for the prompt
  "a photo of sks toy"): then the sidecar is its caption, so that what differs between the photos (the
  surface, the light) is named and not bound to the new token. Other sidecars are ignored (the loader
  logs how many): DreamBooth binds the token to that prompt, and a stray `IMG_0001.txt` from a phone
  backup must not change it;
- a class image (prior preservation) is captioned by its sidecar when it has one, whatever it says (the
  class images a recipe draws for several prompts carry the prompt each was drawn for: "a drawing of toy"),
  else by the class prompt;
- otherwise `<stem>.txt`, else `<stem>.caption`, next to the photo;
- otherwise the empty caption (the loader warns with a count: the model then learns these photos
  unconditionally).
"""

from __future__ import annotations

import random
from pathlib import Path

from tune.errors import DataError

CAPTION_EXTENSIONS = (".txt", ".caption")
"""Sidecar suffixes, in order of preference when a photo has both."""


def sidecar_path(image_path: Path) -> Path | None:
    """The caption sidecar of a photo (`photo.txt`, else `photo.caption`), or None."""
    for ext in CAPTION_EXTENSIONS:
        candidate = image_path.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def instance_caption(image_path: Path, instance_prompt: str) -> tuple[str, bool]:
    """(caption, from the sidecar) of a photo captioned by `instance_prompt`: its sidecar when the sidecar
    contains the prompt (case and spacing aside), else the prompt (an unreadable sidecar is ignored too)."""
    try:
        sidecar = read_sidecar(image_path)
    except DataError:
        return instance_prompt, False
    prompt = " ".join(instance_prompt.split()).lower()
    if sidecar and prompt in sidecar.lower():
        return sidecar, True
    return instance_prompt, False


def class_image_caption(image_path: Path, class_prompt: str) -> tuple[str, bool]:
    """(caption, from the sidecar) of a class image: its sidecar when it has a readable, non-empty one (the
    prompt it was drawn for), else the class prompt."""
    try:
        sidecar = read_sidecar(image_path)
    except DataError:
        return class_prompt, False
    return (sidecar, True) if sidecar else (class_prompt, False)


def read_sidecar(image_path: Path) -> str | None:
    """The caption in a photo's sidecar, whitespace collapsed; None when there is no sidecar.

    Read as UTF-8 (a BOM is dropped). Other encodings are an error naming the file rather than a caption
    with U+FFFD in it: the model would learn the mangled word. An empty sidecar is an empty caption.
    """
    path = sidecar_path(image_path)
    if path is None:
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"caption file {path} is not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None
    return " ".join(text.split())


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def transform_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    dropout: float = 0.0,
) -> str:
    """One training step's version of a caption.

    - dropout: with probability `dropout` the caption becomes "" (classifier-free guidance training);
    - shuffle: comma-separated tags are shuffled, the first `keep_tokens` tags stay first in order
      (the trigger word usually leads, and must keep its place).

    The dropout draw happens first and always, so the shuffle's random stream does not depend on
    whether the caption was dropped.
    """
    dropped = rng.random() < dropout
    if shuffle:
        tags = split_tags(caption)
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return "" if dropped else caption
