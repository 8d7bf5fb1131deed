"""LoRA files (see `tune.lora.keys` for the formats); this package re-exports its public names."""

from typing import Any

from tune.lora.export import convert_lora_file, export_run
from tune.lora.extract import lora_from_peft, save_adapter
from tune.lora.inspect import LoraGroup, LoraReport, inspect_lora, module_group, module_leaf
from tune.lora.keys import (
    COMPONENTS,
    AlphaRule,
    Component,
    ExportFormat,
    Lora,
    LoraFormat,
    LoraModule,
    parse_lora,
)
from tune.lora.merge import LoraStack, apply_loras, merge_loras
from tune.lora.read import load_lora, lora_targets, parse_lora_spec, read_lora_file
from tune.lora.run_files import (
    CHECKPOINT_ADAPTER,
    FINAL_ADAPTER,
    checkpoint_adapter_path,
    default_export_path,
    final_adapter_path,
    find_run_adapter,
    run_metadata,
)
from tune.lora.skeleton import read_lora, sd1_module_skeleton
from tune.lora.write import (
    ADAPTER_METADATA_KEY,
    DTYPES,
    FORMATS,
    SSHS_HASH_KEY,
    canonical_path,
    diffusers_stem,
    kohya_stem,
    safetensors_data_hash,
    save_lora,
    to_diffusers_state_dict,
    to_kohya_state_dict,
    write_lora_file,
)

__all__ = [
    "ADAPTER_METADATA_KEY",
    "AlphaRule",
    "CHECKPOINT_ADAPTER",
    "COMPONENTS",
    "Component",
    "DTYPES",
    "ExportFormat",
    "FINAL_ADAPTER",
    "FORMATS",
    "Lora",
    "LoraFormat",
    "LoraGroup",
    "LoraModule",
    "LoraReport",
    "LoraStack",
    "SSHS_HASH_KEY",
    "apply_loras",
    "base_model_hash",
    "canonical_path",
    "checkpoint_adapter_path",
    "convert_lora_file",
    "default_export_path",
    "diffusers_stem",
    "export_run",
    "final_adapter_path",
    "find_run_adapter",
    "inspect_lora",
    "kohya_stem",
    "load_lora",
    "lora_from_peft",
    "lora_targets",
    "merge_loras",
    "module_group",
    "module_leaf",
    "parse_lora",
    "parse_lora_spec",
    "read_lora",
    "read_lora_file",
    "run_metadata",
    "safetensors_data_hash",
    "save_adapter",
    "save_lora",
    "sd1_module_skeleton",
    "to_diffusers_state_dict",
    "to_kohya_state_dict",
    "write_lora_file",
]


def __getattr__(name: str) -> Any:
    # base_model_hash is re-exported lazily: importing tune.models loads diffusers and transformers
    # (seconds), which reading and writing LoRA files never needs.
    if name == "base_model_hash":
        from tune.models.identity import base_model_hash

        return base_model_hash
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
