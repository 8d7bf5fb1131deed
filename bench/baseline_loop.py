"""The training loop of diffusers' example scripts, condensed, as the baseline of bench/train_speed.py and
bench/time_to_quality.py: a torch DataLoader that decodes and resizes the photos every step, the VAE and the
text encoder running every step (no caching), peft LoRA on the cross-attention projections (or the whole
U-Net, or the new token's embedding) with AdamW through accelerate; and `run_breakdown`, the parts of such a
step timed alone. Written here by hand on purpose: it is the loop our recipes are measured against.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPT = "a photo of sks toy"
LR = {"lora": 1e-4, "dreambooth": 5e-6, "textual_inversion": 5e-4}
LORA_TARGETS = r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)"  # the lora recipe's default (attn2)


def run_baseline(
    args: argparse.Namespace,
    work: Path,
    on_step: Callable[[int, Any], None] | None = None,
    *,
    prompt: str = PROMPT,
    lr: float | None = None,
    lora_targets: str = LORA_TARGETS,
) -> dict[str, Any]:
    """The diffusers example scripts' loop, condensed: no caching, VAE and text encoder every step.
    `on_step(step, unet)` runs after each optimizer step, once its time is taken (bench/time_to_quality.py
    scores the LoRA there); `prompt` captions every photo, `lr` (default: LR of the recipe) and `lora_targets`
    (a peft regex) are what the adapter trains at and on."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.time()
    torch.manual_seed(args.seed)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(args.base, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(args.recipe == "dreambooth")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )

    placeholder_id = None
    if args.recipe == "lora":
        from peft import LoraConfig

        unet.to(accelerator.device, dtype=weight_dtype)
        config = LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=lora_targets,
        )
        unet.add_adapter(config)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        params = [p for p in unet.parameters() if p.requires_grad]
    elif args.recipe == "dreambooth":
        params = list(unet.parameters())
    else:  # textual inversion: a new token initialised from "toy"; the whole embedding matrix is optimized
        tokenizer.add_tokens("<sks>")
        placeholder_id = tokenizer.convert_tokens_to_ids("<sks>")
        initializer_id = tokenizer.encode("toy", add_special_tokens=False)[0]
        text_encoder.resize_token_embeddings(len(tokenizer))
        embeds = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeds[placeholder_id] = embeds[initializer_id].clone()
        text_encoder.get_input_embeddings().requires_grad_(True)
        params = list(text_encoder.get_input_embeddings().parameters())
        unet.to(accelerator.device, dtype=weight_dtype)
    prompt = prompt.replace("sks", "<sks>") if placeholder_id is not None else prompt
    optimizer = torch.optim.AdamW(params, lr=lr or LR[args.recipe], weight_decay=0.0)

    files = sorted(Path(args.photos_dir).iterdir())

    class PhotoDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            image = Image.open(files[i]).convert("RGB")
            side = min(image.size)  # Resize(resolution) + CenterCrop(resolution) + Normalize([0.5], [0.5])
            scale = args.resolution / side
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            left, top = (image.width - args.resolution) // 2, (image.height - args.resolution) // 2
            image = image.crop((left, top, left + args.resolution, top + args.resolution))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            ids = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
            return {"pixel_values": pixels, "input_ids": ids}

    loader = torch.utils.data.DataLoader(
        PhotoDataset(), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    total = args.warmup + args.steps
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=total)
    trained = text_encoder if args.recipe == "textual_inversion" else unet
    trained, optimizer, loader, lr_scheduler = accelerator.prepare(trained, optimizer, loader, lr_scheduler)
    vae.to(accelerator.device, dtype=weight_dtype)
    if args.recipe == "textual_inversion":
        orig_embeds = accelerator.unwrap_model(trained).get_input_embeddings().weight.data.clone()
        unet_model, text_model = unet, trained
    else:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
        unet_model, text_model = trained, text_encoder

    times: list[float] = []
    step = 0
    while step < total:
        for batch in loader:
            with accelerator.accumulate(trained):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
                )
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_model(batch["input_ids"], return_dict=False)[0].to(
                    dtype=weight_dtype
                )
                model_pred = unet_model(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":  # as the examples do
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                if placeholder_id is not None:  # keep every other row of the embedding as it was
                    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
                    index_no_updates[placeholder_id] = False
                    with torch.no_grad():
                        embeds = accelerator.unwrap_model(trained).get_input_embeddings().weight
                        embeds[index_no_updates] = orig_embeds[index_no_updates]
            if accelerator.sync_gradients:
                step += 1
                final_loss = loss.detach().item()  # the example logs it every step
                times.append(time.time())
                if on_step is not None:
                    on_step(step, unet_model)
                if step >= total:
                    break
    return {"times": times, "start": start, "final_loss": final_loss}


def run_breakdown(args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds of each part of a baseline lora step, timed alone: what caching can and cannot save."""
    import numpy as np
    import torch
    from peft import LoraConfig
    from PIL import Image

    from tune.models import load_pipeline

    pipe = load_pipeline(args.base)
    vae, text_encoder, unet, tokenizer = pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    )
    optimizer = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=1e-4)
    files = sorted(Path(args.photos_dir).iterdir())
    side = args.resolution

    def load_photo() -> torch.Tensor:
        image = Image.open(files[0]).convert("RGB")
        scale = side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels[None].repeat(args.batch_size, 1, 1, 1)

    ids = tokenizer(
        [PROMPT] * args.batch_size, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    pixels = load_photo()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        hidden = text_encoder(ids)[0]
    timesteps = torch.full((args.batch_size,), 500)

    def unet_step() -> None:
        unet(latents, timesteps, hidden).sample.float().pow(2).mean().backward()

    parts = {
        "photo_decode_resize": load_photo,
        "vae_encode": lambda: vae.encode(pixels).latent_dist.sample(),
        "text_encoder": lambda: text_encoder(ids)[0],
        "unet_forward_backward": unet_step,
        "adamw_step": optimizer.step,
    }
    out = {}
    for name, fn in parts.items():
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        out[name + "_ms"] = 1000 * (time.perf_counter() - start) / args.steps
    return out
