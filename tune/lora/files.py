"""Writing a LoRA safetensors file with kohya's `sshs_model_hash` (the sha256 of the tensor data, which
A1111 trusts as the file's hash) computed and stored in it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

SSHS_HASH_KEY = "sshs_model_hash"


def safetensors_data_hash(data: bytes | str | Path) -> str:
    """sha256 of a safetensors file's tensor data: the bytes after the 8-byte length and the JSON
    header. This is kohya's `sshs_model_hash` and A1111's `addnet_hash_safetensors`; it does not
    depend on the metadata, so it can be stored in the file it describes."""
    if isinstance(data, bytes):
        header = int.from_bytes(data[:8], "little")
        return hashlib.sha256(memoryview(data)[8 + header :]).hexdigest()
    digest = hashlib.sha256()
    with open(data, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_lora_file(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | Path
) -> str:
    """Write tensors + metadata (plus `sshs_model_hash`) atomically; returns the hash."""
    from safetensors.torch import save

    from tune.durable import write_atomic

    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; not for {', '.join(bad)}")
    tensors = dict(tensors)
    digest = safetensors_data_hash(
        save(tensors, metadata={k: v for k, v in metadata.items() if k != SSHS_HASH_KEY})
    )
    data = save(tensors, metadata={**metadata, SSHS_HASH_KEY: digest})
    if safetensors_data_hash(data) != digest:  # the data region must not depend on the header
        raise RuntimeError("safetensors data changed with its metadata; cannot record sshs_model_hash")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return digest
