"""The offline CLIP-style tokenizer: loadable by plain transformers, deterministic, no unknown tokens."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from tune.models.tokenizer import DEFAULT_CORPUS, MIN_VOCAB_SIZE, build_clip_tokenizer

FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_clip_tokenizer(DEFAULT_CORPUS, 1280, path)
    return path


def test_loads_with_plain_clip_tokenizer(tokenizer_dir: Path) -> None:
    for name in FILES:
        assert (tokenizer_dir / name).is_file(), name
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    # CLIP's layout: bos and eos are the last two ids.
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1)

    ids = tok("A photo of SKS dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    tokens = tok.convert_ids_to_tokens(ids[1:6])
    # Lower-cased, `</w>` suffixed, and common prompt words are single tokens.
    assert tokens == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert ids[6:] == [tok.eos_token_id] * 71


def test_classic_files_alone_give_the_same_tokens(tokenizer_dir: Path, tmp_path: Path) -> None:
    # vocab.json + merges.txt is what SD1.5's tokenizer folder holds and older tools read.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    text = "a watercolor painting of a purple star, top-left; zebra #42"
    full = CLIPTokenizer.from_pretrained(tokenizer_dir)
    classic = CLIPTokenizer.from_pretrained(tmp_path)
    assert classic(text).input_ids == full(text).input_ids


def test_every_printable_character_has_a_token(tokenizer_dir: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    specials = {tok.bos_token_id, tok.eos_token_id}
    for char in string.printable.strip():
        inner = tok(char).input_ids[1:-1]
        assert inner and not specials & set(inner), repr(char)
    # Unseen words and non-ASCII text fall back to byte pieces, never to the unk token.
    inner = tok("zyzzyva ünïcödé 日本").input_ids[1:-1]
    assert tok.unk_token_id not in inner
    assert tok.decode(tok("zyzzyva ünïcödé").input_ids, skip_special_tokens=True) == "zyzzyva ünïcödé"


def test_same_texts_give_identical_files(tmp_path: Path) -> None:
    texts = ["a photo of a red circle", "a sketch of a blue square on a white background"] * 3
    build_clip_tokenizer(texts, 600, tmp_path / "a")
    build_clip_tokenizer(list(reversed(texts)), 600, tmp_path / "b")
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_vocab_size_is_a_ceiling(tmp_path: Path) -> None:
    tok = build_clip_tokenizer(DEFAULT_CORPUS, MIN_VOCAB_SIZE + 10, tmp_path / "few")
    assert len(tok) == MIN_VOCAB_SIZE + 10
    # A two-word corpus runs out of merges long before 5,000 tokens.
    tok = build_clip_tokenizer(["red circle"], 5000, tmp_path / "exhausted")
    assert MIN_VOCAB_SIZE < len(tok) < 530
    assert tok.convert_ids_to_tokens(tok("red circle").input_ids[1:-1]) == ["red</w>", "circle</w>"]


def test_rejects_vocab_smaller_than_the_byte_alphabet(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 514"):
        build_clip_tokenizer(["a"], 300, tmp_path)
