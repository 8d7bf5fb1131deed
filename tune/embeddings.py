"""Textual-inversion files: the new tokens' rows (`tune.tokens.NewTokens`) written and read back.

File format (`learned_embeds.safetensors`, float32, the token also in the metadata):
- SD1/SD2: one tensor named after the token, [num_vectors, hidden_size], the layout diffusers'
  textual-inversion script writes: `pipe.load_textual_inversion(path, token="sks")`. With a single key it
  also loads in A1111 (the file name is the trigger there) and ComfyUI.
- SDXL: `{"clip_l": [n, width of text_encoder], "clip_g": [n, width of text_encoder_2]}`, what A1111,
  ComfyUI and kohya read and write for SDXL. diffusers loads it with two calls:
      sd = safetensors.torch.load_file(path)
      pipe.load_textual_inversion(sd["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
      pipe.load_textual_inversion(sd["clip_g"], token="sks", text_encoder=pipe.text_encoder_2,
                                  tokenizer=pipe.tokenizer_2)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tune.errors import ModelError
from tune.models.families import SDXL_EMBEDDING_KEYS as SDXL_KEYS
from tune.models.families import Family, check_same_family, family_of_embedding

if TYPE_CHECKING:
    from tune.tokens import NewTokens

EMBEDDINGS_FILE = "learned_embeds.safetensors"


def save_embeddings(new: NewTokens, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the new rows (float32) to a safetensors file (the format: see the module docstring)."""
    from safetensors.torch import save_file

    from tune.durable import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt",
        "token": new.token,
        "num_vectors": str(len(new.tokens)),
        "tune_family": new.family,
        **(metadata or {}),
    }
    tensors = new.file_tensors()
    with atomic_file(path, sum(t.numel() * t.element_size() for t in tensors.values())) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


@dataclass(frozen=True)
class Embeddings:
    """A textual-inversion file read back."""

    token: str
    """The token: the tensor's name (SD1/SD2), else the metadata's, else the file name (A1111's rule)."""
    vectors: tuple[torch.Tensor, ...]
    """[num_vectors, hidden_size] per text encoder: (text_encoder's,) or SDXL's (clip_l, clip_g)."""
    family: Family | None
    """sdxl for clip_l/clip_g files; sd1/sd2 from our metadata or the real widths (768/1024); else None."""


def load_embeddings(path: str | Path, base: Family | None = None) -> Embeddings:
    """An embedding file written by `save_embeddings` (or A1111, ComfyUI, kohya, diffusers' script). With
    `base`, a file of another family is a ModelError naming both."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is no dict
    family = family_of_embedding(tensors)
    if family == "sdxl":
        token = meta.get("token") or Path(path).stem
        vectors = tuple(tensors[key] for key in SDXL_KEYS)
    elif len(tensors) == 1:
        ((token, rows),) = tensors.items()
        vectors = (rows,)
        found = meta.get("tune_family")  # ours say it; tiny widths tell nothing
        family = found if found in ("sd1", "sd2") else family  # type: ignore[assignment]
    else:
        raise ModelError(
            f"{path} holds {sorted(tensors)}; a textual-inversion file holds one tensor, or clip_l and clip_g (SDXL)"
        )
    embeddings = Embeddings(token, tuple(v if v.ndim == 2 else v[None] for v in vectors), family)
    if base is not None:
        # A one-tensor file of unknown width is SD1 or SD2: only SDXL's two encoders refuse it outright.
        found = embeddings.family or (base if base != "sdxl" else "sd1")
        check_same_family(f"the embedding {path}", found, base)
    return embeddings
