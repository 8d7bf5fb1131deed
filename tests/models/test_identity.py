"""base_model_hash names the weights a run trained on: SDXL's second text encoder counts, SD1's hash stays."""

from __future__ import annotations

import torch

from tune.models import build_pipeline
from tune.models.identity import base_model_hash


def test_sdxl_hash_covers_the_second_text_encoder():
    pipe = build_pipeline("tiny-sdxl-shallow", seed=0)
    before = base_model_hash(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert before != base_model_hash(pipe.unet, pipe.text_encoder)
    with torch.no_grad():
        pipe.text_encoder_2.text_model.final_layer_norm.bias.add_(1e-3)
    assert base_model_hash(pipe.unet, pipe.text_encoder, pipe.text_encoder_2) != before


def test_without_a_second_encoder_the_hash_is_unchanged():
    pipe = build_pipeline("tiny", seed=0)
    assert base_model_hash(pipe.unet, pipe.text_encoder, None) == base_model_hash(
        pipe.unet, pipe.text_encoder
    )
