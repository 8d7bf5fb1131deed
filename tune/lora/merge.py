"""Merging LoRAs into a pipeline's weights (`LoraStack`, `apply_loras`) and into a saved base model
(`merge_loras`, `tune lora merge`).

Merging: W <- W0 + sum_i scale_i * delta_i (LoRA: (alpha_i / r_i) * up_i @ down_i; LoHa, LoKr, DoRA: their
`delta()`, DoRA's from W0), computed in float32 from a saved copy
of W0, so changing a scale or removing a LoRA restores the original weights bit-identically. For a
Conv2d target the product is `up.flatten(1) @ down.flatten(1)` reshaped to [out, in, kh, kw]: for
1x1 convs that is the linear case, for 3x3 convs it equals kohya's `conv2d(down.permute(1,0,2,3),
up).permute(1,0,2,3)` (up is always 1x1).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tune.errors import ConfigError, ModelError
from tune.lora.core import Lora, LoraModule
from tune.lora.keys import _check_shape
from tune.lora.parts import check_module_shape
from tune.lora.read import load_lora, lora_targets, pipeline_family

logger = logging.getLogger(__name__)

# Which LoraStack currently owns a patched module, so two stacks never save each other's merged
# weights as "originals" (removing them in the wrong order would then corrupt the model). Keyed by
# module, not by weight tensor (tensors compare elementwise, which weak dictionaries cannot use), and
# holding the stack weakly so this registry never keeps a model alive. A stack dropped while patched
# leaves its LoRAs fused into the weights for good.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[LoraStack]] = weakref.WeakKeyDictionary()


class LoraStack:
    """LoRAs merged into one pipeline's weights, each at its own scale.

    The first LoRA touching a weight saves a copy of it; every change recomputes
    W = W0 + sum(scale * delta) from that copy, and removing the last LoRA on a weight copies W0 back,
    so the model returns bit-identical. Keep the stack while LoRAs are applied: it holds the originals.

        stack = LoraStack(pipe)
        stack.add(load_lora("style.safetensors", pipe), scale=0.8)
        stack.set_scale("style", 0.3)
        stack.clear()
    """

    def __init__(self, pipe: Any) -> None:
        self._targets = lora_targets(pipe)
        self._family = pipeline_family(pipe)
        self._entries: dict[str, tuple[Lora, float]] = {}
        self._originals: dict[str, torch.Tensor] = {}

    @property
    def scales(self) -> dict[str, float]:
        """Applied LoRAs by name, with their scales, in the order they were added."""
        return {name: scale for name, (_, scale) in self._entries.items()}

    def add(self, lora: Lora, scale: float = 1.0, name: str | None = None) -> str:
        """Merge `lora` at `scale`; returns the name to rescale or remove it by (default: file stem)."""
        name = name or lora.name
        if lora.family and self._family:
            from tune.models.families import check_same_family

            check_same_family(f"LoRA {lora.source or name}", lora.family, self._family)
        if name in self._entries:
            raise ConfigError(f"a LoRA named {name!r} is already applied; give this one another name")
        for target, pair in lora.modules.items():
            layer = self._layer(target)
            complaint = (
                _check_shape(target, pair, layer.weight)
                if isinstance(pair, LoraModule)
                else check_module_shape(pair, tuple(layer.weight.shape))
            )
            if complaint:
                raise ModelError(f"{lora.source or name}: {complaint}")
            owner = _OWNERS.get(layer, lambda: None)()
            if owner is not None and owner is not self:
                raise RuntimeError(f"{target} is already patched by another LoraStack; use that one")
        self._entries[name] = (lora, float(scale))
        self._refresh(lora.modules)
        return name

    def set_scale(self, name: str, scale: float) -> None:
        """Re-merge one applied LoRA at a new scale (from the saved originals: no drift)."""
        lora, _ = self._get(name)
        self._entries[name] = (lora, float(scale))
        self._refresh(lora.modules)

    def remove(self, name: str) -> None:
        """Take one LoRA out; weights no other LoRA touches become bit-identical to the originals."""
        lora, _ = self._get(name)
        del self._entries[name]
        self._refresh(lora.modules)

    def clear(self) -> None:
        """Remove every LoRA: all weights bit-identical to before the first `add`."""
        touched = list(self._originals)
        self._entries.clear()
        self._refresh(touched)

    def _get(self, name: str) -> tuple[Lora, float]:
        if name not in self._entries:
            applied = ", ".join(self._entries) or "none"
            raise ConfigError(f"no LoRA named {name!r} is applied (applied: {applied})")
        return self._entries[name]

    def _layer(self, target: str) -> nn.Module:
        component, path = target.split(".", 1)
        try:
            module = self._targets[component].get_submodule(path)
        except (KeyError, AttributeError):
            raise ModelError(
                f"this model has no module {target}; was the LoRA read for another model?"
            ) from None
        return getattr(module, "base_layer", module)  # PEFT-injected model: patch the wrapped layer

    @torch.no_grad()
    def _refresh(self, targets: Iterable[str]) -> None:
        for target in targets:
            layer = self._layer(target)
            weight = layer.weight
            active = [
                (lora.modules[target], s) for lora, s in self._entries.values() if target in lora.modules
            ]
            if not active:
                if target in self._originals:
                    weight.copy_(self._originals.pop(target))
                    _OWNERS.pop(layer, None)
                continue
            if target not in self._originals:
                self._originals[target] = weight.detach().clone()
                _OWNERS[layer] = weakref.ref(self)
            original = self._originals[target].to(torch.float32)
            merged = original
            for pair, scale in active:
                # DoRA's change depends on W0; at scale s it is s * (W' - W0), as ComfyUI and A1111 apply it.
                merged = merged + scale * pair.delta(weight.shape, device=weight.device, base=original)
            weight.copy_(merged.to(weight.dtype))


def apply_loras(pipe: Any, specs: Iterable[tuple[str | Path | Lora, float]]) -> LoraStack:
    """Load (if given paths) and merge several LoRAs, each at its own scale; returns the stack."""
    stack = LoraStack(pipe)
    for spec, scale in specs:
        lora = spec if isinstance(spec, Lora) else load_lora(spec, pipe)
        name = lora.name
        suffix = 2
        while name in stack.scales:  # the same file twice, or two files with one stem
            name, suffix = f"{lora.name}-{suffix}", suffix + 1
        stack.add(lora, scale, name=name)
    return stack


def merge_loras(
    base: str | Path,
    specs: Iterable[tuple[str | Path, float]],
    out: str | Path,
    *,
    config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """`tune lora merge`: a base model with LoRAs merged in at their scales, written as a diffusers
    folder (`save_pretrained`; dtype as loaded unless given) or, for a `.safetensors` out, as one
    checkpoint of the base's family (`tune.models.save_single_file`; fp16 unless given)."""
    from tune.models import load_pipeline, resolve_model_path, save_single_file

    out = Path(out)
    specs = [(Path(path), float(scale)) for path, scale in specs]
    if not specs:
        raise ConfigError("name at least one LoRA to merge: LORA[:SCALE]")
    single_file = out.suffix == ".safetensors"
    if out.suffix and not single_file:
        raise ConfigError(f"--out must be a folder or a .safetensors file; got {out}")
    if out.resolve() == resolve_model_path(base).resolve():
        raise ConfigError(f"--out {out} is the base model; write the merged model elsewhere")
    if single_file and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a .safetensors file or a folder without suffix")
    if not single_file and out.is_file():
        raise ConfigError(f"--out {out} is a file; name a folder, or a .safetensors file")
    if out.exists() and (single_file or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it, or --out to write elsewhere")
    for path, _ in specs:
        if not path.is_file():
            raise ModelError(f"LoRA file not found: {path}")
    pipe = load_pipeline(base, config=config)
    apply_loras(pipe, specs)
    if single_file:
        save_single_file(pipe, out, dtype or torch.float16)
    else:
        if dtype is not None:
            pipe.to(dtype=dtype)
        pipe.save_pretrained(out, safe_serialization=True)
    logger.info("merged %d LoRA(s) into %s -> %s", len(specs), base, out)
    return out
