"""New tokens: add them to the tokenizer(s), grow the text encoder(s)' embeddings, initialise them from a
word, train only their rows, and save them as embeddings diffusers, A1111 and ComfyUI load.

    new = add_tokens(*text_towers(pipe), "sks", initializer="toy", num_vectors=1)
    optimizer = build_optimizer(new.weights, ...)       # the whole matrices are parameters...
    ... loss.backward(); optimizer.step()
    new.restore_frozen_rows()                           # ...but every other row is put back, bit-exactly
    save_embeddings(new, "learned_embeds.safetensors")

SD1 and SD2 have one tokenizer/text encoder pair; SDXL has two (`tokenizer`/`text_encoder`, CLIP-L, and
`tokenizer_2`/`text_encoder_2`, OpenCLIP bigG). The same token string goes into every tokenizer, and each
encoder gets its own rows, initialised from the initializer word's rows in that encoder and trained
together (`../shared/reference/sdxl.md` section 7). `add_tokens(tokenizer, text_encoder, ...)` with one
pair is the SD1/SD2 form; `text_towers(pipe)` gives the lists for any pipeline.

Only the new rows change, by two mechanisms: a gradient hook zeroes the other rows' gradient (so
gradient clipping and the optimizer's statistics see the new rows only), and after every optimizer
step the other rows are copied back from a saved copy, because decoupled weight decay (and 8-bit
state quantisation) would still move rows whose gradient is zero.

Multi-vector tokens follow diffusers' convention: `sks` with 3 vectors is the tokens `sks`, `sks_1`,
`sks_2`, and a prompt's `sks` stands for all three (`expand`, the same rule as diffusers'
`maybe_convert_prompt`, which the pipeline applies when sampling).

The files these rows are saved as (one tensor for SD1/SD2, `clip_l` + `clip_g` for SDXL): `tune.embeddings`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tune.embeddings import SDXL_KEYS
from tune.errors import ConfigError, ModelError
from tune.models.families import Family

logger = logging.getLogger(__name__)
TOWERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
"""A pipeline's tokenizer/text encoder attribute pairs, in order (SDXL has both)."""


def text_towers(pipe: Any) -> tuple[list[Any], list[nn.Module]]:
    """(tokenizers, text encoders) of a pipeline: one of each for SD1/SD2, two for SDXL."""
    pairs = [(getattr(pipe, t, None), getattr(pipe, e, None)) for t, e in TOWERS]
    pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
    return [t for t, _ in pairs], [e for _, e in pairs]


@dataclass
class TokenRows:
    """The new tokens' rows in one text encoder's input embeddings."""

    ids: tuple[int, ...]
    """Their ids in this encoder's tokenizer (rows of the matrix)."""
    embedding: nn.Embedding
    """The text encoder's input embeddings (resized to hold the new rows)."""
    original: torch.Tensor = field(repr=False)
    """A copy of the matrix when the tokens were added: the other rows are restored from it."""
    base: torch.Tensor | None = field(default=None, repr=False)
    """A word the tokenizer had, trained in place (`add_tokens(..., known=True)`): its rows' values in the
    base; None when the rows were added."""

    def base_shaped(self, text_encoder: nn.Module) -> None:
        """Make `text_encoder` (a copy of the tuned one) hold the base's embedding matrix: the added rows cut
        off (they are the last ones), or a known word's rows given their base values."""
        if self.base is None:
            text_encoder.resize_token_embeddings(min(self.ids), mean_resizing=False)
            return
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[list(self.ids)] = self.base.to(weight.device, weight.dtype)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def vectors(self) -> torch.Tensor:
        """The new rows, [num_vectors, hidden_size], float32 on the CPU."""
        return self.weight.detach()[list(self.ids)].to("cpu", torch.float32).clone()

    def train_rows_only(self) -> None:
        mask = torch.zeros(self.weight.shape[0], 1, dtype=self.weight.dtype, device=self.weight.device)
        mask[list(self.ids)] = 1
        self.weight.requires_grad_(True)
        self.weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        ids = list(self.ids)
        new_rows = self.weight[ids].clone()
        self.weight.copy_(self.original)
        self.weight[ids] = new_rows


@dataclass
class NewTokens:
    """Tokens added to a base's tokenizer(s)/text encoder(s), and the means to train only their rows."""

    token: str
    """The token as written in prompts."""
    tokens: tuple[str, ...]
    """`token`, then `token_1` ... for multi-vector tokens."""
    rows: tuple[TokenRows, ...]
    """The new rows in each text encoder: one for SD1/SD2, two for SDXL (text_encoder, text_encoder_2)."""
    family: Family = "sd1"
    """The base's family (recorded in the embedding file)."""

    @property
    def in_place(self) -> bool:
        """Whether the token is a word the tokenizer had, trained in its own rows (nothing added)."""
        return self.rows[0].base is not None

    @property
    def ids(self) -> tuple[int, ...]:
        """The new tokens' ids in the (first) tokenizer."""
        return self.rows[0].ids

    @property
    def weights(self) -> list[nn.Parameter]:
        """The embedding matrices, the parameters to hand to the optimizer."""
        return [r.weight for r in self.rows]

    @property
    def weight(self) -> nn.Parameter:
        """The embedding matrix of a base with one text encoder (SD1/SD2)."""
        if len(self.rows) != 1:
            raise ModelError(f"{self.token!r} lives in {len(self.rows)} text encoders; use `.weights`")
        return self.rows[0].weight

    def vectors(self, encoder: int = 0) -> torch.Tensor:
        """The new rows of text encoder `encoder` (0: text_encoder, 1: text_encoder_2), float32 on the CPU."""
        return self.rows[encoder].vectors()

    def expand(self, prompt: str) -> str:
        """`token` -> `token token_1 ...` in a prompt (multi-vector tokens; unchanged for one vector)."""
        if len(self.tokens) == 1:
            return prompt
        return re.sub(rf"(?<!\S){re.escape(self.token)}(?!\S)", " ".join(self.tokens), prompt)

    def train_rows_only(self) -> None:
        """Make the matrices trainable with a gradient that is zero outside the new rows."""
        for rows in self.rows:
            rows.train_rows_only()

    def restore_frozen_rows(self) -> None:
        """Put every row but the new ones back to its value when the tokens were added (bit-exact)."""
        for rows in self.rows:
            rows.restore_frozen_rows()

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """What the embedding file holds: `{token: rows}`, or SDXL's `{"clip_l": ..., "clip_g": ...}`."""
        if self.family == "sdxl":
            return {key: rows.vectors().contiguous() for key, rows in zip(SDXL_KEYS, self.rows, strict=True)}
        return {self.token: self.rows[0].vectors().contiguous()}


def token_ids(tokenizer, word: str) -> list[int]:  # noqa: ANN001 - any HF tokenizer
    """Ids of `word` without the start/end tokens."""
    return list(tokenizer(word, add_special_tokens=False)["input_ids"])


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_new_token(tokenizer, token: str, num_vectors: int = 1) -> tuple[str, ...]:  # noqa: ANN001
    """The tokens `add_tokens` would add (`token`, `token_1`, ...); a ConfigError when they cannot be added
    to `tokenizer` (one, or a list: SDXL's two).

    Recipes call it before their run directory exists, so a taken word leaves nothing behind.
    """
    if num_vectors < 1:
        raise ConfigError(f"num_vectors must be >= 1; got {num_vectors}")
    if not token or len(token.split()) != 1:
        raise ConfigError(f"the new token must be one word, e.g. 'sks' or '<sks-toy>'; got {token!r}")
    tokens = tuple([token] + [f"{token}_{i}" for i in range(1, num_vectors)])
    for each in _as_list(tokenizer):
        vocab = each.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            raise ConfigError(
                f"the token {taken[0]!r} is already in the tokenizer's vocabulary; choose a new word, e.g. '<{token}>'"
            )
    return tokens


def is_new_token(tokenizer, token: str, num_vectors: int = 1) -> bool:  # noqa: ANN001
    """Whether `check_new_token` accepts `token`: one word none of the tokenizers has yet."""
    try:
        check_new_token(tokenizer, token, num_vectors)
    except ConfigError:
        return False
    return True


def pool_at_first_eos(tokenizer, text_encoder: nn.Module) -> int | None:  # noqa: ANN001
    """Make a legacy CLIP config (eos_token_id == 2) pool its output at the first EOS; returns the old value
    (to put back) when it changed it, else None.

    transformers' CLIP pools at argmax(input_ids) when `eos_token_id == 2`, which after adding tokens is the
    new token's position, not EOS: SDXL's pooled text embeds would be read there (sdxl.md section 1.1).
    The value is cached on the text model at init, so the attribute is what has to change.
    """
    text_model = getattr(text_encoder, "text_model", None)
    previous = getattr(text_model, "eos_token_id", None)
    if previous != 2 or tokenizer.eos_token_id in (None, 2):
        return None
    text_model.eos_token_id = tokenizer.eos_token_id
    return previous


def is_known_word(tokenizer, token: str) -> bool:  # noqa: ANN001
    """Whether every tokenizer (one, or SDXL's two) reads `token` as one token of its own vocabulary."""
    return all(len(token_ids(t, token)) == 1 for t in _as_list(tokenizer))


def _family_of_towers(text_encoders: list[nn.Module]) -> Family:
    # The same rule as tune.models.families for the text side: a second encoder is SDXL, gelu is OpenCLIP.
    if len(text_encoders) == 2:
        return "sdxl"
    return "sd2" if getattr(text_encoders[0].config, "hidden_act", "") == "gelu" else "sd1"


def add_tokens(
    tokenizer,  # noqa: ANN001 - a CLIP tokenizer, or a list of them (SDXL's two)
    text_encoder: nn.Module | Sequence[nn.Module],
    token: str,
    initializer: str,
    num_vectors: int = 1,
    *,
    known: bool = False,
) -> NewTokens:
    """Add `token` (and `token_1` ... for more vectors) to each tokenizer and grow its text encoder; every
    new row starts from `initializer`'s embedding in that encoder.

    known: `token` is a word every tokenizer has as one token (`is_known_word`), and its own row trains in
    place, from `initializer`'s embedding too (one vector; nothing is added; `TokenRows.base` keeps the
    row's base value).

    A multi-piece initializer ("swim ring") starts from the mean of its pieces' embeddings. Raises
    ConfigError when the token already exists (without `known`), is not one word, or the initializer is empty.
    """
    tokenizers, encoders = _as_list(tokenizer), _as_list(text_encoder)
    if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
        raise ModelError(f"one tokenizer per text encoder: got {len(tokenizers)} and {len(encoders)}")
    if known:
        if num_vectors != 1 or not is_known_word(tokenizers, token):
            raise ConfigError(
                f"a known word trains in place as one vector of its own: {token!r} with {num_vectors} vectors "
                "is not one token of the tokenizer's; pick a new word, e.g. '<sks>'"
            )
        tokens = (token,)
    else:
        tokens = check_new_token(tokenizers, token, num_vectors)
    if not known and len(token_ids(tokenizers[0], token)) == 1:
        # Rare words (DreamBooth's "sks") are fine; a common one would stop meaning itself in every prompt.
        logger.warning("the new token %r replaces a word the tokenizer already knows as one token", token)
    init_ids = [token_ids(t, initializer) if initializer.strip() else [] for t in tokenizers]
    if not all(init_ids):
        raise ConfigError(
            f"initializer_token must be a word the model knows (the subject's class, e.g. 'toy'); got {initializer!r}"
        )
    rows = tuple(
        _add(t, e, tokens, ids, known=known) for t, e, ids in zip(tokenizers, encoders, init_ids, strict=True)
    )
    if len(init_ids[0]) > 1:
        logger.info(
            "initializer %r is %d tokens; the new token starts from their mean", initializer, len(init_ids[0])
        )
    logger.info(
        "%s token %s (%d vector(s), ids %s, %d text encoder(s)) initialised from %r",
        "training the known" if known else "added",
        token,
        num_vectors,
        list(rows[0].ids),
        len(rows),
        initializer,
    )
    return NewTokens(token=token, tokens=tokens, rows=rows, family=_family_of_towers(encoders))


def _add(  # noqa: ANN001 - tokenizer: any HF CLIP tokenizer
    tokenizer, text_encoder: nn.Module, tokens: tuple[str, ...], init_ids: list[int], known: bool
) -> TokenRows:
    if known:  # the word's own row (the id prompts give it), nothing added
        ids = (token_ids(tokenizer, tokens[0])[0],)
    else:
        added = tokenizer.add_tokens(list(tokens))
        if added != len(tokens):
            raise ModelError(
                f"the tokenizer added {added} of the tokens {list(tokens)}; is it a CLIP tokenizer?"
            )
        ids = tuple(tokenizer.convert_tokens_to_ids(list(tokens)))
        # mean_resizing draws random rows from the old ones' statistics (and the global RNG); ours are set below.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if pool_at_first_eos(tokenizer, text_encoder) is not None:
            logger.info("text encoder config has the legacy eos_token_id 2; pooling at the first EOS instead")
    embedding = text_encoder.get_input_embeddings()
    base = embedding.weight.detach()[list(ids)].clone() if known else None
    with torch.no_grad():
        start = embedding.weight[init_ids].float().mean(dim=0).to(embedding.weight.dtype)
        for i in ids:
            embedding.weight[i] = start
    return TokenRows(ids=ids, embedding=embedding, original=embedding.weight.detach().clone(), base=base)
