"""New tokens: add them to the tokenizer, grow the text encoder's embeddings, initialise them from a word,
train only their rows, and save them as embeddings diffusers, A1111 and ComfyUI load.

    new = add_tokens(tokenizer, text_encoder, "sks", initializer="toy", num_vectors=1)
    optimizer = build_optimizer([new.weight], ...)      # the whole matrix is a parameter...
    ... loss.backward(); optimizer.step()
    new.restore_frozen_rows()                           # ...but every other row is put back, bit-exactly
    save_embeddings(new, "learned_embeds.safetensors")  # pipe.load_textual_inversion(path, token="sks")

Only the new rows change, by two mechanisms: a gradient hook zeroes the other rows' gradient (so
gradient clipping and the optimizer's statistics see the new rows only), and after every optimizer
step the other rows are copied back from a saved copy, because decoupled weight decay (and 8-bit
state quantisation) would still move rows whose gradient is zero.

Multi-vector tokens follow diffusers' convention: `sks` with 3 vectors is the tokens `sks`, `sks_1`,
`sks_2`, and a prompt's `sks` stands for all three (`expand`, the same rule as diffusers'
`maybe_convert_prompt`, which the pipeline applies when sampling).

File format (`learned_embeds.safetensors`): one tensor named after the token, shaped
[num_vectors, hidden_size] (float32), the layout diffusers' textual-inversion script writes. With a
single key it also loads in A1111 (the file name is the trigger there) and ComfyUI.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tune.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "learned_embeds.safetensors"


@dataclass
class NewTokens:
    """Tokens added to a tokenizer/text encoder pair, and the means to train only their embedding rows."""

    token: str
    """The token as written in prompts."""
    tokens: tuple[str, ...]
    """`token`, then `token_1` ... for multi-vector tokens."""
    ids: tuple[int, ...]
    """Their ids (rows of the embedding matrix)."""
    embedding: nn.Embedding
    """The text encoder's input embeddings (resized to hold the new rows)."""
    original: torch.Tensor = field(repr=False)
    """A copy of the matrix when the tokens were added: the other rows are restored from it."""

    @property
    def weight(self) -> nn.Parameter:
        """The embedding matrix, the parameter to hand to the optimizer."""
        return self.embedding.weight

    def vectors(self) -> torch.Tensor:
        """The new rows, [num_vectors, hidden_size], float32 on the CPU."""
        return self.weight.detach()[list(self.ids)].to("cpu", torch.float32).clone()

    def expand(self, prompt: str) -> str:
        """`token` -> `token token_1 ...` in a prompt (multi-vector tokens; unchanged for one vector)."""
        if len(self.tokens) == 1:
            return prompt
        return re.sub(rf"(?<!\S){re.escape(self.token)}(?!\S)", " ".join(self.tokens), prompt)

    def train_rows_only(self) -> None:
        """Make the matrix trainable with a gradient that is zero outside the new rows."""
        mask = torch.zeros(self.weight.shape[0], 1, dtype=self.weight.dtype, device=self.weight.device)
        mask[list(self.ids)] = 1
        self.weight.requires_grad_(True)
        self.weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        """Put every row but the new ones back to its value when the tokens were added (bit-exact)."""
        ids = list(self.ids)
        new_rows = self.weight[ids].clone()
        self.weight.copy_(self.original)
        self.weight[ids] = new_rows


def token_ids(tokenizer, word: str) -> list[int]:  # noqa: ANN001 - any HF tokenizer
    """Ids of `word` without the start/end tokens."""
    return list(tokenizer(word, add_special_tokens=False)["input_ids"])


def check_new_token(tokenizer, token: str, num_vectors: int = 1) -> tuple[str, ...]:  # noqa: ANN001
    """The tokens `add_tokens` would add (`token`, `token_1`, ...); a ConfigError when they cannot be added.

    Recipes call it before their run directory exists, so a taken word leaves nothing behind.
    """
    if num_vectors < 1:
        raise ConfigError(f"num_vectors must be >= 1; got {num_vectors}")
    if not token or len(token.split()) != 1:
        raise ConfigError(f"the new token must be one word, e.g. 'sks' or '<sks-toy>'; got {token!r}")
    tokens = tuple([token] + [f"{token}_{i}" for i in range(1, num_vectors)])
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise ConfigError(
            f"the token {taken[0]!r} is already in the tokenizer's vocabulary; choose a new word, e.g. '<{token}>'"
        )
    return tokens


def add_tokens(
    tokenizer,  # noqa: ANN001 - any HF tokenizer (CLIPTokenizer for SD1.x)
    text_encoder: nn.Module,
    token: str,
    initializer: str,
    num_vectors: int = 1,
) -> NewTokens:
    """Add `token` (and `token_1` ... for more vectors) and initialise every new row from `initializer`.

    A multi-piece initializer ("swim ring") starts from the mean of its pieces' embeddings. Raises
    ConfigError when the token already exists, is not one word, or the initializer is empty.
    """
    tokens = check_new_token(tokenizer, token, num_vectors)
    if len(token_ids(tokenizer, token)) == 1:
        # Rare words (DreamBooth's "sks") are fine; a common one would stop meaning itself in every prompt.
        logger.warning("the new token %r replaces a word the tokenizer already knows as one token", token)
    init_ids = token_ids(tokenizer, initializer) if initializer.strip() else []
    if not init_ids:
        raise ConfigError(
            f"initializer_token must be a word the model knows (the subject's class, e.g. 'toy'); got {initializer!r}"
        )
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise ModelError(f"the tokenizer added {added} of the tokens {list(tokens)}; is it a CLIP tokenizer?")
    ids = tuple(tokenizer.convert_tokens_to_ids(list(tokens)))
    # mean_resizing draws random rows from the old ones' statistics (and the global RNG); ours are set below.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        start = embedding.weight[init_ids].float().mean(dim=0).to(embedding.weight.dtype)
        for i in ids:
            embedding.weight[i] = start
    if len(init_ids) > 1:
        logger.info(
            "initializer %r is %d tokens; the new token starts from their mean", initializer, len(init_ids)
        )
    logger.info(
        "added token %s (%d vector(s), ids %s) initialised from %r",
        token,
        num_vectors,
        list(ids),
        initializer,
    )
    original = embedding.weight.detach().clone()
    return NewTokens(token=token, tokens=tokens, ids=ids, embedding=embedding, original=original)


def save_embeddings(new: NewTokens, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `{token: [num_vectors, hidden_size]}` (float32) to a safetensors file (see the module docstring)."""
    from safetensors.torch import save_file

    from tune.runs import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "token": new.token, "num_vectors": str(len(new.tokens)), **(metadata or {})}
    vectors = new.vectors().contiguous()
    with atomic_file(path, vectors.numel() * vectors.element_size()) as tmp:
        save_file({new.token: vectors}, str(tmp), metadata=meta)
    return path


def load_embeddings(path: str | Path) -> tuple[str, torch.Tensor]:
    """(token, [num_vectors, hidden_size]) from a file written by `save_embeddings`."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ModelError(f"{path} holds {len(tensors)} tensors; a textual-inversion embedding file holds one")
    ((token, vectors),) = tensors.items()
    return token, vectors if vectors.ndim == 2 else vectors[None]
