"""Training adapters: peft adapters injected into a pipeline's U-Net (and text encoders) by target group
name, as the `lora` recipe's `lora.targets` names them; `type` picks the adapter: lora, dora (LoRA with
a trained magnitude per output row), loha (Hadamard product) or lokr (Kronecker product). Convs in the
target groups (resnets) get the same type: LoCon, and LoHa/LoKr on convs in their plain (non-Tucker)
layout, the one every loader applies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import nn

from tune.errors import ConfigError

LoraTarget = Literal["attn2", "attn1", "ff", "proj", "resnets", "text_encoder"]
AdapterType = Literal["lora", "dora", "loha", "lokr"]
UnetBlock = Literal["down", "mid", "up"]
UNET_BLOCKS: dict[str, str] = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
ADAPTER_TYPES: tuple[AdapterType, ...] = ("lora", "dora", "loha", "lokr")
# Each type's own options, named as peft's config names them, with peft's defaults.
TYPE_OPTIONS: dict[AdapterType, dict[str, Any]] = {
    "lora": {},
    "dora": {},
    "loha": {"rank_dropout": 0.0, "module_dropout": 0.0},
    "lokr": {
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "decompose_both": False,
        "decompose_factor": -1,
        "rank_dropout_scale": False,
    },
}
# Module-name patterns (peft matches them against the full name) of each target group.
UNET_TARGETS: dict[str, str] = {
    "attn2": r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    "attn1": r".*\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    "ff": r".*\.ff\.net\.(0\.proj|2)",
    "proj": r".*\.attentions\.\d+\.(proj_in|proj_out)",
    "resnets": r".*\.resnets\.\d+\.(conv1|conv2|conv_shortcut)",
}
TEXT_ENCODER_TARGETS = r".*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def type_options(type: AdapterType, values: Mapping[str, Any], dropout: float = 0.0) -> dict[str, Any]:
    """The options of `type` (TYPE_OPTIONS' names, peft's defaults where `values` has none), picked from
    `values`; a one-line ConfigError for an option of another type set to other than its default, or
    for input dropout on loha/lokr."""
    if type not in TYPE_OPTIONS:
        raise ConfigError(f"lora.type must be one of {', '.join(ADAPTER_TYPES)}; got {type!r}")
    if dropout and type not in ("lora", "dora"):
        raise ConfigError(
            f"lora.dropout is LoRA/DoRA input dropout; lora.type = {type!r} takes lora.rank_dropout and "
            "lora.module_dropout"
        )
    defaults = {name: value for options in TYPE_OPTIONS.values() for name, value in options.items()}
    for name, value in values.items():
        if name not in TYPE_OPTIONS[type] and (name not in defaults or value != defaults[name]):
            owners = " or ".join(t for t, options in TYPE_OPTIONS.items() if name in options) or "no type"
            raise ConfigError(f"lora.{name} applies to lora.type = {owners}; this run's type is {type!r}")
    return {name: values.get(name, default) for name, default in TYPE_OPTIONS[type].items()}


def adapter_config(
    type: AdapterType,
    target_modules: str,
    rank: int,
    alpha: float,
    dropout: float,
    options: Mapping[str, Any],
) -> Any:
    """The peft config of one model's adapter: zero-initialised (a no-op at first) for every type."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    options = type_options(type, options, dropout)
    if type in ("lora", "dora"):
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            init_lora_weights="gaussian",  # gaussian down, zero up
            use_dora=type == "dora",  # magnitude starts at the base weight's row norms
            target_modules=target_modules,
        )
    config = LoHaConfig if type == "loha" else LoKrConfig  # loha: w2_b zero; lokr: w1 zero
    return config(r=rank, alpha=alpha, target_modules=target_modules, **options)


def unet_target_pattern(
    targets: Sequence[LoraTarget], blocks: Sequence[UnetBlock] = tuple(UNET_BLOCKS)
) -> str:
    """The peft regex of the U-Net modules in the `targets` groups and the `blocks` (down, mid, up)."""
    unet_groups = [UNET_TARGETS[t] for t in targets if t in UNET_TARGETS]
    if not unet_groups:
        raise ConfigError(
            "lora.targets must include at least one U-Net group (attn2, attn1, ff, proj, resnets)"
        )
    pattern = "(?:" + "|".join(unet_groups) + ")"
    if set(blocks) == set(UNET_BLOCKS):
        return pattern
    if not blocks:
        raise ConfigError(f"lora.blocks needs at least one of {', '.join(UNET_BLOCKS)}")
    if not set(blocks) <= set(UNET_BLOCKS):
        raise ConfigError(f"lora.blocks takes some of {', '.join(UNET_BLOCKS)}; got {list(blocks)}")
    prefixes = "|".join(UNET_BLOCKS[b] for b in UNET_BLOCKS if b in blocks)
    return rf"(?:{prefixes})\.{pattern}"  # the groups' modules in these blocks only


def inject_lora(
    unet: nn.Module,
    text_encoder: nn.Module,
    targets: Sequence[LoraTarget],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    text_encoder_2: nn.Module | None = None,
    type: AdapterType = "lora",
    options: Mapping[str, Any] | None = None,
    blocks: Sequence[UnetBlock] = tuple(UNET_BLOCKS),
) -> None:
    """Add a trainable adapter of `type` (rank, alpha, dropout for lora/dora, the type's own `options`
    from TYPE_OPTIONS; zero-initialised: a no-op at first) to every module of the `targets` groups in the
    U-Net's `blocks` (its down blocks, mid block and up blocks; the text encoder's groups take all);
    "text_encoder" targets the text encoder's attention and MLP, and SDXL's second text encoder's
    (`text_encoder_2`) too. peft freezes everything else of an injected model."""
    from peft import inject_adapter_in_model

    options = dict(options or {})
    unet_targets = unet_target_pattern(targets, blocks)
    unet.add_adapter(adapter_config(type, unet_targets, rank, alpha, dropout, options))  # type: ignore[operator]
    # The text encoder takes peft's own injection, not transformers' `add_adapter` gate (transformers 5.24
    # demands an unreleased peft there); it also freezes all but the adapters and records `peft_config`.
    if "text_encoder" in targets:
        for model in (text_encoder, text_encoder_2):
            if model is not None:
                config = adapter_config(type, TEXT_ENCODER_TARGETS, rank, alpha, dropout, options)
                inject_adapter_in_model(config, model)
