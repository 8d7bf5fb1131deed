"""The trigger-attention loss: which photos take part, and that it moves the trigger's map onto the mask."""

from __future__ import annotations

import pytest
import torch

from tune.data.batches import Batch
from tune.errors import ConfigError
from tune.personalize import PhotoOptions, trigger_attention_loss
from tune.personalize.attention_loss import TriggerAttentionLoss

CAPTION = "a photo of sks dog"


def batch_of(captions: list[str], has_mask: list[bool], is_prior: list[bool], size: int) -> Batch:
    n = len(captions)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, :, : size // 2] = 1.0
    return Batch(
        captions=captions,
        is_prior=torch.tensor(is_prior),
        original_sizes=torch.full((n, 2), size),
        crop_top_lefts=torch.zeros(n, 2, dtype=torch.long),
        target_size=(size, size),
        subject_mask=mask * torch.tensor(has_mask, dtype=torch.float32)[:, None, None, None],
        has_mask=torch.tensor(has_mask),
    )


def test_only_masked_photos_whose_caption_has_the_trigger_take_part(tiny_pipe) -> None:  # noqa: ANN001
    loss = TriggerAttentionLoss(tiny_pipe.unet, tiny_pipe.tokenizer, "sks", 1.0)
    batch = batch_of(
        [CAPTION, CAPTION, "a photo of dog", "", CAPTION],
        has_mask=[True, False, True, True, True],
        is_prior=[False, False, False, False, True],  # the last: a class image
        size=32,
    )
    [(index, [(positions, on_subject)])] = loss.samples(batch)
    assert on_subject
    assert index == 0 and [tiny_pipe.tokenizer.convert_ids_to_tokens(
        tiny_pipe.tokenizer(CAPTION).input_ids)[p] for p in positions] == tiny_pipe.tokenizer.tokenize("sks")  # fmt: skip
    assert not loss.start(batch_of([CAPTION], [False], [False], 32))  # nothing to compare
    assert loss._installed is None  # and no processor swapped
    assert trigger_attention_loss(PhotoOptions(), tiny_pipe.unet, tiny_pipe.tokenizer, "sks") is None
    with pytest.raises(ConfigError, match="mask_attention_weight must be >= 0"):
        PhotoOptions(mask_attention_weight=-1.0)


def trigger_share(store, batch: Batch, positions: list[int], latent_hw: tuple[int, int]) -> float:  # noqa: ANN001
    trigger_map = store.maps(0, latent_hw)[0, positions].sum(0).detach()
    mask = torch.nn.functional.adaptive_avg_pool2d(batch.subject_mask[0], trigger_map.shape)[0]
    return float((trigger_map * mask).sum() / trigger_map.sum())


def test_the_loss_pulls_the_trigger_map_onto_the_subject(tiny_pipe) -> None:  # noqa: ANN001
    unet, tokenizer = tiny_pipe.unet, tiny_pipe.tokenizer
    processors = unet.attn_processors
    loss_fn = TriggerAttentionLoss(unet, tokenizer, "sks", 1.0)
    side = unet.config.sample_size
    latent_hw = (side, side)
    batch = batch_of([CAPTION], [True], [False], side * 8)
    [(_, [(positions, _)])] = loss_fn.samples(batch)
    ids = tokenizer(
        [CAPTION], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = tiny_pipe.text_encoder(ids.input_ids)[0]
    hidden = hidden.clone().requires_grad_(True)  # what a trained token (or LoRA on to_k) moves
    latents = torch.randn(1, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    optimizer = torch.optim.Adam([hidden], lr=0.3)
    shares, losses = [], []
    unet.train()
    try:
        for _ in range(40):
            assert loss_fn.start(batch)
            unet(latents, t, hidden)
            loss = loss_fn(batch, latent_hw)
            shares.append(trigger_share(loss_fn.store, batch, positions, latent_hw))
            losses.append(float(loss.detach()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        store = loss_fn.store
        assert list(store.layers) == [store.resolution()]  # after the first step: only the map's own layers
        every = TriggerAttentionLoss(unet, tokenizer, "sks", 1.0)  # on top of loss_fn's processors
        loss_fn.start(batch), every.start(batch)
        unet(latents, t, hidden)
        assert len(every.store.layers) > 1
        assert torch.equal(loss_fn(batch, latent_hw), every(batch, latent_hw))
        every.close()
        loss_fn.start(batch)
        with torch.no_grad():  # a validation loss or sampling: nothing recorded, nothing kept
            unet(latents, t, hidden)
        unet.eval()
        unet(latents, t, hidden)
        assert not loss_fn.store.layers
    finally:
        unet.eval()
        loss_fn.close()
    assert all(a is b for a, b in zip(unet.attn_processors.values(), processors.values(), strict=True))
    assert losses[-1] < 0.5 * losses[0]
    assert shares[0] < 0.6 and shares[-1] > 0.8  # the subject is the left half: half the mass at first
