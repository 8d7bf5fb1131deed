"""Putting one checkpoint of a personalization run into the base pipeline, and taking it out again.

`CHECKPOINT_LOADERS[recipe](pipe, folder)` is a context manager per recipe: lora applies the
checkpoint's adapter (and, under pivotal tuning, the trigger's embedding at that step); dreambooth
loads its U-Net (the EMA weights where kept, the text encoder when trained); textual_inversion sets
its embedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.errors import ModelError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


@contextlib.contextmanager
def _lora_checkpoint(pipe: StableDiffusionPipeline, folder: Path) -> Iterator[None]:
    from tune import lora as lora_io

    path = folder / lora_io.CHECKPOINT_ADAPTER
    if not path.is_file():
        raise ModelError(f"{folder} has no {lora_io.CHECKPOINT_ADAPTER}; is it a lora run's checkpoint?")
    _set_embeddings(pipe, folder)  # pivotal tuning: the trigger's embedding at this step
    stack = lora_io.apply_loras(pipe, [(path, 1.0)])
    try:
        yield
    finally:
        stack.clear()


@contextlib.contextmanager
def _embedding_checkpoint(pipe: StableDiffusionPipeline, folder: Path) -> Iterator[None]:
    if not _set_embeddings(pipe, folder):
        raise ModelError(f"{folder} has no learned_embeds.safetensors; is it a textual_inversion checkpoint?")
    yield  # the next checkpoint overwrites the rows; the base model was drawn before any was added


def _set_embeddings(pipe: StableDiffusionPipeline, folder: Path) -> bool:
    """Load a checkpoint's learned_embeds.safetensors into the tokenizer and text encoder, if it has one."""
    import torch

    from tune.tokens import EMBEDDINGS_FILE, load_embeddings

    path = folder / EMBEDDINGS_FILE
    if not path.is_file():
        return False
    token, vectors = load_embeddings(path)
    tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[tokenizer.convert_tokens_to_ids(tokens)] = vectors.to(weight.device, weight.dtype)
    return True


@contextlib.contextmanager
def _unet_checkpoint(pipe: StableDiffusionPipeline, folder: Path) -> Iterator[None]:
    """A dreambooth checkpoint (accelerate state): model.safetensors is the U-Net (model_1 the text
    encoder when trained); the EMA weights, which its grids and export use, replace the U-Net's."""
    import torch
    from safetensors.torch import load_file

    unet_file = folder / "model.safetensors"
    if not unet_file.is_file():
        raise ModelError(f"{folder} has no model.safetensors; is it a dreambooth run's checkpoint?")
    parts = [(pipe.unet, unet_file)]
    if (folder / "model_1.safetensors").is_file():
        parts.append((pipe.text_encoder, folder / "model_1.safetensors"))
    saved = [(m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m, _ in parts]
    try:
        for model, file in parts:
            model.load_state_dict(load_file(str(file)))
        for pkl in sorted(folder.glob("custom_checkpoint_*.pkl")):
            state = torch.load(pkl, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "shadow_params" in state:
                with torch.no_grad():
                    for param, ema in zip(pipe.unet.parameters(), state["shadow_params"], strict=True):
                        param.copy_(ema)
        yield
    finally:
        for model, state in saved:
            model.load_state_dict(state)


CHECKPOINT_LOADERS: dict[str, Callable[[Any, Path], contextlib.AbstractContextManager[None]]] = {
    "lora": _lora_checkpoint,
    "dreambooth": _unet_checkpoint,
    "textual_inversion": _embedding_checkpoint,
}
"""recipe -> context manager that puts one checkpoint's weights into the base pipeline, then takes them out."""
