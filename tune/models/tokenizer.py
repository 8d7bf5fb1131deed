"""Build a small CLIP-style BPE tokenizer offline.

Our own base models are trained from scratch, so they do not need OpenAI's 49,408-token vocabulary
(which would also have to be downloaded). Instead we learn a few hundred BPE merges on a list of
texts and save them in the same layout as SD1.5's `tokenizer/` folder, so that plain
`transformers.CLIPTokenizer.from_pretrained(folder)` (and diffusers, A1111, ComfyUI) load it.

Layout of the vocabulary, copied from CLIP so tools that assume it keep working:

    ids 0..255      the 256 byte-level symbols (GPT-2's bytes-to-unicode table, in byte order)
    ids 256..511    the same symbols with the `</w>` end-of-word suffix
    ids 512..       one token per learned merge, in merge order
    last two ids    `<|startoftext|>` (bos) and `<|endoftext|>` (eos, pad and unk)

Because every byte has a symbol with and without `</w>`, any text tokenizes without unknown tokens.

Merges are learned here in Python rather than with `tokenizers.trainers.BpeTrainer`: that trainer's
tie-breaking depends on hash-map iteration order, and we want byte-identical files from the same
texts. Normalization and pre-tokenization are taken from `CLIPTokenizer`'s own `tokenizers` backend,
so training sees exactly the words the tokenizer will later see.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
# 256 byte symbols, 256 suffixed byte symbols, bos, eos.
MIN_VOCAB_SIZE = 2 * 256 + 2

# Words that ordinary prompts for our presets and example concepts use. Not meant to be complete:
# anything else still tokenizes, just into more pieces.
DEFAULT_CORPUS: tuple[str, ...] = tuple(
    """
    a an the of on in at to with and or by for from into onto over under above below behind near next
    beside between across through around against without is are was be been being it its this that
    these those there here one two three four five six seven eight nine ten many few some several
    single pair group photo photograph picture image render rendering illustration drawing painting
    portrait closeup close up shot view scene detailed highly sharp focus blurry soft hard high low
    quality best worst resolution masterpiece simple plain clean empty busy background foreground
    backdrop wall floor table ground sky grass water sand snow road street room studio light lighting
    dark bright shadow sunlight night day morning evening color colour colored coloured colorful red
    green blue yellow purple orange white black gray grey pink brown cyan magenta gold silver beige
    teal navy violet shape shapes circle circles square squares triangle triangles star stars rectangle
    ellipse oval diamond hexagon line lines dot dots stripe stripes pattern grid ring heart cross arrow
    small large big tiny huge medium little tall short wide narrow thin thick long round flat solid
    hollow filled outline top bottom left right center centre middle corner edge side front back
    upper lower centered inside outside toy toys dog dogs cat cats person people man woman boy girl
    child baby face hand eyes hair smile smiling sitting standing running walking lying jumping
    playing holding wearing looking bird fish horse cow car house tree flower flowers mountain river
    lake beach forest city town building bridge boat train chair cup bottle ball box book hat shirt
    dress shoes glasses backpack teddy bear robot plush wooden metal plastic glass paper stone fabric
    style styles painted painterly watercolor watercolour oil acrylic sketch pencil charcoal ink pen
    cartoon anime comic pixel art artwork digital realistic photorealistic abstract minimal
    minimalist vintage retro modern cinematic film analog camera lens bokeh macro wide angle
    sks xyz token concept object subject thing character
    """.split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return dict(sorted(mapping.items()))


def _count_words(texts: Iterable[str]) -> Counter[str]:
    """Split texts exactly as CLIPTokenizer will (NFC, lowercase, CLIP's regex, byte-level)."""
    backend = CLIPTokenizer().backend_tokenizer
    assert backend.normalizer is not None and backend.pre_tokenizer is not None
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text)
        counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def _learn_merges(word_counts: Counter[str], max_merges: int) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair; ties go to the smallest pair.

    Words are sequences of symbols with `</w>` on the last one, matching how `tokenizers`' BPE model
    applies `end_of_word_suffix`.
    """
    words: list[list[str]] = []
    freqs: list[int] = []
    for word, count in sorted(word_counts.items()):
        words.append([*word[:-1], word[-1] + END_OF_WORD])
        freqs.append(count)

    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:], strict=False):
            pair_counts[pair] += freqs[i]
            pair_words[pair].add(i)

    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        live = [p for p, c in pair_counts.items() if c > 0]
        if not live:
            break
        best = min(live, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        for i in sorted(pair_words.pop(best, set())):
            symbols = words[i]
            for pair in zip(symbols, symbols[1:], strict=False):
                pair_counts[pair] -= freqs[i]
            out: list[str] = []
            j = 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:], strict=False):
                pair_counts[pair] += freqs[i]
                pair_words[pair].add(i)
        pair_counts.pop(best, None)
    return merges


def build_clip_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> CLIPTokenizer:
    """Learn a CLIP-style BPE vocabulary of at most `vocab_size` tokens and save it to `out_dir`.

    The folder holds `vocab.json`, `merges.txt` (what SD1.5's tokenizer folder has and slow
    tokenizers read), `tokenizer.json` (what transformers 5 reads first), `tokenizer_config.json` and
    `special_tokens_map.json`. The same texts and size always give byte-identical files. The
    vocabulary can end up smaller than `vocab_size` when the texts run out of pairs to merge.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (bytes + suffixed bytes + 2 specials); got {vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + END_OF_WORD for s in symbols]:
        vocab[token] = len(vocab)

    merges = _learn_merges(_count_words(texts), max_merges=vocab_size - MIN_VOCAB_SIZE)
    for a, b in merges:
        # Different merges can spell the same token ("a"+"bc", "ab"+"c"); the token keeps one id.
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(out)
    # save_pretrained in transformers 5 writes only tokenizer.json + tokenizer_config.json; the
    # classic files keep the folder loadable by older transformers and by non-HF tools.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    logger.debug("built tokenizer with %d tokens (%d merges) in %s", len(vocab), len(merges), out)
    return CLIPTokenizer.from_pretrained(out)
