"""Inspecting LoRA files (`tune lora inspect`): format, architecture, modules per group, ranks,
alphas, targets, trigger, metadata, hash check, and notes on which tools load the file.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tune.errors import ModelError
from tune.lora.core import AdapterModule, AdapterType, Lora
from tune.lora.files import SSHS_HASH_KEY, safetensors_data_hash
from tune.lora.keys import _DOTTED_PREFIXES, _KOHYA_PREFIX, _architecture_hint
from tune.lora.read import read_lora_file
from tune.lora.skeleton import _cross_attention_width, read_lora
from tune.lora.write import ADAPTER_METADATA_KEY

_BLOCK_PREFIX = re.compile(
    r"^(?:(?:down|up)_blocks\.\d+\.(?:attentions|resnets|downsamplers|upsamplers)\.\d+\."
    r"|mid_block\.(?:attentions|resnets)\.\d+\.|(?:text_model\.)?encoder\.layers\.\d+\.)"
    r"(?:transformer_blocks\.\d+\.)?"
)


def module_group(target: str) -> str:
    """The row `tune lora inspect` reports a module in: unet attn1 / attn2 / ff / proj / resnets /
    samplers / other, text_encoder self_attn / mlp."""
    component, path = target.split(".", 1)
    if component.startswith("text_encoder"):
        return f"{component} self_attn" if ".self_attn." in path else f"{component} mlp"
    for part, group in ((".attn1.", "attn1"), (".attn2.", "attn2"), (".ff.", "ff"), (".resnets.", "resnets")):
        if part in path:
            return f"unet {group}"
    if path.endswith(("proj_in", "proj_out")):
        return "unet proj"
    if "samplers." in path:
        return "unet samplers"
    return "unet other"


def module_leaf(target: str) -> str:
    """`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` -> `attn1.to_q`: the
    name a module has inside its block (what PEFT's target_modules usually lists)."""
    return _BLOCK_PREFIX.sub("", target.split(".", 1)[1])


@dataclass(frozen=True)
class LoraGroup:
    """Modules of one kind (see `module_group`) and their ranks, alphas and scales alpha / r."""

    name: str
    modules: int
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    scales: tuple[float, ...]


@dataclass(frozen=True)
class LoraReport:
    """What `tune lora inspect` prints about a file."""

    path: Path
    format: str
    architecture: str
    keys: int
    dtypes: tuple[str, ...]
    modules: dict[str, int]
    """Modules per component."""
    groups: tuple[LoraGroup, ...]
    targets: dict[str, tuple[str, ...]]
    """Module names inside their blocks (`module_leaf`), per component."""
    trigger: str | None
    metadata: dict[str, str]
    data_hash: str
    recorded_hash: str | None
    notes: tuple[str, ...]
    problem: str | None = None
    """Why the file does not map onto its family's module names, when it does not."""
    family: str | None = None
    """sd1, sd2 or sdxl: the base model family the file is for (None when it does not map)."""
    type: str = "LoRA"
    """The adapter type(s) of the modules: LoRA, DoRA, LoHa, LoKr ("LoRA + LoHa" for a mix)."""

    @property
    def hash_ok(self) -> bool | None:
        """sshs_model_hash == the data's hash; None when the file records none."""
        return None if self.recorded_hash is None else self.recorded_hash == self.data_hash


def _raw_format(keys: Iterable[str]) -> str:
    styles = set()
    for key in keys:
        if _KOHYA_PREFIX.match(key):
            styles.add("kohya")
        elif key.startswith(_DOTTED_PREFIXES):
            styles.add("diffusers")
        else:
            styles.add("peft")
    return "+".join(sorted(styles))


def _compatibility_notes(
    lora: Lora, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> list[str]:
    notes = []
    if "kohya" in lora.formats:
        attention = {
            p.alpha for t, p in lora.modules.items() if module_group(t) in ("unet attn1", "unet attn2")
        }
        text = {p.alpha for t, p in lora.modules.items() if t.startswith("text_encoder")}
        if len(attention) > 1 or len(text) > 1:
            notes.append(
                "alphas differ between attention or text-encoder modules: diffusers loads them at the wrong "
                "scale; `tune lora convert FILE --to kohya` writes one alpha with the scales folded in"
            )
        if any(key.startswith(("lora_te_encoder_", "lora_te1_encoder_")) for key in tensors):
            notes.append(
                "text-encoder keys lack `text_model` (written under transformers 5): ComfyUI and A1111 skip "
                "them; `tune lora convert FILE --to kohya` writes canonical names"
            )
        if lora.family in (None, "sd1") and any(key.startswith("lora_te1_") for key in tensors):
            notes.append(
                "`lora_te1_` text-encoder keys: kohya's SD1 loader ignores them (A1111, ComfyUI read them)"
            )
    else:
        notes.append(
            "diffusers/PEFT keys: A1111 loads none of them and ComfyUI skips the U-Net attention modules; "
            "share `tune lora convert FILE --to kohya` with those tools"
        )
        if "peft" in lora.formats and ADAPTER_METADATA_KEY not in metadata and lora.source:
            if not Path(lora.source).with_name("adapter_config.json").is_file():
                notes.append(
                    "no adapter_config.json or lora_adapter_metadata: alpha = rank (scale 1) assumed"
                )
    return notes


TYPE_NAMES: dict[AdapterType, str] = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def adapter_type_name(kinds: Iterable[AdapterType]) -> str:
    """{"loha"} -> "LoHa"; several -> "LoRA + LoHa" (in the order lora, dora, loha, lokr)."""
    return " + ".join(name for kind, name in TYPE_NAMES.items() if kind in set(kinds)) or "LoRA"


def _raw_type(keys: Iterable[str]) -> str:
    """The adapter type(s) the key names of a file we cannot map say."""
    kinds: set[AdapterType] = set()
    for key in keys:
        kinds.add(
            "loha" if ".hada_" in key
            else "lokr" if ".lokr_" in key
            else "dora" if key.endswith((".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight"))
            else "lora"
        )  # fmt: skip
    if "dora" in kinds:
        kinds.discard("lora")
    return adapter_type_name(kinds)


def _type_notes(lora: Lora, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    notes = []
    if lora.kinds & {"loha", "lokr"}:
        notes.append(
            "LyCORIS type: ComfyUI, A1111 and `tune sample --lora`/`tune lora merge` load it; diffusers' "
            "load_lora_weights cannot"
        )
    if "dora" in lora.kinds and any(key.endswith(".dora_scale") for key in tensors):
        notes.append(
            "kohya DoRA (dora_scale): A1111 and ComfyUI disagree on its axis, so other tools may not draw what "
            "it was trained to; tune reads it by its shape ([out, 1] rows, [1, in] columns)"
        )
    elif "dora" in lora.kinds:
        notes.append("PEFT DoRA (lora_magnitude_vector): diffusers and tune load it exactly; A1111 cannot")
    return notes


def inspect_lora(path: str | Path) -> LoraReport:
    """Read a LoRA file and describe it (format, architecture, modules per group, ranks, alphas,
    targets, trigger, metadata, hash check). The family (SD1.x, SD2.x, SDXL) is the file's own
    (`family_of_lora`), SD1.x when nothing tells. Files we cannot map onto that family's modules are
    still described, with `problem` saying why."""
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    data_hash = safetensors_data_hash(path)
    dtypes = tuple(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))
    declared = " / ".join(
        v for v in (metadata.get("modelspec.architecture"), metadata.get("ss_base_model_version")) if v
    )
    trigger = metadata.get("modelspec.trigger_phrase") or None
    common: dict[str, Any] = {
        "path": path,
        "keys": len(tensors),
        "dtypes": dtypes,
        "trigger": trigger,
        "metadata": metadata,
        "data_hash": data_hash,
        "recorded_hash": metadata.get(SSHS_HASH_KEY),
    }
    try:
        lora = read_lora(path)
    except ModelError as err:
        keys = list(tensors)
        guess = _architecture_hint(keys) or declared or "unknown"
        return LoraReport(
            format=_raw_format(keys),
            architecture=f"unreadable: {guess}",
            modules={},
            groups=(),
            targets={},
            notes=(),
            problem=str(err),
            type=_raw_type(keys),
            **common,
        )

    architecture = _architecture(lora.family or "sd1", _cross_attention_width(lora))
    if declared:
        architecture += f"; declared {declared}"
    rows: dict[str, list[AdapterModule]] = {}
    for target, pair in sorted(lora.modules.items()):
        rows.setdefault(module_group(target), []).append(pair)
    groups = tuple(
        LoraGroup(
            name=name,
            modules=len(pairs),
            ranks=tuple(sorted({p.rank for p in pairs})),
            alphas=tuple(sorted({p.alpha for p in pairs})),
            scales=tuple(sorted({p.alpha / p.rank for p in pairs})),
        )
        for name, pairs in sorted(rows.items())
    )
    modules: dict[str, int] = {}
    targets: dict[str, set[str]] = {}
    for target in lora.modules:
        component = target.split(".", 1)[0]
        modules[component] = modules.get(component, 0) + 1
        targets.setdefault(component, set()).add(module_leaf(target))
    return LoraReport(
        format="/".join(sorted(lora.formats)),
        architecture=architecture,
        modules=modules,
        groups=groups,
        targets={component: tuple(sorted(names)) for component, names in targets.items()},
        notes=tuple(_type_notes(lora, tensors) + _compatibility_notes(lora, tensors, metadata)),
        family=lora.family,
        type=adapter_type_name(lora.kinds),
        **common,
    )


_FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_REAL_WIDTHS = {"sd1": (768, "CLIP ViT-L/14"), "sd2": (1024, "OpenCLIP-H"), "sdxl": (2048, "CLIP-L + bigG")}


def _architecture(family: str, width: int | None) -> str:
    label = _FAMILY_LABELS[family]
    real, text = _REAL_WIDTHS[family]
    if width == real:
        return f"{label} (cross-attention {real}: {text})"
    if width:
        return f"{label} topology, cross-attention width {width}"
    return f"{label} (no cross-attention module to tell the width by)"


# Long metadata values (the resolved TOML config, adapter configs) are summarised, not printed whole.
_MAX_VALUE_CHARS = 80


def _numbers(values: tuple[float, ...] | tuple[int, ...]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _value(value: str) -> str:
    lines = value.splitlines()
    if len(lines) > 1:
        return f"<{len(lines)} lines, {len(value)} chars>"
    return value if len(value) <= _MAX_VALUE_CHARS else value[: _MAX_VALUE_CHARS - 3] + "..."


def format_report(report: LoraReport) -> str:
    """The text `tune lora inspect` prints for a `tune.lora.LoraReport`."""
    modules = sum(report.modules.values())
    per_component = ", ".join(f"{name} {count}" for name, count in sorted(report.modules.items()))
    lines = [
        f"file:          {report.path}",
        f"format:        {report.format} ({report.keys} tensors, {'/'.join(report.dtypes)})",
        f"type:          {report.type}",
        f"architecture:  {report.architecture}",
    ]
    if report.problem:
        lines.append(f"problem:       {report.problem}")
    else:
        lines.append(f"modules:       {modules} ({per_component})")
        lines.append("groups:        group                     modules  rank      alpha     scale (alpha/r)")
        for group in report.groups:
            lines.append(
                f"               {group.name:<25} {group.modules:>7}  {_numbers(group.ranks):<9} "
                f"{_numbers(group.alphas):<9} {_numbers(group.scales)}"
            )
        for component, names in sorted(report.targets.items()):
            lines.append(f"targets:       {component}: {', '.join(names)}")
    lines.append(f"trigger:       {report.trigger or '(none recorded)'}")
    if report.hash_ok is None:
        lines.append(f"sshs hash:     not recorded (A1111 hashes the file itself); data {report.data_hash}")
    elif report.hash_ok:
        lines.append(f"sshs hash:     ok {report.data_hash}")
    else:
        lines.append(
            f"sshs hash:     MISMATCH: metadata says {report.recorded_hash}, data is {report.data_hash}"
        )
    lines.append(f"metadata:      {len(report.metadata)} keys")
    for key in sorted(report.metadata):
        lines.append(f"  {key} = {_value(report.metadata[key])}")
    for note in report.notes:
        lines.extend(
            textwrap.wrap(note, width=100, initial_indent="note:          ", subsequent_indent=" " * 15)
        )
    return "\n".join(lines)
