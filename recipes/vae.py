"""Train our own AutoencoderKL from scratch on the built-in toy world (stage 1 of the base model).

    tune data world data/world-train --count 30000 --split train
    tune run vae --config default

SD's AutoencoderKL layout (4 latent channels, a mid-block attention) at small widths; three levels
downsample 64 px images by 4 to 16x16 latents. The loss is L1 on pixels (flat colours must come back
exactly; MSE and an L1 on image gradients are optional) plus SD's small KL term; no GAN. At the end
the run measures `scaling_factor` = 1 / std of the latents so the U-Net trains on unit-variance
latents, exports `export/vae/` (diffusers, safetensors) and scores reconstructions of fresh renders
into `eval/vae.json`: PSNR per style, the share the world judge reads exactly as the originals (also
after a blur), and the example subjects' photos round-tripped (subject still found by the judge).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from tune.config import TrainConfig, check_at_least
from tune.data.config import DataConfig
from tune.data.loader import build_dataloader, build_dataset
from tune.durable import atomic_folder, write_atomic
from tune.errors import ConfigError, DataError
from tune.models.scratch import build_autoencoder, sample_latents
from tune.optim import OptimConfig, build_lr_schedule, build_optimizer
from tune.paths import find_path
from tune.runs import RunDir
from tune.training import (
    NonFiniteGuard,
    build_accelerator,
    evaluation_weights,
    is_due,
    module_bytes,
    resume_from_checkpoint,
    save_checkpoint,
    start_run,
    use_final_weights,
)
from tune.world.reconstruction import (
    evaluate_reconstructions,
    pixels_of,
    psnr_db,
    reconstruct,
    save_recon_grid,
    to_images,
)
from tune.world.scoring import fresh_renders

log = logging.getLogger(__name__)
# Runs record this name; a copy made by `tune cp` keeps it, so `--config NAME` finds its configs.
RECIPE = "vae"
MIN_RESOLUTION = 16


@dataclass(frozen=True)
class Config(TrainConfig):
    """Settings of the `vae` recipe."""

    max_steps: int = 3200
    batch_size: int = 16  # for a fixed CPU budget 16 beat 32 in short runs: more, cheaper steps
    sample_every: int = 400  # originals over reconstructions, and the held-out PSNR
    checkpoint_every: int = 800
    data_dir: str = "data/world-train"
    """Training images: an imagefolder written by `tune data world DIR --split train`."""
    resolution: int = 64
    """Training and evaluation image side in pixels."""
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    """VAE widths, one per level; the VAE downsamples by 2 ** (levels - 1) (three levels: 64 px -> 16x16)."""
    layers_per_block: int = 1
    """ResNet layers per encoder level (the decoder has one more, as in diffusers)."""
    norm_num_groups: int = 8
    """GroupNorm groups; must divide every width. Keep several channels per group: a group of one channel
    is normalised alone and loses flat colours (see configs/vae/default.toml)."""
    latent_channels: int = 4
    """Channels of the latent (SD1.x/2.x: 4). More carry finer detail (stripes, spots, pixel cells) through
    the round trip; the U-Net recipe follows whatever the VAE has."""
    l1_weight: float = 1.0
    """Weight of the mean absolute pixel error (in [-1, 1] units): keeps flat colours exact."""
    mse_weight: float = 0.0
    """Weight of the mean squared pixel error."""
    edge_weight: float = 0.0
    """Weight of the L1 error of horizontal and vertical pixel differences (outlines); 0 = off. At 1 it
    slowed the first few hundred steps and gained no PSNR in our short runs."""
    color_augment: float = 0.0
    """Share of training images recoloured on the fly (a random 3x3 colour mix plus offset, a linear light
    gradient and slight noise), so the VAE also carries colours and shading outside the world's twelve,
    which personal photos have; 0 = off."""
    train_crop: int = 0
    """Train on random crops of this side (pixels, a multiple of 4) instead of whole images: the VAE is
    convolutional, so a 32 px crop teaches the same local job at a quarter of the cost (0 = whole images).
    Validation and evaluation always use whole images."""
    crops_per_image: int = 1
    """Random crops taken from each loaded image (with train_crop): a step then trains on batch_size x
    crops_per_image crops, which costs less than loading that many images."""
    kl_weight: float = 1e-6
    """Weight of the KL term, summed over the latent and divided by the image's pixel values (SD's scale)."""
    val_images: int = 64
    """Held-out images the validation PSNR is measured on (the grid shows the first 8)."""
    scaling_images: int = 512
    """Training images whose sampled latents give scaling_factor = 1 / std."""
    eval_images: int = 1000
    """Fresh renders (styles taking turns) reconstructed and scored at the end."""
    eval_seed: int = 1000
    """Seed of the evaluation (and validation) images; keep it apart from the training set's seed."""
    init_vae: str = ""
    """A diffusers AutoencoderKL folder to start from (e.g. models/world-base/vae) instead of random
    weights; its own widths, levels and latent channels are kept (the keys above that describe them are
    then ignored)."""
    train_encoder: bool = True
    """false: only the decoder side (post_quant_conv and decoder) trains, from init_vae. The latents stay
    exactly what they were, so a U-Net trained on them stays valid, and scaling_factor is kept."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=100, weight_decay=0.0)
    )
    """Optimizer and learning-rate schedule."""

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("resolution", "layers_per_block", "norm_num_groups", "crops_per_image", "latent_channels")
        check_at_least(self, (*positive, "val_images", "scaling_images", "eval_images"), 1)
        if not 0 <= self.color_augment <= 1:
            raise ConfigError(f"color_augment must be in [0, 1]; got {self.color_augment}")
        for name in ("l1_weight", "mse_weight", "edge_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.train_crop and (self.train_crop % 4 or not 8 <= self.train_crop <= self.resolution):
            raise ConfigError(
                f"train_crop must be 0 or a multiple of 4 in [8, resolution]; got {self.train_crop}"
            )
        if not self.train_encoder and not self.init_vae:
            raise ConfigError("train_encoder=false fine-tunes a decoder: it needs init_vae=<VAE folder>")
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise ConfigError("l1_weight or mse_weight must be > 0; got both 0")
        if not self.block_out_channels or any(w <= 0 for w in self.block_out_channels):
            raise ConfigError(
                f"block_out_channels must be positive widths; got {list(self.block_out_channels)}"
            )
        if any(w % self.norm_num_groups for w in self.block_out_channels):
            raise ConfigError(
                f"norm_num_groups must divide every width in block_out_channels "
                f"{list(self.block_out_channels)}; got {self.norm_num_groups}"
            )
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % factor or self.resolution < MIN_RESOLUTION:
            raise ConfigError(
                f"resolution must be a multiple of the VAE factor {factor} and >= {MIN_RESOLUTION}; "
                f"got {self.resolution}"
            )


def edge_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical pixel differences (outlines, not colours)."""
    dx = (recon.diff(dim=-1) - target.diff(dim=-1)).abs().mean()
    dy = (recon.diff(dim=-2) - target.diff(dim=-2)).abs().mean()
    return (dx + dy) / 2


@torch.no_grad()
def augment_colors(pixels: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Recolour a random `share` of the images (in [-1, 1]): a random colour mix around the identity plus
    an offset, a linear light gradient across the image and slight noise; the rest pass unchanged."""
    b, _, h, w = pixels.shape
    draw = lambda *shape: torch.randn(*shape, generator=generator).to(pixels.device)  # noqa: E731
    mix = torch.eye(3, device=pixels.device) + 0.6 * draw(b, 3, 3)
    out = torch.einsum("bij,bjhw->bihw", mix, pixels) + 0.4 * draw(b, 3, 1, 1)
    ys = torch.linspace(-1, 1, h, device=pixels.device).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w, device=pixels.device).view(1, 1, 1, w)
    out = out * (1 + 0.3 * draw(b, 1, 1, 1) * xs + 0.3 * draw(b, 1, 1, 1) * ys) + 0.03 * draw(b, 3, h, w)
    chosen = (torch.rand(b, 1, 1, 1, generator=generator) < share).to(pixels.device)
    return torch.where(chosen, out.clamp(-1, 1), pixels)


def random_crops(pixels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random `size` x `size` crop of each image, at offsets that are multiples of the VAE's factor 4
    (so latent cells keep their place on the pixel grid, as in a whole image)."""
    b, _, h, w = pixels.shape
    tops = torch.randint(0, (h - size) // 4 + 1, (b,), generator=generator) * 4
    lefts = torch.randint(0, (w - size) // 4 + 1, (b,), generator=generator) * 4
    return torch.stack(
        [
            p[:, t : t + size, s : s + size]
            for p, t, s in zip(pixels, tops.tolist(), lefts.tolist(), strict=True)
        ]
    )


def load_init_vae(path: str) -> AutoencoderKL:
    """The VAE a run starts from (fp32, whatever its files' dtype); a wrong path is a one-line error."""
    folder = find_path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"init_vae={path!r} is not a diffusers AutoencoderKL folder (no config.json)")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)


class RoundTrip(torch.nn.Module):
    """The VAE's training pass (encode, sample the posterior, decode) as one forward: DDP synchronises
    gradients through a wrapped module's forward, and AutoencoderKL's own returns no posterior."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior.kl()


def main(cfg: Config) -> RunDir:
    # ---- run dir & seed ---------------------------------------------------------------------
    if not Path(cfg.data_dir).exists():
        raise DataError(
            f"no training images at {cfg.data_dir}; write them with "
            f"`tune data world {cfg.data_dir} --count 30000 --split train`"
        )
    init = load_init_vae(cfg.init_vae) if cfg.init_vae else None  # a wrong folder: before the run exists
    run, cfg = start_run(RECIPE, cfg)
    accelerator = build_accelerator(cfg.mixed_precision)

    # ---- models -------------------------------------------------------------------------------
    if init is not None:
        vae = init
        vae.encoder.requires_grad_(cfg.train_encoder)
        vae.quant_conv.requires_grad_(cfg.train_encoder)
    else:
        vae = build_autoencoder(
            cfg.block_out_channels,
            cfg.layers_per_block,
            cfg.norm_num_groups,
            cfg.resolution,
            cfg.latent_channels,
        )
    trainable = [q for q in vae.parameters() if q.requires_grad]
    param_count = sum(p.numel() for p in vae.parameters())
    log.info("vae: %.2fM parameters, widths %s", param_count / 1e6, list(cfg.block_out_channels))

    # ---- data ---------------------------------------------------------------------------------
    data_cfg = DataConfig(resolution=cfg.resolution, bucketing=False, min_side=MIN_RESOLUTION)
    dataset = build_dataset(cfg.data_dir, data_cfg, seed=cfg.seed)
    loader = build_dataloader(dataset, batch_size=cfg.batch_size, accelerator=accelerator)
    val_originals, _ = fresh_renders(cfg.val_images, cfg.eval_seed, resolution=cfg.resolution)
    val_pixels = pixels_of(val_originals)

    # ---- optimizer ----------------------------------------------------------------------------
    optimizer = build_optimizer(trainable, cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    round_trip, optimizer, lr_schedule = accelerator.prepare(RoundTrip(vae), optimizer, lr_schedule)
    accelerator.register_for_checkpointing(loader)
    step = start_step = resume_from_checkpoint(accelerator, run, cfg.resume)
    run.update_info(max_steps=cfg.max_steps, param_count=param_count)

    # ---- loop ---------------------------------------------------------------------------------
    started = time.perf_counter()
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    progress = tqdm(total=cfg.max_steps, initial=step, desc="vae", unit="step")
    while step < cfg.max_steps:
        for batch in loader:
            pixels = batch.pixel_values.to(accelerator.device)
            # Posterior noise from (seed, step) alone, not the global RNG, which the data loader also
            # draws from each time it starts an epoch (once more on resume than in an unbroken run).
            # Several processes each draw their own.
            draw = step * accelerator.num_processes + accelerator.process_index
            noise = torch.Generator(accelerator.device).manual_seed(cfg.seed * 1_000_003 + draw)
            if cfg.color_augment:
                recolour = torch.Generator().manual_seed(cfg.seed * 1_000_003 + draw + 500_000)
                pixels = augment_colors(pixels, cfg.color_augment, recolour)
            if cfg.train_crop:
                where = torch.Generator().manual_seed(cfg.seed * 1_000_003 + draw + 700_000)
                pixels = random_crops(pixels.repeat_interleave(cfg.crops_per_image, 0), cfg.train_crop, where)
            with accelerator.autocast():
                recon, kl = round_trip(pixels, noise)
            recon = recon.float()
            l1 = (recon - pixels).abs().mean()
            mse = F.mse_loss(recon, pixels)
            edge = edge_l1(recon, pixels)
            kl = kl.mean() / pixels[0].numel()  # per pixel value (of the crop, when cropping)
            loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.edge_weight * edge + cfg.kl_weight * kl
            accelerator.backward(loss)
            if nonfinite.check(loss):  # a NaN/inf loss skips the update (its gradients are dropped)
                if cfg.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            metrics = {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "edge": edge.item()}
            if nonfinite.finish(run, step, loss.item()):  # else logged as skipped; N in a row stop the run
                run.log_metrics(step, **metrics, kl=kl.item(), lr=lr_schedule.get_last_lr()[0])
            if is_due(step, cfg.sample_every, cfg.max_steps) and accelerator.is_main_process:
                vae.eval()
                with evaluation_weights(accelerator):
                    recons = to_images(reconstruct(vae, val_pixels))
                val_psnr = float(np.mean(psnr_db(val_originals, recons)))
                save_recon_grid(val_originals[:8], recons[:8], run.sample_dir(step) / "recon.png")
                run.log_metrics(step, val_psnr_db=val_psnr)
                log.info("step %d: loss %.4f, held-out PSNR %.2f dB", step, loss.item(), val_psnr)
                vae.train()
            if is_due(step, cfg.checkpoint_every, cfg.max_steps) or step == cfg.max_steps:
                save_checkpoint(accelerator, run, step, keep=cfg.checkpoints_keep)
            if step >= cfg.max_steps:
                break
    progress.close()
    use_final_weights(accelerator)  # a schedule-free optimizer's averaged weights are the trained ones
    train_seconds = time.perf_counter() - started
    if not accelerator.is_main_process:  # the main process exports and evaluates alone
        run.finish()
        return run

    # ---- save/export --------------------------------------------------------------------------
    vae.eval()
    # SD's recipe: scale latents to unit variance, measured on sampled posteriors of training images.
    count = min(cfg.scaling_images, len(dataset))
    train_pixels = torch.stack([dataset[i]["pixel_values"] for i in range(count)]).to(accelerator.device)
    generator = torch.Generator(accelerator.device).manual_seed(cfg.seed)
    latents = sample_latents(vae, train_pixels, generator)
    latent_mean, latent_std = latents.mean().item(), latents.std().item()
    if cfg.train_encoder:  # a frozen encoder keeps the latents, and the U-Net trained on their scale
        vae.register_to_config(scaling_factor=1.0 / latent_std)
    with atomic_folder(run.export_dir / "vae", module_bytes(vae)) as folder:  # complete or absent
        vae.save_pretrained(folder, safe_serialization=True)
    log.info(
        "latents: mean %.3f, std %.3f; scaling_factor %.4f",
        latent_mean,
        latent_std,
        vae.config.scaling_factor,
    )

    # Fresh renders of every style (a seed no training folder uses), and the example subjects' photos.
    report = {
        **evaluate_reconstructions(vae, cfg.eval_images, cfg.eval_seed + 1, cfg.resolution),
        "eval_images": cfg.eval_images,
        "eval_seed": cfg.eval_seed + 1,
        "train_seconds": round(train_seconds, 1),
        "steps": step,
        "start_step": start_step,  # train_seconds covers steps start_step..steps of this process only
        "batch_size": cfg.batch_size,
        "param_count": param_count,
        "scaling_factor": vae.config.scaling_factor,
        "train_encoder": cfg.train_encoder,
        "init_vae": cfg.init_vae,
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "latent_shape": list(latents.shape[1:]),
    }
    write_atomic(run.eval_dir / "vae.json", json.dumps(report, indent=2) + "\n")
    styles = ", ".join(f"{k} {v:.2f}" for k, v in report["psnr_db_by_style"].items())
    log.info(
        "fresh renders (%d): PSNR %.2f dB (%s); judge agreement %s",
        cfg.eval_images,
        report["psnr_db"],
        styles,
        report.get("judge_agreement", "n/a"),
    )
    log.info("steps %d-%d in %.0f s, %d parameters", start_step, step, train_seconds, param_count)
    run.update_info(steps=step, train_seconds=report["train_seconds"], psnr_db=report["psnr_db"])
    run.finish()
    return run
