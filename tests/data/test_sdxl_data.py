"""SDXL data: both tokenizers in the batch, the text cache's pooled embeds and two-encoder key, and class
images that keep their own sizes for the micro-conditioning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tune.data.config import DataConfig
from tune.data.loader import build_dataloader, build_dataset, cache_text
from tune.models import build_pipeline
from tune.models.conditioning import TextEncoders, add_time_ids

from data_testkit import save_photo

CFG = DataConfig(resolution=64, bucket_step=8, cache_text=True)


@pytest.fixture(scope="module")
def sdxl():
    return build_pipeline("tiny-sdxl-shallow", seed=0)


def ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def test_loader_tokenizes_with_both_tokenizers(photos: Path, sdxl) -> None:
    ds = build_dataset(photos, CFG, cache_dir=photos.parent / "cache")
    batch = next(
        iter(build_dataloader(ds, batch_size=2, tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2))
    )
    assert batch.input_ids is not None and batch.input_ids_2 is not None
    assert torch.equal(batch.input_ids, ids(sdxl.tokenizer, batch.captions))
    assert torch.equal(batch.input_ids_2, ids(sdxl.tokenizer_2, batch.captions))
    assert not torch.equal(batch.input_ids, batch.input_ids_2)  # tokenizer_2 pads with "!", not end-of-text


def test_text_cache_holds_pooled_embeds_and_keys_both_encoders(photos: Path, tmp_path: Path, sdxl) -> None:
    cache = tmp_path / "cache"
    te, te2, tok, tok2 = sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer, sdxl.tokenizer_2
    ds = build_dataset(photos, CFG, cache_dir=cache)
    s = cache_text(ds, te, tok, text_encoder_2=te2, tokenizer_2=tok2)
    assert (s.encoded, s.loaded) == (3, 0)  # two sidecar captions and the empty one
    batch = next(iter(build_dataloader(ds, batch_size=2, tokenizer=tok, tokenizer_2=tok2)))
    assert batch.input_ids is None and batch.input_ids_2 is None
    assert batch.encoder_hidden_states is not None and batch.pooled_text_embeds is not None
    with torch.no_grad():
        hidden, pooled = TextEncoders.of(sdxl)(ids(tok, batch.captions), ids(tok2, batch.captions))
    torch.testing.assert_close(batch.encoder_hidden_states, hidden)  # [B, 77, 16 + 24]
    torch.testing.assert_close(batch.pooled_text_embeds, pooled)  # [B, 32]
    s = cache_text(build_dataset(photos, CFG, cache_dir=cache), te, tok, text_encoder_2=te2, tokenizer_2=tok2)
    assert (s.encoded, s.loaded) == (0, 3)
    other_te2 = build_pipeline("tiny-sdxl-shallow", seed=5).text_encoder_2
    s = cache_text(ds, te, tok, text_encoder_2=other_te2, tokenizer_2=tok2)
    assert (s.encoded, s.loaded) == (3, 0)  # another second encoder misses
    s = cache_text(ds, te, tok)  # the first encoder alone (SD1-style entries) is another entry too
    assert (s.encoded, s.loaded) == (3, 0)
    batch = next(iter(build_dataloader(ds, batch_size=2, tokenizer=tok)))
    assert batch.pooled_text_embeds is None and batch.encoder_hidden_states.shape[-1] == 16


def test_class_images_keep_their_own_sizes(photos: Path, tmp_path: Path) -> None:
    class_dir = tmp_path / "class"
    save_photo(class_dir / "c0.jpg", 80, 72, seed=1)
    save_photo(class_dir / "c1.jpg", 72, 80, seed=2)
    ds = build_dataset(
        photos,
        DataConfig(resolution=64, bucket_step=8),
        instance_prompt="sks dog",
        class_source=class_dir,
        class_prompt="dog",
        cache_dir=tmp_path / "cache",
    )
    sizes = {(r.height, r.width) for r in ds.records if r.is_prior}
    assert sizes == {(72, 80), (80, 72)}
    seen = set()
    for batch in build_dataloader(ds, batch_size=2):
        time_ids = add_time_ids(batch.original_sizes, batch.crop_top_lefts, batch.target_size)
        for row, prior in zip(time_ids.tolist(), batch.is_prior.tolist(), strict=True):
            assert row[4:] == [float(s) for s in batch.target_size]
            if prior:
                seen.add((int(row[0]), int(row[1])))
    assert seen == sizes  # each class image's own original size, not its instance photo's
