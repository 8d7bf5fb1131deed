"""How a run trains its trigger word (pivotal tuning): not at all, as a new token, or, for a word the
tokenizer has that the base's text encoder reads as next to nothing (our base's letters: w-person's "w"), in
its own embedding row."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from tune.errors import ConfigError
from tune.personalize.config import PivotalConfig
from tune.personalize.subject import Subject, without_trigger

if TYPE_CHECKING:
    from tune.tokens import NewTokens

log = logging.getLogger(__name__)

BLANK_TRIGGER = 0.25
"""A known word whose trigger weight (`trigger_weight`) is below this means next to nothing to the base's text
encoder, and pivotal "auto" trains it in place. Measured on our base: single letters ("w", "x", "q") 0.17-0.19
in "a photo of w person"; real words 0.29 ("striped") to 0.82 ("person"); "a" 0.26."""

Pivotal = Literal["off", "new", "known"]
"""How a run trains its trigger: not at all, as a new token, or in its own row (a word the tokenizer has)."""


def resolve_pivotal(
    options: PivotalConfig, subject: Subject, tokenizers: list[Any], text_encoders: list[Any]
) -> Pivotal:
    """How the run trains its trigger (`options.enabled`). "auto": as a new token when it is a new word to the
    tokenizer(s) in the instance prompt; in place when it is one token the tokenizer has that the base's
    text encoder reads as next to nothing (`trigger_weight` below BLANK_TRIGGER: our base's "w"), since
    whatever learns the subject under such a word also draws it for the class prompt; else off. Pivotal
    tuning asked for outright on a trigger that is not in the instance prompt, or is a word the tokenizer
    has, is a ConfigError."""
    from tune.tokens import check_new_token, is_known_word, is_new_token

    in_prompt = subject.token in subject.instance_prompt.split()
    if not options.enabled or (options.enabled == "auto" and not in_prompt):
        if options.enabled:
            log.info("pivotal tuning: off (%r is not in the instance prompt)", subject.token)
        return "off"
    if not in_prompt:
        raise ConfigError(
            f"pivotal tuning trains the trigger word, which must be in the instance prompt: token=sks and "
            f'instance_prompt="a photo of sks toy" (got token {subject.token!r}, {subject.instance_prompt!r})'
        )
    how: Pivotal = "off"
    if is_new_token(tokenizers, subject.token, options.num_vectors):
        how, why = "new", f"{subject.token!r} becomes a new token"
    elif options.num_vectors == 1 and is_known_word(tokenizers, subject.token):
        weight = trigger_weight(tokenizers[0], text_encoders[0], subject.instance_prompt, subject.token)
        how = "known" if weight < BLANK_TRIGGER else "off"
        why = f"{subject.token!r} is a word the tokenizer has, which the text encoder reads as " + (
            f"next to nothing (trigger weight {weight:.2f} < {BLANK_TRIGGER}): its own embedding trains"
            if how == "known"
            else f"a word (trigger weight {weight:.2f} >= {BLANK_TRIGGER}): off"
        )
    else:
        why = f"off ({subject.token!r} is a word the tokenizer has, in several pieces)"
    if how == "off" and options.enabled is True:  # asked for outright: a word the base reads is an error
        check_new_token(tokenizers, subject.token, options.num_vectors)
    log.info("pivotal tuning: %s", why)
    return how


def add_trigger(
    options: PivotalConfig, how: Pivotal, subject: Subject, tokenizers: list[Any], text_encoders: list[Any]
) -> NewTokens | None:
    """The trigger as a token to train beside the recipe's weights (`how` from `resolve_pivotal`): a new
    token, or a known word's own row ("known"), starting from `options.initializer_token`, else the class
    word; None when `how` is "off"."""
    from tune.tokens import add_tokens

    if how == "off":
        return None
    initializer = options.initializer_token or subject.class_word
    return add_tokens(
        tokenizers, text_encoders, subject.token, initializer, options.num_vectors, known=how == "known"
    )


def trigger_weight(tokenizer: Any, text_encoder: Any, prompt: str, token: str) -> float:
    """How much `token` changes the text encoder's reading of `prompt`: the relative distance of its last
    hidden states (the prompt padded as pipelines pad it) with and without the token."""
    import torch

    ids = tokenizer(
        [prompt, without_trigger(prompt, token)],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        out = text_encoder(ids.to(text_encoder.device))[0].float()
    return float((out[0] - out[1]).norm() / out[1].norm())
