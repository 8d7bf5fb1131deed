"""The dashboard's Export page: the run's export/*.safetensors files, each summarised without torch (only
the header is read, with safetensors' numpy backend: kind, key format, modules, ranks, metadata), with a
download button and, for LoRA files, the full `tune lora inspect` report on demand (loads torch)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import streamlit as st

from tune.errors import TuneError
from tune.runs import RunInfo

_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight")
_DOWN_SUFFIXES += (".lora_linear_layer.down.weight",)
# safetensors' header dtype codes -> the names torch and numpy users know.
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}
_DTYPE_NAMES |= {"I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_DTYPE_NAMES |= {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def _dtype_name(code: object) -> str:
    return _DTYPE_NAMES.get(str(code), str(code).lower())


def export_files(run: RunInfo) -> list[Path]:
    return [p for p in run.exports if p.suffix == ".safetensors"]


def describe_safetensors(path: str | Path) -> dict[str, Any]:
    """A torch-free summary of a safetensors file: size, tensor count, dtypes, parameters, and for
    LoRA files the key format, modules per component and ranks (from the down-projection shapes).
    Only the header is read (safetensors' numpy backend), never the tensor data."""
    from safetensors import safe_open

    path = Path(path)
    summary: dict[str, Any] = {"file": path.name, "size_mb": round(path.stat().st_size / 2**20, 3)}
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys}
            dtypes = sorted({_dtype_name(f.get_slice(k).get_dtype()) for k in keys})
    except Exception as err:  # noqa: BLE001 - any unreadable file is shown as such, not a crash
        return {**summary, "problem": f"not a readable safetensors file: {err}"}
    params = sum(math.prod(s) for s in shapes.values())
    summary.update(tensors=len(keys), dtypes=dtypes, parameters=params, metadata=metadata)
    downs = [k for k in keys if k.endswith(_DOWN_SUFFIXES)]
    if downs:
        fmt = (
            "kohya"
            if all(k.startswith("lora_") for k in downs)
            else "peft"
            if any(k.startswith("base_model.") for k in downs)
            else "diffusers"
        )
        components: dict[str, int] = {}
        for k in downs:
            comp = _lora_component(k)
            components[comp] = components.get(comp, 0) + 1
        summary.update(
            kind="LoRA",
            format=fmt,
            modules=components,
            ranks=sorted({shapes[k][0] for k in downs if shapes[k]}),
        )
    elif len(keys) == 1 and len(shapes[keys[0]]) <= 2:
        summary.update(kind="embedding", token=keys[0], vectors=shapes[keys[0]][0] if shapes[keys[0]] else 1)
    elif set(keys) == set(_SDXL_EMBEDDING_KEYS) and all(len(shapes[k]) == 2 for k in keys):
        # SDXL's one-file textual inversion: a row block per text encoder; the token is the file name.
        summary.update(kind="embedding", format="SDXL (clip_l + clip_g)", vectors=shapes["clip_g"][0])
    else:
        summary.update(kind="weights")
    trigger = metadata.get("modelspec.trigger_phrase") or metadata.get("token")
    if trigger:
        summary["trigger"] = trigger
    base = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    if base:
        summary["base"] = base
    return summary


def _lora_component(key: str) -> str:
    """unet, text_encoder or text_encoder_2 (SDXL's second) from a kohya or diffusers LoRA key."""
    if key.startswith(("lora_te2_", "text_encoder_2.")):
        return "text_encoder_2"
    if key.startswith(("lora_te", "text_encoder")):  # lora_te_ (SD1/SD2) and lora_te1_ (SDXL)
        return "text_encoder"
    return "unet"


_EXPORT_FACTS = "kind format base tensors parameters dtypes modules ranks vectors trigger".split()
"""What the Export page shows of each file's summary (describe_safetensors), in this order."""


def page_export(run: RunInfo, name: str) -> None:
    st.header(f"Export · {name}")
    found = export_files(run)
    others = [p for p in run.exports if p.suffix != ".safetensors"]
    if not found:
        st.info(f"{name} has no export/*.safetensors files yet.")
    for path in found:
        summary = describe_safetensors(path)
        rel = path.relative_to(run.path)
        with st.container(border=True):
            st.markdown(f"**{rel}** · {summary['size_mb']} MB")
            if "problem" in summary:
                st.error(summary["problem"])
                continue
            facts = {k: summary[k] for k in _EXPORT_FACTS if k in summary}
            st.json(facts, expanded=True)
            st.download_button(
                f"Download {path.name}",
                data=functools.partial(path.read_bytes),
                file_name=path.name,
                mime="application/octet-stream",
                key=f"dl:{rel}",
            )
            with st.expander(f"metadata ({len(summary['metadata'])} keys)"):
                st.json({k: _short(v) for k, v in sorted(summary["metadata"].items())}, expanded=True)
            if summary.get("kind") == "LoRA" and st.button(
                "Full inspect (loads torch)", key=f"inspect:{rel}"
            ):
                from tune.lora import format_report, inspect_lora

                try:
                    st.code(format_report(inspect_lora(path)), language=None)
                except TuneError as err:
                    st.error(str(err))
    if others:
        st.caption(f"also in export/: {len(others)} other files, e.g. {others[0].relative_to(run.path)}")


def _short(value: str, most: int = 200) -> str:
    return value if len(value) <= most else f"{value[:most]}... ({len(value)} chars)"
