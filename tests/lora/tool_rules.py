"""ComfyUI's and AUTOMATIC1111's LoRA key rules, transcribed from their sources, for checking that every
key of a file we write maps onto a module in those tools (they cannot run here: no real-size models),
and their LoRA / LoHa / LoKr weight math as /work/shared/reference/lycoris-formats.md states it.

ComfyUI: comfy/utils.py unet_to_diffusers, comfy/lora.py model_lora_keys_unet / model_lora_keys_clip and
load_lora. A1111: extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis and load_network.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

UNET_MAP_ATTENTIONS = {
    "proj_in.weight",
    "proj_in.bias",
    "proj_out.weight",
    "proj_out.bias",
    "norm.weight",
    "norm.bias",
}
TRANSFORMER_BLOCKS = {
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
}  # fmt: skip
UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight", "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight", "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight", "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight", "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight", "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight", "out_layers.0.bias": "norm2.bias",
}  # fmt: skip
UNET_MAP_BASIC = {
    ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
}  # fmt: skip
# ComfyUI's detected unet_config for SD1.x (the widths do not enter the names).
SD1_COMFY_UNET_CONFIG = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
}
# ComfyUI's detected unet_config for SDXL (model_detection: depth 0/2/10 per level, 10 in the middle).
SDXL_COMFY_UNET_CONFIG = {
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
}
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfy_unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    num_res_blocks = unet_config["num_res_blocks"]
    channel_mult = unet_config["channel_mult"]
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    num_blocks = len(channel_mult)
    transformers_mid = unet_config.get("transformer_depth_middle", None)
    diffusers_unet_map = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in UNET_MAP_RESNET:
                diffusers_unet_map[f"down_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = (
                    f"input_blocks.{n}.0.{b}"
                )
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    diffusers_unet_map[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        diffusers_unet_map[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            n += 1
        for k in ["weight", "bias"]:
            diffusers_unet_map[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"
    i = 0
    for b in UNET_MAP_ATTENTIONS:
        diffusers_unet_map[f"mid_block.attentions.{i}.{b}"] = f"middle_block.1.{b}"
    for t in range(transformers_mid):
        for b in TRANSFORMER_BLOCKS:
            diffusers_unet_map[f"mid_block.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                f"middle_block.1.transformer_blocks.{t}.{b}"
            )
    for i, n in enumerate([0, 2]):
        for b in UNET_MAP_RESNET:
            diffusers_unet_map[f"mid_block.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"middle_block.{n}.{b}"
    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 0
            for b in UNET_MAP_RESNET:
                diffusers_unet_map[f"up_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = (
                    f"output_blocks.{n}.0.{b}"
                )
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    diffusers_unet_map[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        diffusers_unet_map[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            if i == length - 1:
                for k in ["weight", "bias"]:
                    diffusers_unet_map[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = (
                        f"output_blocks.{n}.{c}.conv.{k}"
                    )
            n += 1
    for ldm, diffusers in UNET_MAP_BASIC:
        diffusers_unet_map[diffusers] = ldm
    return diffusers_unet_map


def comfy_key_map(model_keys: set[str], unet_config: dict = SD1_COMFY_UNET_CONFIG) -> dict[str, str]:
    """model_lora_keys_unet + model_lora_keys_clip for a model with these state-dict keys (clip_l for
    SD1.x; clip_l + clip_g for SDXL, as ComfyUI names them)."""
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_{}".format(k[len("diffusion_model.") : -len(".weight")].replace(".", "_"))] = k
    diffusers_keys = comfy_unet_to_diffusers(unet_config)
    for k, ldm in diffusers_keys.items():
        if k.endswith(".weight"):
            unet_key = f"diffusion_model.{ldm}"
            key_map["lora_unet_{}".format(k[: -len(".weight")].replace(".", "_"))] = unet_key
            for p in ["", "unet."]:
                diffusers_lora_key = "{}{}".format(p, k[: -len(".weight")].replace(".to_", ".processor.to_"))
                if diffusers_lora_key.endswith(".to_out.0"):
                    diffusers_lora_key = diffusers_lora_key[:-2]
                key_map[diffusers_lora_key] = unet_key
    clip_l_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in model_keys:
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in model_keys:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                clip_l_present = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in model_keys and clip_l_present:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
    return key_map


HADA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def comfy_load(file_keys: set[str], key_map: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """load_lora with the LoRA, LoHa and LoKr adapters (weight_adapter/{lora,loha,lokr}.py `load`):
    (model key -> stem patched, file keys 'not loaded'). alpha and dora_scale are read for every stem."""
    patches, loaded = {}, set()
    for x in key_map:
        for extra in (f"{x}.alpha", f"{x}.dora_scale"):
            if extra in file_keys:
                loaded.add(extra)
        found = False
        if f"{x}.lora_up.weight" in file_keys:
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
            found = True
        if f"{x}.hada_w1_a" in file_keys:
            loaded |= {f"{x}.{part}" for part in HADA_PARTS} & file_keys
            found = True
        if any(f"{x}.{part}" in file_keys for part in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            loaded |= {f"{x}.{part}" for part in LOKR_PARTS} & file_keys
            found = True
        if found:
            patches[key_map[x]] = x
    return patches, file_keys - loaded


# The weight math of each tool, as the reference (lycoris-formats.md §3.2, §4.3, §4.4) states it.


def comfy_delta(parts: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's calculate_weight at strength 1 for one stem (LoRA, LoHa or LoKr), float32: W' - W."""
    v = {k: t.float() for k, t in parts.items()}
    alpha_value = float(parts["alpha"].item()) if "alpha" in parts else None
    if "hada_w1_a" in v:  # LoHaAdapter: alpha = v[2] / w1b.shape[0]
        alpha = alpha_value / v["hada_w1_b"].shape[0] if alpha_value is not None else 1.0
        m1 = torch.mm(v["hada_w1_a"], v["hada_w1_b"])
        m2 = torch.mm(v["hada_w2_a"], v["hada_w2_b"])
        return alpha * (m1 * m2).reshape(weight_shape)
    if any(k.startswith("lokr_") for k in v):  # LoKrAdapter
        dim = None
        w1 = v.get("lokr_w1")
        if w1 is None:
            dim = v["lokr_w1_b"].shape[0]
            w1 = torch.mm(v["lokr_w1_a"], v["lokr_w1_b"])
        w2 = v.get("lokr_w2")
        if w2 is None:
            dim = v["lokr_w2_b"].shape[0]
            w2 = torch.mm(v["lokr_w2_a"], v["lokr_w2_b"])
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha_value / dim if alpha_value is not None and dim is not None else 1.0
        return alpha * torch.kron(w1, w2).reshape(weight_shape)
    up, down = v["lora_up.weight"], v["lora_down.weight"]
    alpha = alpha_value / down.shape[0] if alpha_value is not None else 1.0
    return alpha * torch.mm(up.flatten(1), down.flatten(1)).reshape(weight_shape)


def a1111_module_type(parts: set[str]) -> str:
    """load_network: the first module type whose create_module accepts the stem's keys."""
    if {"lora_up.weight", "lora_down.weight"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "hada"
    w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    if w1 and w2:
        return "lokr"
    raise AssertionError(f"Could not find a module type (one that can use keys {sorted(parts)})")


def a1111_delta(parts: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """A1111's calc_updown + finalize_updown at multiplier 1 (network_hada/network_lokr/network_lora):
    the updown, scaled by alpha / dim when both are known, else 1."""
    v = {k: t.float() for k, t in parts.items()}
    kind = a1111_module_type(set(parts))
    dim = None
    if kind == "hada":
        dim = v["hada_w1_b"].shape[0]
        flat = (weight_shape[0], math.prod(weight_shape[1:]))
        updown = (v["hada_w1_a"] @ v["hada_w1_b"]).reshape(flat) * (v["hada_w2_a"] @ v["hada_w2_b"]).reshape(
            flat
        )
    elif kind == "lokr":
        w1 = v.get("lokr_w1")
        if w1 is None:
            dim = v["lokr_w1_b"].shape[0]
            w1 = v["lokr_w1_a"] @ v["lokr_w1_b"]
        w2 = v.get("lokr_w2")
        if w2 is None:
            dim = v["lokr_w2_b"].shape[0]
            w2 = v["lokr_w2_a"] @ v["lokr_w2_b"]
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous())
    else:
        up, down = v["lora_up.weight"], v["lora_down.weight"]
        dim = down.shape[0]
        updown = up.flatten(1) @ down.flatten(1)
    updown = updown.reshape(weight_shape)
    scale = float(v["alpha"].item()) / dim if dim is not None and "alpha" in v else 1.0
    return updown * scale


# AUTOMATIC1111 extensions-builtin/Lora/networks.py: convert_diffusers_name_to_compvis and load_network.
re_digits = re.compile(r"\d+")
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
suffix_conversion = {
    "attentions": {},
    "resnets": {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "norm1": "in_layers_0",
        "norm2": "out_layers_0",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    },
}


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    def match(match_list: list, regex_text: str) -> bool:
        r = re.match(regex_text, key)
        if not r:
            return False
        match_list.clear()
        match_list.extend([int(x) if re.match(re_digits, x) else x for x in r.groups()])
        return True

    m: list = []
    if match(m, r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if match(m, r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if match(m, r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if match(m, r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return (
            f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
        )
    if match(m, r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if match(m, r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if match(m, r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if match(m, r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            elif "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            else:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if match(m, r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        elif "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        else:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def a1111_load(
    file_keys: set[str], network_layer_mapping: set[str], is_sd2: bool = False
) -> tuple[dict[str, set[str]], list[str], dict[str, set[str]]]:
    """load_network's matching: (A1111 key -> network parts found, keys failed to match, fused OpenCLIP
    attention module -> the q/k/v projections that landed on it). A1111 applies a fused module's q/k/v
    only when q, k, v and its out_proj are all there (network_apply_weights)."""
    matched: dict[str, set[str]] = {}
    fused: dict[str, set[str]] = {}
    failed = []
    for key_network in sorted(file_keys):
        base, _, network_part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base, is_sd2)
        found = key in network_layer_mapping
        if not found:
            m = re_x_proj.match(key)
            if m and m.group(1) in network_layer_mapping:
                found = True  # the key stays; the module is the MultiheadAttention
                fused.setdefault(m.group(1), set()).add(m.group(2))
        if not found and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            found = key in network_layer_mapping
        elif not found and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            found = key in network_layer_mapping
            if not found:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                found = key in network_layer_mapping
        if not found:
            failed.append(key_network)
            continue
        matched.setdefault(key, set()).add(network_part)
    return matched, failed, fused


def kohya_targets(skeleton: dict[str, nn.Module], *, conv: bool) -> list[str]:
    """kohya LoRANetwork.create_modules: the Linear/Conv2d children of its target classes (Transformer2DModel,
    with conv_dim also ResnetBlock2D/Downsample2D/Upsample2D; CLIPAttention/CLIPMLP of every text encoder)."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    classes: tuple[type, ...] = (Transformer2DModel,) + (
        (ResnetBlock2D, Downsample2D, Upsample2D) if conv else ()
    )
    targets = []
    for component, model in skeleton.items():
        wanted = classes if component == "unet" else ()
        for name, module in model.named_modules():
            is_text = component.startswith("text_encoder") and type(module).__name__ in (
                "CLIPAttention",
                "CLIPMLP",
            )
            if not (isinstance(module, wanted) or is_text):
                continue
            for child, leaf in module.named_modules():
                if child and isinstance(leaf, (nn.Linear, nn.Conv2d)):
                    targets.append(f"{component}.{name}.{child}")
    return targets


def random_rank1_pairs(skeleton: dict[str, nn.Module], targets: list[str]) -> dict:
    """A random rank-1 LoraModule (alpha 1) for each target, shaped like its weight in `skeleton`."""
    from tune.lora import LoraModule

    generator = torch.Generator().manual_seed(0)
    modules = {}
    for target in targets:
        component, path = target.split(".", 1)
        shape = skeleton[component].get_submodule(path).weight.shape
        down = torch.randn(1, *shape[1:], generator=generator)
        up = torch.randn(shape[0], 1, *([1, 1] if len(shape) == 4 else []), generator=generator)
        modules[target] = LoraModule(down=down, up=up, alpha=1.0)
    return modules
