"""The normalized form every part of `tune.lora` reads into and writes from: `Lora`, `LoraModule`.

The normalized representation is `Lora.modules`: `"<component>.<module path>" -> LoraModule(down, up,
alpha)`, where component is `unet`, `text_encoder` or (SDXL) `text_encoder_2` and the module path is exactly what
`named_modules()` of the *loaded* component reports (so under transformers 5 a text-encoder path is
`encoder.layers.0.self_attn.q_proj`, without the `text_model.` level files usually carry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from tune.lora.lycoris import LohaModule, LokrModule, decomposed_weight

if TYPE_CHECKING:  # tune.models loads diffusers; reading and writing LoRA files does not need it
    from tune.models.families import Family

Component = Literal["unet", "text_encoder", "text_encoder_2"]
COMPONENTS: tuple[Component, ...] = ("unet", "text_encoder", "text_encoder_2")
"""text_encoder_2 is SDXL's second text encoder (OpenCLIP bigG); SD1.x and SD2.x have none."""
LoraFormat = Literal["kohya", "diffusers", "peft"]
AdapterType = Literal["lora", "dora", "loha", "lokr"]
ADAPTER_TYPES: tuple[AdapterType, ...] = ("lora", "dora", "loha", "lokr")
ExportFormat = Literal["kohya", "diffusers"]
ADAPTER_TYPE_KEY = "tune_adapter_type"
ADAPTER_CONFIG_KEY = "tune_adapter_config"
"""Metadata of a run's adapter file of a LoHa/LoKr/DoRA run (PEFT key names): the type, and the PEFT
config as JSON (r, alpha, the type's options; flat, or one config per component)."""


@dataclass(frozen=True)
class LoraModule:
    """One low-rank pair for one Linear or Conv2d weight."""

    down: torch.Tensor
    """[r, in] for Linear, [r, in, kh, kw] for Conv2d (a 2-D down is accepted for 1x1 convs)."""
    up: torch.Tensor
    """[out, r] for Linear, [out, r, 1, 1] for Conv2d."""
    alpha: float
    """The file's alpha; the merged update is (alpha / rank) * up @ down."""
    magnitude: torch.Tensor | None = None
    """DoRA's magnitude, [out, 1(, 1, 1)] (per output row, PEFT) or [1, in(, 1, 1)] (per input column,
    old LyCORIS files); None for plain LoRA. See `tune.lora.lycoris.decomposed_weight`."""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kind(self) -> AdapterType:
        return "lora" if self.magnitude is None else "dora"

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.down, self.up) + (() if self.magnitude is None else (self.magnitude,))

    def low_rank_delta(
        self, shape: torch.Size | tuple[int, ...], device: torch.device | None = None
    ) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32, shaped like the target weight."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).reshape(shape) * (self.alpha / self.rank)

    def delta(
        self,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weight change in float32: the low-rank product, or for DoRA W' - W0, which depends on the
        base weight W0 (`base`, required then)."""
        low_rank = self.low_rank_delta(shape, device)
        if self.magnitude is None:
            return low_rank
        if base is None:
            raise ValueError("a DoRA module's delta depends on the base weight; pass base=")
        base = base.to(device=device, dtype=torch.float32)
        return decomposed_weight(low_rank, self.magnitude.to(device), base) - base


AdapterModule = LoraModule | LohaModule | LokrModule
"""Any module a file may hold; each has `kind`, `alpha`, `tensors` and `delta(shape, device, base)`."""


@dataclass(frozen=True)
class Lora:
    """A LoRA file mapped onto our modules."""

    modules: dict[str, AdapterModule]
    """`"unet.<module path>"` / `"text_encoder.<module path>"` -> the module for that weight (a LoRA
    pair in most files; LoHa, LoKr, DoRA modules otherwise)."""
    formats: frozenset[LoraFormat]
    """The key styles found in the file (usually one)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """The safetensors header metadata, as stored."""
    source: str = ""
    """Where it was read from (for messages)."""
    family: Family | None = None
    """The base model family the module names belong to (sd1, sd2, sdxl); None when not known (taken as
    SD1.x by writers, as before SDXL and SD2 existed)."""

    @property
    def kinds(self) -> frozenset[AdapterType]:
        """The adapter types of the modules: {"lora"} for a plain LoRA file."""
        return frozenset(module.kind for module in self.modules.values())

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "lora"
