"""Training adapters: peft LoRA layers injected into a pipeline's U-Net (and text encoder) by target
group name, as the `lora` recipe's `lora.targets` names them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from tune.errors import ConfigError

LoraTarget = Literal["attn2", "attn1", "ff", "proj", "resnets", "text_encoder"]
# Module-name patterns (peft matches them against the full name) of each target group.
UNET_TARGETS: dict[str, str] = {
    "attn2": r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    "attn1": r".*\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    "ff": r".*\.ff\.net\.(0\.proj|2)",
    "proj": r".*\.attentions\.\d+\.(proj_in|proj_out)",
    "resnets": r".*\.resnets\.\d+\.(conv1|conv2|conv_shortcut)",
}
TEXT_ENCODER_TARGETS = r".*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def inject_lora(
    unet: nn.Module,
    text_encoder: nn.Module,
    targets: Sequence[LoraTarget],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    text_encoder_2: nn.Module | None = None,
) -> None:
    """Add a trainable adapter (rank, alpha, dropout; gaussian down, zero up: a no-op at first) to every
    module of the `targets` groups; "text_encoder" targets the text encoder's attention and MLP, and
    SDXL's second text encoder's (`text_encoder_2`) too. peft freezes everything else of an injected
    model."""
    from peft import LoraConfig, inject_adapter_in_model

    unet_groups = [UNET_TARGETS[t] for t in targets if t in UNET_TARGETS]
    if not unet_groups:
        raise ConfigError(
            "lora.targets must include at least one U-Net group (attn2, attn1, ff, proj, resnets)"
        )
    adapter = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian")
    unet.add_adapter(LoraConfig(target_modules="(?:" + "|".join(unet_groups) + ")", **adapter))  # type: ignore[operator]
    # The text encoder takes peft's own injection, not transformers' `add_adapter` gate (transformers 5.24
    # demands an unreleased peft there); it also freezes all but the adapters and records `peft_config`.
    if "text_encoder" in targets:
        for model in (text_encoder, text_encoder_2):
            if model is not None:
                inject_adapter_in_model(LoraConfig(target_modules=TEXT_ENCODER_TARGETS, **adapter), model)
