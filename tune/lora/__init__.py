"""LoRA files: read kohya / diffusers / PEFT safetensors, write kohya and diffusers files that load
everywhere, convert, inspect, and merge them into a pipeline's weights.

Layers (reading was there first; writing, conversion and inspection sit on the same normalized form),
one job per module:

    core       Lora, LoraModule: the normalized form, "<component>.<module path>" -> (down, up, alpha
               [, DoRA magnitude]); lycoris: LohaModule, LokrModule; each has delta(shape, device, base)
    parts      the tensors of one module in a file -> LoRA / DoRA / LoHa / LoKr module
    read       read_lora_file(path)          -> (tensors, metadata)   raw safetensors I/O, nothing else
    keys       parse_lora(tensors, targets)  -> Lora                  key mapping into OUR module names
    read       load_lora(path, pipe)         -> Lora                  the two above, plus the PEFT config
    skeleton   read_lora(path)               -> Lora                  the same onto SD1.x names, no model
    merge      LoraStack(pipe).add(lora, s)                           merge into weights, rescale, remove
    write      save_lora(lora, path, "kohya" | "diffusers", dtype=, metadata=)   write
    files      write_lora_file, safetensors_data_hash: the file and its sshs_model_hash
    write_lycoris  LoHa/LoKr kohya keys; dora_as_lora(lora, base weights, rank): DoRA by SVD for kohya
    inject     inject_lora(unet, text_encoder, targets, rank, alpha)  trainable peft adapters, by group
    extract    save_adapter(unet, text_encoder, path, metadata)       a PEFT-injected adapter -> file
    run_files  checkpoint_adapter_path / final_adapter_path / find_run_adapter / run_metadata: run dirs
  the commands:
    export     export_run (`tune export`), convert_lora_file (`tune lora convert`)
    merge      merge_loras (`tune lora merge`)
    inspect    inspect_lora, format_report (`tune lora inspect`)

The notes on each format sit with the code: key forms read in `keys`, files written in `write`, the
run directory contract in `run_files`, the merge math in `merge`. `base_model_hash` lives in
`tune.models.identity`; it is re-exported here but imported on first use, since `tune.models` loads
diffusers and transformers.

Every public name is re-exported, so `from tune import lora as lora_io; lora_io.save_lora(...)` and
`from tune.lora import save_lora` work as they did when this package was one module.
"""

from typing import Any

from tune.lora.core import (
    ADAPTER_CONFIG_KEY,
    ADAPTER_TYPE_KEY,
    ADAPTER_TYPES,
    COMPONENTS,
    AdapterModule,
    AdapterType,
    Component,
    ExportFormat,
    Lora,
    LoraFormat,
    LoraModule,
)
from tune.lora.export import convert_lora_file, export_run
from tune.lora.extract import lora_from_peft, save_adapter
from tune.lora.files import SSHS_HASH_KEY, safetensors_data_hash, write_lora_file
from tune.lora.inject import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraTarget, inject_lora
from tune.lora.inspect import (
    LoraGroup,
    LoraReport,
    adapter_type_name,
    format_report,
    inspect_lora,
    module_group,
    module_leaf,
)
from tune.lora.keys import AlphaRule, parse_lora
from tune.lora.lycoris import LohaModule, LokrModule
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
    canonical_path,
    diffusers_stem,
    kohya_stem,
    save_lora,
    to_diffusers_state_dict,
    to_kohya_state_dict,
)
from tune.lora.write_lycoris import dora_as_lora

__all__ = [
    "ADAPTER_CONFIG_KEY",
    "ADAPTER_TYPES",
    "ADAPTER_TYPE_KEY",
    "AdapterModule",
    "AdapterType",
    "LohaModule",
    "LokrModule",
    "adapter_type_name",
    "dora_as_lora",
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
    "LoraTarget",
    "SSHS_HASH_KEY",
    "TEXT_ENCODER_TARGETS",
    "UNET_TARGETS",
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
    "format_report",
    "inject_lora",
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
