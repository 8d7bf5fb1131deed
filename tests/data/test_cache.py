"""Latent and text caches: hits, misses, invalidation, atomic safetensors files, read-only photos."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tune.data.cache import CACHE_ENV, default_cache_dir, fingerprint_model
from tune.data.config import DataConfig
from tune.data.loader import build_dataloader, build_dataset, cache_latents, cache_text

from data_testkit import make_tiny_text_encoder, make_tiny_vae, save_photo, tree_hashes

CFG = DataConfig(resolution=64, bucket_step=8, cache_latents=True)


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts encode calls: proves a cached run does no encoding."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.calls = 0

    def encode(self, pixels: torch.Tensor):
        self.calls += 1
        return self.vae.encode(pixels)


def run(photos: Path, cache: Path, cfg: DataConfig = CFG, seed: int = 0, vae=None, **kw):
    ds = build_dataset(photos, cfg, cache_dir=cache, seed=seed, **kw)
    vae = vae if vae is not None else CountingVAE(make_tiny_vae())
    stats = cache_latents(ds, vae, batch_size=4)
    return ds, stats, vae


def test_second_run_loads_everything_and_never_encodes(photos: Path, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    _, first, vae1 = run(photos, cache)
    assert (first.encoded, first.loaded) == (6, 0) and vae1.calls > 0
    with caplog.at_level("INFO", logger="tune.data.cache"):
        ds, second, vae2 = run(photos, cache)
    assert (second.encoded, second.loaded) == (0, 6) and second.hit_rate == 1.0
    assert vae2.calls == 0
    assert ds.cache_stats["latent"] is second
    assert "latent cache: 0 encoded, 6 loaded" in caplog.text
    batch = next(iter(build_dataloader(ds, batch_size=2)))
    assert batch.pixel_values is None and batch.latents is not None
    h, w = batch.target_size
    assert batch.latents.shape == (len(batch), 4, h // 2, w // 2)  # the tiny VAE downsamples by 2


def test_cached_latents_match_encoding_on_the_fly(photos: Path, tmp_path: Path) -> None:
    ds, _, _ = run(photos, tmp_path / "cache")
    vae = make_tiny_vae()
    index, bucket, flip = ds.required_latents()[0]
    record = ds.records[index]
    from tune.data.buckets import crop_box

    pixels = ds.load_pixels(index, bucket, crop_box(record.width, record.height, bucket), flip)
    with torch.no_grad():
        dist = vae.encode(pixels[None]).latent_dist
    entry = load_file(ds.latent_files[(index, bucket, flip)])
    torch.testing.assert_close(entry["mean"], dist.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entry["std"], dist.std[0], atol=1e-5, rtol=1e-5)
    # What the dataset yields is a posterior sample, scaled like diffusers' training scripts do.
    from tune.data.loader import ItemKey

    latents = ds[ItemKey(index, 0, 0, bucket)]["latents"]
    scale = vae.config.scaling_factor
    assert ((latents / scale - entry["mean"]).abs() <= 6 * entry["std"] + 1e-6).all()


def test_invalidation_by_content_resolution_flip_and_model(photos: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run(photos, cache)
    # Content: one photo edited -> one miss.
    save_photo(photos / "p3.jpg", 64, 64, seed=999, quality=92)
    _, s, _ = run(photos, cache)
    assert (s.encoded, s.loaded) == (1, 5)
    # Resolution: every entry misses.
    _, s, _ = run(photos, cache, dataclasses.replace(CFG, resolution=48))
    assert (s.encoded, s.loaded) == (6, 0)
    # Flip: both variants are needed; the unflipped ones are already there.
    _, s, _ = run(photos, cache, dataclasses.replace(CFG, flip=True))
    assert (s.encoded, s.loaded) == (6, 6)
    _, s, _ = run(photos, cache, dataclasses.replace(CFG, flip=True))
    assert (s.encoded, s.loaded) == (0, 12)
    # Model: one weight changed -> every entry misses.
    vae = make_tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 0.01
    _, s, _ = run(photos, cache, vae=vae)
    assert (s.encoded, s.loaded) == (6, 0)
    # Renaming a photo keeps its entry: the key is the content, not the name.
    os.rename(photos / "p4.jpg", photos / "renamed.jpg")
    _, s, _ = run(photos, cache)
    assert (s.encoded, s.loaded) == (0, 6)


def test_bucket_change_misses(photos: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run(photos, cache)
    _, s, _ = run(photos, cache, dataclasses.replace(CFG, bucketing=False))
    # The three square photos keep their 64x64 bucket and crop; the others get a new one.
    assert (s.encoded, s.loaded) == (3, 3)


def test_fingerprint_ignores_load_path_but_not_weights() -> None:
    a, b = make_tiny_vae(), make_tiny_vae()
    assert fingerprint_model(a) == fingerprint_model(b)
    b.register_to_config(_name_or_path="/somewhere/else")
    assert fingerprint_model(a) == fingerprint_model(b)
    assert fingerprint_model(a) != fingerprint_model(make_tiny_vae(seed=1))
    assert fingerprint_model(a.to(torch.float16)) != fingerprint_model(b)


def test_cache_files_are_safetensors_outside_the_photo_folder(
    photos: Path, tmp_path: Path, tokenizer
) -> None:
    before = tree_hashes(photos)
    cache = tmp_path / "cache"
    ds, _, _ = run(photos, cache)
    cache_text(ds, make_tiny_text_encoder(), tokenizer)
    list(build_dataloader(ds, batch_size=2, tokenizer=tokenizer))
    assert tree_hashes(photos) == before
    files = [p for p in cache.rglob("*") if p.is_file() and "datasets" not in p.parts]
    assert files and all(p.suffix == ".safetensors" for p in files)  # no temp files left behind
    assert {p.relative_to(cache).parts[0] for p in files} == {"latents", "text"}


def test_text_cache_hits_and_caption_change(photos: Path, tmp_path: Path, tokenizer) -> None:
    cache = tmp_path / "cache"
    cfg = DataConfig(resolution=64, bucket_step=8, cache_text=True)
    te = make_tiny_text_encoder()
    ds = build_dataset(photos, cfg, cache_dir=cache)
    s = cache_text(ds, te, tokenizer)
    assert (s.encoded, s.loaded) == (3, 0)  # two sidecar captions and the empty one
    s = cache_text(build_dataset(photos, cfg, cache_dir=cache), make_tiny_text_encoder(), tokenizer)
    assert (s.encoded, s.loaded) == (0, 3)
    (photos / "p0.txt").write_text("sks dog, beach")
    ds = build_dataset(photos, cfg, cache_dir=cache)
    s = cache_text(ds, te, tokenizer)
    assert (s.encoded, s.loaded) == (1, 2)
    batch = next(iter(build_dataloader(ds, batch_size=2, tokenizer=tokenizer)))
    assert batch.encoder_hidden_states is not None and batch.input_ids is None
    assert batch.encoder_hidden_states.shape == (len(batch), tokenizer.model_max_length, 32)
    ids = tokenizer([batch.captions[0]])["input_ids"]
    with torch.no_grad():
        expected = te(ids)[0][0]
    torch.testing.assert_close(batch.encoder_hidden_states[0], expected)
    s = cache_text(ds, make_tiny_text_encoder(seed=3), tokenizer)
    assert (s.encoded, s.loaded) == (3, 0)  # another text encoder


def test_text_cache_with_dropout_and_shuffle(photos: Path, tmp_path: Path, tokenizer) -> None:
    cache = tmp_path / "cache"
    te = make_tiny_text_encoder()
    ds = build_dataset(
        photos,
        DataConfig(resolution=64, bucket_step=8, caption_dropout=0.5),
        instance_prompt="a photo of sks",  # no sidecar here contains it: every photo takes it
        cache_dir=cache,
    )
    s = cache_text(ds, te, tokenizer)
    assert (s.encoded, s.loaded) == (2, 0) and set(ds.text_files or {}) == {"", "a photo of sks"}
    ds = build_dataset(
        photos, DataConfig(resolution=64, bucket_step=8, shuffle_captions=True), cache_dir=cache
    )
    s = cache_text(ds, te, tokenizer)
    assert (s.encoded, s.loaded) == (0, 0) and "shuffle_captions" in str(s) and ds.text_files is None
    batch = next(iter(build_dataloader(ds, batch_size=2, tokenizer=tokenizer)))
    assert batch.input_ids is not None and batch.encoder_hidden_states is None


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "tune"


def test_env_cache_dir_is_used_by_default(photos: Path, _isolated_cache: Path) -> None:
    ds, s, _ = run(photos, None)  # type: ignore[arg-type]
    assert s.encoded == 6
    assert all(Path(p).is_relative_to(_isolated_cache.resolve()) for p in (ds.latent_files or {}).values())
