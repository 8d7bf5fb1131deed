"""`cache_text`: each distinct caption's text-encoder outputs, encoded once and kept on disk (the entry
layout and keys are `tune.data.cache`'s).

An entry holds `encoder_hidden_states` [L, D]; for SDXL (given `text_encoder_2` and `tokenizer_2`) it
holds both encoders' penultimate states concatenated [L, D1 + D2] plus `pooled_text_embeds` [P], and its
key covers both encoders' fingerprints and both tokenizers' ids (reference sdxl.md 2). SD1/SD2 keys are
as they always were, so their existing entries still hit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from tune.data.batches import _tokenize
from tune.data.cache import (
    CacheStats,
    _is_mine,
    entry_path,
    fingerprint_model,
    is_readable,
    make_key,
    save_entry,
)

if TYPE_CHECKING:
    from tune.data.dataset import PhotoDataset

logger = logging.getLogger(__name__)


@torch.no_grad()
def cache_text(
    dataset: PhotoDataset,
    text_encoder: torch.nn.Module,
    tokenizer: Callable[..., Any],
    *,
    text_encoder_2: torch.nn.Module | None = None,
    tokenizer_2: Any = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    max_length: int | None = None,
    accelerator: Any = None,
) -> CacheStats:
    """Encode each distinct caption once (`text_encoder(input_ids)[0]`, the `encoder_hidden_states`; SDXL:
    `tune.models.conditioning.TextEncoders`, hidden states and pooled embeddings).

    With caption dropout the empty caption is cached too (one entry per variant; encoded as "", like
    SD1's, not zeros). With `shuffle_captions` nothing is cached (every step is new text): the stats
    say so and batches keep `input_ids` for the recipe to encode.
    """
    from tune.models.conditioning import TextEncoders

    stats = CacheStats("text")
    if dataset.cfg.shuffle_captions:
        stats.note = "off: shuffle_captions makes new text every step"
        dataset.text_files = None
        dataset.cache_stats["text"] = stats
        logger.info(str(stats))
        return stats
    sdxl = text_encoder_2 is not None
    if sdxl and tokenizer_2 is None:
        raise ValueError("cache_text needs tokenizer_2 with text_encoder_2")
    captions = sorted(
        {c for r in dataset.records for c in (r.caption, *r.alt_captions)}
        | ({""} if dataset.cfg.caption_dropout > 0 else set())
    )
    model_fp = fingerprint_model(text_encoder)
    ids = _tokenize(tokenizer, captions, max_length)
    ids_2 = _tokenize(tokenizer_2, captions, max_length) if sdxl else ids
    folder_fp = model_fp
    extra: dict[str, Any] = {}
    if sdxl:
        assert text_encoder_2 is not None
        model_fp_2 = fingerprint_model(text_encoder_2)
        folder_fp = hashlib.sha256(f"{model_fp}:{model_fp_2}".encode()).hexdigest()
        extra["model_2"] = model_fp_2
    paths: dict[str, str] = {}
    mine = []  # this process's share of the missing entries
    for position, (caption, row, row_2) in enumerate(zip(captions, ids, ids_2, strict=True)):
        parts = dict(extra, input_ids_2=[int(t) for t in row_2]) if sdxl else {}
        key = make_key(kind="text", model=model_fp, input_ids=[int(t) for t in row], **parts)
        path = entry_path(dataset.cache_dir, "text", folder_fp, key)
        paths[caption] = str(path)
        if is_readable(path):
            stats.loaded += 1
        elif _is_mine(position, accelerator):
            mine.append((row, row_2, path))
    encoders = TextEncoders(text_encoder, text_encoder_2, tokenizer_2.eos_token_id if sdxl else None)
    with tqdm(total=len(mine), desc="caching text", unit="caption", disable=not mine) as bar:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            input_ids = torch.stack([row for row, _, _ in chunk]).to(device)
            input_ids_2 = torch.stack([row for _, row, _ in chunk]).to(device) if sdxl else None
            hidden, pooled = encoders(input_ids, input_ids_2)
            for i, (_, _, path) in enumerate(chunk):
                entry = {"encoder_hidden_states": hidden[i].float().cpu()}
                if pooled is not None:
                    entry["pooled_text_embeds"] = pooled[i].float().cpu()
                save_entry(path, entry, {"format": "tune-text"})
            stats.encoded += len(chunk)
            bar.update(len(chunk))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    dataset.text_files = paths
    dataset.cache_stats["text"] = stats
    logger.info(str(stats))
    return stats
