"""Key mapping: the keys of any LoRA file we read (kohya, diffusers, PEFT) -> `Lora` on OUR module names.

Key forms understood (see /work/shared/reference/lora-formats.md):

    kohya      lora_unet_<path with . -> _>.{lora_down.weight, lora_up.weight, alpha}, the path in diffusers'
               names or the LDM/SGM ones (`input_blocks_4_1_...`, SDXL's usual spelling; `tune.lora.sgm`)
               lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|...|mlp_fc2>.{...}  (also lora_te1_)
               lora_te2_text_model_encoder_layers_<i>_...  (SDXL's second text encoder)
    diffusers  unet.<path>.lora_A.weight / .lora_B.weight            (current, PEFT-based)
               unet.<path>.lora.down.weight / .lora.up.weight        (older)
               text_encoder.<path>.lora_linear_layer.down.weight     (older text encoder)
               unet.<...>.attn1.processor.to_q_lora.down.weight      (oldest, attention processors)
    PEFT       base_model.model.<path>.lora_A.weight, or <path>.lora_A.weight without a prefix; the
               scale comes from adapter_config.json beside the file (or diffusers'
               `lora_adapter_metadata`), since PEFT keeps alpha out of the tensors.

The key mapping is written by hand on purpose: no library maps kohya text-encoder keys onto
transformers 5's flattened CLIPTextModel (kohya's LoRANetwork and diffusers' converter both assume
the `text_model.` level), so we resolve every name against the model's own `named_modules()`,
accepting both the `text_model.`-prefixed and the flattened spelling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from tune.errors import ModelError
from tune.lora.core import AdapterModule, Lora, LoraFormat, LoraModule
from tune.lora.parts import build_module, check_module_shape, split_role
from tune.lora.sgm import unet_module_to_sgm

if TYPE_CHECKING:
    from tune.models.families import Family

AlphaRule = Callable[[str, int], "float | None"]
"""alpha_for(key stem, rank) -> alpha, for files whose alphas live outside the tensors (PEFT)."""
RankRule = Callable[[str], "int | None"]
"""rank_for(key stem) -> the config's r (PEFT LoKr with both factors full has none in its shapes)."""

# How many unmatched keys an error message lists before saying "and N more".
_MAX_LISTED = 5

# kohya prefix -> component. `lora_te1_` is what diffusers' convert_state_dict_to_kohya writes even
# for SD1.x; A1111 and ComfyUI accept it there, so we do too. `lora_te2_` is SDXL's second encoder (on a
# model without one it ends up in the "unmatched" error).
_KOHYA_PREFIX = re.compile(r"^lora_(unet|te\d?)_(.+)$")
_KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_DOTTED_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
_PEFT_PREFIX = "base_model.model."

# Old diffusers attention-processor names -> module names of today's diffusers / transformers.
_PATH_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.processor\.(to_[qkv])$"), r".\1"),
    (re.compile(r"\.processor\.to_out$"), r".to_out.0"),
    (re.compile(r"\.self_attn\.to_([qkv])$"), r".self_attn.\1_proj"),
    (re.compile(r"\.self_attn\.to_out$"), r".self_attn.out_proj"),
)

# transformers < 5 (and every LoRA file) nests CLIPTextModel's modules under `text_model.`;
# transformers >= 5 does not. Text-encoder names are indexed in both spellings.
_TEXT_MODEL_LEVEL = "text_model."


class _ModuleIndex:
    """Names under which a LoRA file may refer to one component's Linear/Conv2d modules."""

    def __init__(self, component: str, root: nn.Module) -> None:
        self.component = component
        self.dotted: dict[str, str] = {}
        self.underscored: dict[str, str | None] = {}  # None: two modules share the underscored name
        self.weights: dict[str, torch.Tensor] = {}
        config = getattr(root, "config", None) if component == "unet" else None
        for name, module in root.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            parts = name.split(".")
            # A PEFT-injected model: patch the wrapped base layer, never the adapter's own layers.
            if any(part.startswith("lora_") for part in parts):
                continue
            path = name.removesuffix(".base_layer")
            self.weights[path] = module.weight
            aliases = [path]
            if config is not None:
                try:  # the LDM/SGM spelling of the same module
                    aliases.append(unet_module_to_sgm(path, config))
                except KeyError:
                    pass
            if component.startswith("text_encoder"):
                if path.startswith(_TEXT_MODEL_LEVEL):
                    aliases.append(path[len(_TEXT_MODEL_LEVEL) :])
                else:
                    aliases.append(_TEXT_MODEL_LEVEL + path)
            for alias in aliases:
                self.dotted[alias] = path
                flat = alias.replace(".", "_")
                if self.underscored.get(flat, path) != path:
                    self.underscored[flat] = None
                else:
                    self.underscored[flat] = path

    def find(self, name: str, *, underscored: bool) -> str | None:
        if underscored:
            return self.underscored.get(name)
        for pattern, replacement in _PATH_REWRITES:
            name = pattern.sub(replacement, name)
        return self.dotted.get(name)


def _resolve_stem(stem: str, indexes: Mapping[str, _ModuleIndex]) -> tuple[LoraFormat, str | None]:
    """(key style, "<component>.<module path>" or None when nothing in the model matches)."""
    kohya = _KOHYA_PREFIX.match(stem)
    if kohya:
        index = indexes.get(_KOHYA_COMPONENTS[kohya.group(1)])
        path = index.find(kohya.group(2), underscored=True) if index else None
        return "kohya", f"{index.component}.{path}" if index and path else None
    for prefix in _DOTTED_PREFIXES:
        if stem.startswith(prefix):
            index = indexes.get(prefix[:-1])
            path = index.find(stem[len(prefix) :], underscored=False) if index else None
            return "diffusers", f"{index.component}.{path}" if index and path else None
    # PEFT files name paths relative to the model they were made from, so the component is
    # whichever one has a module of that name.
    style: LoraFormat = "peft"
    name = stem.removeprefix(_PEFT_PREFIX)
    for index in indexes.values():
        path = index.find(name, underscored=False)
        if path:
            return style, f"{index.component}.{path}"
    return style, None


def _architecture_hint(keys: Iterable[str]) -> str | None:
    """What unmatched keys suggest the file was made for, when they say it clearly."""
    keys = list(keys)
    if any("lora_te2_" in k or k.startswith("text_encoder_2.") for k in keys):
        return "SDXL (it has a second text encoder)"
    if any(re.match(r"lora_unet_(input_blocks|output_blocks|middle_block)_", k) for k in keys):
        return (
            "a U-Net with LDM/SGM names (input_blocks...): SDXL, or SD1.x from a trainer that neither "
            "we nor diffusers read"
        )
    if any(re.search(r"\.oft_|\.(hada|lokr)_t\d|lora_mid", k) for k in keys):
        return "a LoRA variant we do not read (OFT, Tucker LoHa/LoKr, LoCon mid weights)"
    return None


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", and {more} more" if more > 0 else "")


def _check_shape(target: str, pair: LoraModule, weight: torch.Tensor, *, widths: bool = True) -> str | None:
    """A one-line complaint when the pair cannot produce a delta of the weight's shape, else None.

    `widths=False` checks only what the module names imply (rank agreement, Linear vs conv kernel),
    for files mapped onto SD1.x's module names without a model of known widths.
    """
    down, up, shape = pair.down, pair.up, tuple(weight.shape)
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        return f"{target}: up {tuple(up.shape)} and down {tuple(down.shape)} are no low-rank pair"
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"{target}: up must be 1x1; got {tuple(up.shape)}"
    kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
    expected = (up.shape[0], down.shape[1]) + ((kernel) if len(shape) == 4 else ())
    if len(shape) == 2 and kernel != (1, 1):
        return f"{target}: conv LoRA {tuple(down.shape)} for a Linear weight {shape}"
    if not widths:
        if len(shape) == 4 and kernel != shape[2:]:
            return f"{target}: LoRA kernel {kernel} but the module's kernel is {shape[2:]}"
        return None
    if expected != shape:
        return f"{target}: LoRA gives {expected} but the model's weight is {shape}"
    return None


def _fit_pair(pair: AdapterModule, weight: torch.Tensor) -> AdapterModule:
    """The pair in the layout of its target: 4-D for Conv2d (kohya writes 2-D for 1x1 convs at times),
    2-D for Linear (some tools write [r, in, 1, 1] for them), so writers need no model."""
    if not isinstance(pair, LoraModule):
        return pair
    down, up = pair.down, pair.up
    if weight.ndim == 4:
        down = down if down.ndim == 4 else down[:, :, None, None]
        up = up if up.ndim == 4 else up[:, :, None, None]
    else:
        down, up = down.flatten(1), up.flatten(1)
    if down is pair.down and up is pair.up:
        return pair
    return LoraModule(down=down, up=up, alpha=pair.alpha, magnitude=pair.magnitude)


def _module_rank(slot: dict[str, torch.Tensor], config_rank: int | None) -> int:
    """The r of alpha / r that the shapes give (LoHa: w1_b's rows; LoKr: w2_b's, else w1_b's)."""
    for role in ("down", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if role in slot:
            return int(slot[role].shape[0])
    return config_rank or 1


def parse_lora(
    tensors: Mapping[str, torch.Tensor],
    targets: Mapping[str, nn.Module],
    *,
    alpha_for: AlphaRule | None = None,
    rank_for: RankRule | None = None,
    metadata: Mapping[str, str] | None = None,
    source: str = "",
    check_shapes: bool = True,
    family: Family | None = None,
) -> Lora:
    """Map a LoRA state dict of any supported style onto `targets` ({"unet": ..., "text_encoder": ...}).

    `alpha_for(stem, rank) -> float | None` supplies alphas the tensors do not carry (PEFT configs),
    `rank_for(stem)` their r. Modules are LoRA, DoRA, LoHa or LoKr by their keys (`tune.lora.parts`).
    Raises ModelError when any key does not map onto a Linear/Conv2d of the targets, when a module
    lacks its down or up half, or when shapes disagree with the model's weights (with
    `check_shapes=False` only ranks and kernels are checked: targets of the same topology but other
    widths, such as `sd1_module_skeleton()`). Conv pairs come back 4-D and Linear pairs 2-D. `family`
    (sd1, sd2, sdxl: what the targets are) is recorded in the Lora for writers.
    """
    where = source or "LoRA"
    indexes = {name: _ModuleIndex(name, module) for name, module in targets.items() if module is not None}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    first_key: dict[str, str] = {}
    formats: set[LoraFormat] = set()
    unmatched: list[str] = []
    for key in sorted(tensors):
        split = split_role(key)
        if split is None:
            unmatched.append(key)
            continue
        stem, role = split
        style, target = _resolve_stem(stem, indexes)
        if target is None:
            unmatched.append(key)
            continue
        formats.add(style)
        slot = parts.setdefault(target, {})
        if role in slot:
            raise ModelError(f"{where}: two keys give the {role} of {target} (second: {key})")
        slot[role] = tensors[key]
        first_key.setdefault(target, stem)
    if unmatched:
        guess = _architecture_hint(unmatched)
        question = (
            f"it looks like a LoRA for {guess}"
            if guess
            else "is the LoRA for another architecture (SDXL, SD2) or a LoRA variant we do not read "
            "(LoHa, LoKr, DoRA)?"
        )
        raise ModelError(
            f"{where}: {len(unmatched)} of {len(tensors)} keys match no module of this model's "
            f"{' or '.join(indexes)}: {_listing(unmatched)}; {question}"
        )

    modules: dict[str, AdapterModule] = {}
    problems: list[str] = []
    for target, slot in parts.items():
        stem = first_key[target]
        component, path = target.split(".", 1)
        weight = indexes[component].weights[path]
        if "alpha" in slot and slot["alpha"].numel() != 1:
            problems.append(f"{stem} has an alpha of {slot['alpha'].numel()} values, not one")
            continue
        alpha: float | None = float(slot["alpha"].float().item()) if "alpha" in slot else None
        config_rank = rank_for(stem) if rank_for is not None else None
        if alpha is None and alpha_for is not None:
            alpha = alpha_for(stem, _module_rank(slot, config_rank))
        # kohya: a missing or zero alpha means alpha = rank (scale 1).
        module = build_module(slot, alpha or None, config_rank, tuple(weight.shape))
        if isinstance(module, str):
            problems.append(f"{stem} {module}")
            continue
        if isinstance(module, LoraModule):
            complaint = _check_shape(target, module, weight, widths=check_shapes)
        else:
            complaint = check_module_shape(module, tuple(weight.shape)) if check_shapes else None
        if complaint:
            problems.append(complaint)
            continue
        modules[target] = _fit_pair(module, weight)
    if problems:
        raise ModelError(
            f"{where}: {len(problems)} of {len(parts)} modules do not fit this model: {_listing(problems)}"
        )
    return Lora(
        modules=modules,
        formats=frozenset(formats),
        metadata=dict(metadata or {}),
        source=source,
        family=family,
    )
