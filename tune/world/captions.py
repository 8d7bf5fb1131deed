"""Captions of the toy world: the canonical form, partial captions, paraphrases, made-up words, parsing.

The canonical caption (what evaluation prompts use)::

    {style} a {size} {colour phrase} {class} on {background}[ in the {position}]
    a photo of a large red ball on a blue background
    a pencil sketch of a small pink and teal striped ring on sand in the top left
    pixel art of a large blue ball with yellow spots on a rug
    a drawing of a small person with red hair in a blue striped shirt on grass in the center

Training captions (`training_captions`) mix it with partial captions (each attribute left out at
random, a toy's class sometimes just "toy"), paraphrases (the same phrases in another order) and
captions carrying a made-up word from `madeup_words` ("a photo of a qlv toy on sand") that does not
change the image: the model learns that a word it does not know means nothing yet, the weak prior a
DreamBooth identifier needs. `parse` reads the attributes back from any of these forms.
"""

from __future__ import annotations

import re
import string

import numpy as np

from tune.world.spec import BACKGROUNDS, CLASSES, COLORS, POSITIONS, STYLES, SURFACES, TOYS, Spec

STYLE_PREFIX = {
    "photo": "a photo of",
    "drawing": "a drawing of",
    "sketch": "a pencil sketch of",
    "pixel": "pixel art of",
}
STYLE_NOUN = {"photo": "photo", "drawing": "drawing", "sketch": "pencil sketch", "pixel": "pixel art"}
SURFACE_PHRASE = {"wooden table": "a wooden table", "grass": "grass", "sand": "sand", "rug": "a rug"}

RESERVED_WORDS = frozenset({"sks", "zwx", "ohwx", "xyz", "tok", "w", "v"})
"""Trigger words of the example subjects and of evaluations: never among the made-up training words."""

# Each optional part of a caption is left out of a partial caption with this probability.
DROP = {"style": 0.2, "size": 0.35, "color": 0.25, "background": 0.25, "position": 0.35, "hair": 0.3}
TOY_WORD = 0.3
"""Share of partial captions that call a toy just "toy"."""


def article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def background_phrase(background: str) -> str:
    return SURFACE_PHRASE.get(background) or f"{article(background)} {background} background"


def object_phrase(
    spec: Spec,
    *,
    size: bool = True,
    color: bool = True,
    hair: bool = True,
    noun: str | None = None,
    word: str | None = None,
) -> str:
    """'large red ball', 'small pink and teal striped ring', 'blue ball with yellow spots',
    'person with red hair in a blue striped shirt' (without article); parts can be left out, and a
    `word` goes right before the noun ('red qlv ball', as 'a sks dog')."""
    lead = f"{spec.size} " if size else ""
    noun = f"{word} {noun or spec.cls}" if word else noun
    if spec.cls == "person":
        words = [f"{lead}{noun or 'person'}"]
        if hair and spec.hair:
            words.append(f"with {spec.hair} hair")
        if color:
            if spec.pattern == "striped":
                words.append(f"in a {spec.color} and {spec.color2} striped shirt")
            elif spec.pattern == "spotted":
                words.append(f"in {article(spec.color)} {spec.color} shirt with {spec.color2} spots")
            else:
                words.append(f"in {article(spec.color)} {spec.color} shirt")
        return " ".join(words)
    noun = noun or spec.cls
    if not color:
        return f"{lead}{noun}"
    if spec.pattern == "striped":
        return f"{lead}{spec.color} and {spec.color2} striped {noun}"
    if spec.pattern == "spotted":
        return f"{lead}{spec.color} {noun} with {spec.color2} spots"
    return f"{lead}{spec.color} {noun}"


def where(spec: Spec) -> str:
    return f" in the {spec.position}" if spec.size == "small" else ""


def caption(spec: Spec) -> str:
    """The canonical caption."""
    obj = object_phrase(spec)
    return f"{STYLE_PREFIX[spec.style]} {article(obj)} {obj} on {background_phrase(spec.background)}{where(spec)}"


def partial_caption(spec: Spec, rng: np.random.Generator, word: str | None = None) -> str:
    """A caption with some attributes left out (never the object itself); `word` is put in front of the
    object phrase, as a DreamBooth identifier would be ("a photo of qlv toy", "a qlv red ball")."""
    keep = {k: rng.random() >= p for k, p in DROP.items()}
    noun = "toy" if spec.cls in TOYS and rng.random() < TOY_WORD else None
    obj = object_phrase(spec, size=keep["size"], color=keep["color"], hair=keep["hair"], noun=noun, word=word)
    obj = f"{article(obj)} {obj}"
    text = f"{STYLE_PREFIX[spec.style]} {obj}" if keep["style"] else obj
    if keep["background"]:
        text += f" on {background_phrase(spec.background)}"
    if keep["position"]:
        text += where(spec)
    return text


def paraphrase(spec: Spec, rng: np.random.Generator) -> str:
    """The canonical caption's phrases in another order."""
    obj = object_phrase(spec)
    obj = f"{article(obj)} {obj}"
    bg, noun = background_phrase(spec.background), STYLE_NOUN[spec.style]
    templates = (
        f"{obj} on {bg}{where(spec)}, {noun}",
        f"{STYLE_PREFIX[spec.style]} {obj}{where(spec)}, on {bg}",
        f"{noun}: {obj} on {bg}{where(spec)}",
    )
    return templates[int(rng.integers(len(templates)))]


def madeup_words(count: int = 4000, seed: int = 0) -> tuple[str, ...]:
    """A fixed pool of made-up words (3-5 letters, some all consonants like 'sks'); none is a word the
    captions use or in `RESERVED_WORDS`."""
    rng = np.random.default_rng(seed)
    consonants, vowels = "bcdfghjklmnpqrstvwxz", "aeiouy"
    taken = set(RESERVED_WORDS) | set(vocabulary())
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        shape = ("ccc", "cvc", "cvcc", "ccvc", "cvcv", "cvccv")[int(rng.integers(6))]
        word = "".join(rng.choice(list(consonants if k == "c" else vowels)) for k in shape)
        if word not in taken and word not in seen:
            seen.add(word)
            words.append(word)
    return tuple(words)


def vocabulary() -> list[str]:
    """Every word the world's captions use (for the tokenizer and for `madeup_words`' exclusions)."""
    words = set(" ".join(STYLE_PREFIX.values()).split()) | set(" ".join(SURFACE_PHRASE.values()).split())
    words |= set(COLORS) | set(CLASSES) | {"toy", "small", "large", "an", "on", "background", "in", "the"}
    words |= set(" ".join(POSITIONS).split()) | {"with", "hair", "shirt", "striped", "spots", "and", "person"}
    words |= {"pencil", "sketch", "pixel", "art", "there", "is"}
    return sorted(words)


def identifier_caption(spec: Spec, word: str, rng: np.random.Generator) -> str:
    """A DreamBooth-style caption: '{style} {word} {noun}' ('a photo of qlv toy', 'a drawing of zbm
    person on sand'), the background and position kept at random."""
    noun = "person" if spec.cls == "person" else ("toy" if rng.random() < 0.5 else spec.cls)
    text = f"{STYLE_PREFIX[spec.style]} {word} {noun}"
    if rng.random() >= DROP["background"]:
        text += f" on {background_phrase(spec.background)}"
    if rng.random() >= DROP["position"]:
        text += where(spec)
    return text


def training_captions(spec: Spec, rng: np.random.Generator, words: tuple[str, ...]) -> list[str]:
    """Eight captions of one image, drawn from uniformly at training time: the canonical one twice, three
    partial, one paraphrase, and two with a made-up word from `words` (a partial caption, and the
    DreamBooth form '{style} {word} {noun}')."""
    canonical = caption(spec)
    return [
        canonical,
        canonical,
        *(partial_caption(spec, rng) for _ in range(3)),
        paraphrase(spec, rng),
        partial_caption(spec, rng, word=words[int(rng.integers(len(words)))]),
        identifier_caption(spec, words[int(rng.integers(len(words)))], rng),
    ]


# ---------------------------------------------------------------------------------------------
# Parsing: a caption or prompt back to the attributes it names
# ---------------------------------------------------------------------------------------------

_C = "|".join(COLORS)
_N = "|".join((*CLASSES, "toy"))
_STRIPED = re.compile(rf"\b({_C}) and ({_C}) striped ({_N})\b")
_SPOTTED = re.compile(rf"\b({_C}) ({_N}) with ({_C}) spots\b")
_PLAIN = re.compile(rf"\b({_C}) ({_N})\b")
_SHIRT = re.compile(rf"\bin an? ({_C})(?: and ({_C}) striped)? shirt(?: with ({_C}) spots)?")
_HAIR = re.compile(rf"\bwith ({_C}) hair\b")
_COLOR_BG = re.compile(rf"\bon an? ({_C}) background\b")
_SURFACE = re.compile(r"\bon (?:an? )?(wooden table|grass|sand|rug)\b")
_POSITION = re.compile(r"\bin the (center|top left|top right|bottom left|bottom right)\b")
_SIZE = re.compile(r"\b(small|large)\b")
_NOUN = re.compile(rf"\b({_N})\b")


def parse(text: str) -> dict[str, str]:
    """The attributes a caption names: any of style, cls ('toy' when only the common noun is given),
    color, pattern, color2, hair, background, size, position. Unknown words are ignored."""
    text = " ".join(
        text.lower().translate(str.maketrans("", "", "".join(set(string.punctuation) - {":"}))).split()
    )
    out: dict[str, str] = {}
    for style in STYLES:
        prefix, noun = STYLE_PREFIX[style], STYLE_NOUN[style]
        if text.startswith(prefix) or text.endswith(f" {noun}") or text.startswith(f"{noun}:"):
            out["style"] = style
    if m := _SIZE.search(text):
        out["size"] = m.group(1)
    if m := _POSITION.search(text):
        out["position"] = m.group(1)
    if m := _COLOR_BG.search(text):
        out["background"] = m.group(1)
    elif m := _SURFACE.search(text):
        out["background"] = m.group(1)
    if re.search(r"\bperson\b", text):
        out["cls"] = "person"
        if m := _HAIR.search(text):
            out["hair"] = m.group(1)
        if m := _SHIRT.search(text):
            out["color"] = m.group(1)
            out["pattern"], c2 = (
                ("striped", m.group(2))
                if m.group(2)
                else ("spotted", m.group(3))
                if m.group(3)
                else ("plain", None)
            )
            if c2:
                out["color2"] = c2
        return out
    body = _COLOR_BG.sub(" ", text)
    if m := _STRIPED.search(body):
        out.update(color=m.group(1), color2=m.group(2), pattern="striped", cls=m.group(3))
    elif m := _SPOTTED.search(body):
        out.update(color=m.group(1), cls=m.group(2), color2=m.group(3), pattern="spotted")
    elif m := _PLAIN.search(body):
        out.update(color=m.group(1), cls=m.group(2), pattern="plain")
    elif m := _NOUN.search(body):
        out["cls"] = m.group(1)
    return out


def spec_attributes(spec: Spec) -> dict[str, str]:
    """What `parse(caption(spec))` gives: the spec's attributes as strings (None ones left out)."""
    out = {
        "style": spec.style,
        "cls": spec.cls,
        "color": spec.color,
        "pattern": spec.pattern,
        "background": spec.background,
        "size": spec.size,
    }
    if spec.size == "small":
        out["position"] = spec.position
    if spec.color2:
        out["color2"] = spec.color2
    if spec.hair:
        out["hair"] = spec.hair
    return out


assert set(BACKGROUNDS) == set(COLORS) | set(SURFACES)
