"""Train the base model's U-Net from scratch on the toy world (cached VAE latents, CLIP text).

    tune data world data/world-train --count 30000 --split train
    tune run unet --config default vae=runs/base-vae/export/vae clip=runs/base-clip/export/clip

Inputs are the `vae` recipe's AutoencoderKL folder and the `clip` recipe's export (its text tower is
the frozen text encoder). The U-Net keeps SD1.5's module topology at small widths. Training uses
cached latents; each step draws one of an image's training captions (canonical, partial, paraphrased,
with a made-up word) and encodes it with the frozen text tower (cheap beside the U-Net); caption
dropout for classifier-free guidance, v-prediction with min-SNR weighting and an EMA of the weights:
the EMA weights are sampled, exported and evaluated. With `attention_weight` (and world data written with
`--masks`), Break-A-Scene's attention loss (tune.world.attention_loss) keeps each caption's object noun
looking at the object and its background words looking elsewhere: the maps `tune sample --attention`
draws and prompt-to-prompt editing reuses.

Writes `export/pipeline/` (a complete StableDiffusionPipeline folder with a DDIM scheduler, loadable
by plain diffusers) and `eval/unet.json`: the world judge's reading of images drawn from canonical
prompts (seen and held-out combinations, per style) and from partial and odd prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from tune.config import TrainConfig, check_at_least
from tune.data.config import DataConfig
from tune.data.loader import build_dataloader, build_dataset, cache_latents
from tune.diffusion import DiffusionConfig, diffusion_step
from tune.durable import atomic_folder
from tune.errors import ConfigError, DataError
from tune.models.presets import DOWN_BLOCK_TYPES, PRESETS, UP_BLOCK_FOR, build_unet
from tune.models.scratch import check_base_parts, init_unet_from, load_base_parts, unet_weight_files
from tune.optim import OptimConfig, build_lr_schedule, build_optimizer
from tune.runs import EXPORT_PIPELINE, RunDir
from tune.sampling import sample_grid
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
from tune.world.attention_loss import world_attention_loss
from tune.world.dataset import MASK_FOLDER, make_eval_prompts
from tune.world.scoring import evaluate_generation, judge_prompts, try_load_judge

log = logging.getLogger(__name__)
# Runs record this name; a copy made by `tune cp` keeps it, so `--config NAME` finds its configs.
RECIPE = "unet"


@dataclass(frozen=True)
class Config(TrainConfig):
    """Settings of the `unet` recipe."""

    max_steps: int = 1800
    batch_size: int = 64
    sample_every: int = 600  # samples and judged accuracy, with the EMA weights
    checkpoint_every: int = 600

    vae: str = "runs/base-vae/export/vae"
    """AutoencoderKL folder (the `vae` recipe's export/vae); its scaling_factor scales the latents."""
    clip: str = "runs/base-clip/export/clip"
    """The `clip` recipe's export: a CLIPModel folder (or text_encoder/ subfolder) plus tokenizer/."""
    init_unet: str = ""
    """A U-Net folder to start from (e.g. models/world-base/unet), not from scratch: its tensors are copied;
    attention this config adds on a level starts as the identity. Empty: from scratch."""
    data_dir: str = "data/world-train"
    """World imagefolder (metadata.jsonl with a `captions` list per image), written by `tune data world`."""
    resolution: int = 64
    """Image side in pixels; the U-Net's sample_size is this over the VAE's downsampling factor."""
    unet_block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    """Widths of SD1.5's four U-Net levels (keep the 1:2:4:4 ratio for single-file export; multiples of
    32 with GroupNorm(32), which ComfyUI's model code assumes)."""
    unet_down_block_types: tuple[str, ...] = DOWN_BLOCK_TYPES
    """Block type of each level, CrossAttnDownBlock2D (with attention) or DownBlock2D; the up blocks mirror
    them. SD1.5 attends on the three outer levels; SDXL, like our base, not on the outermost one (at 16x16
    latents its attention is more than half of a training step's time)."""
    unet_attention_heads: int = 4
    """Attention heads per transformer block (diffusers' `attention_head_dim`, as in SD1.5)."""
    unet_norm_num_groups: int = 32
    """GroupNorm groups; must divide every width."""
    beta_schedule: Literal["scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """Noise schedule: SD1.5's scaled_linear, or the cosine one, whose last step is (almost) pure noise
    as at sampling time, so flat backgrounds are not biased by leftover signal."""
    diffusion: DiffusionConfig = DiffusionConfig(prediction_type="v_prediction", snr_gamma=5.0)
    """Loss: prediction type (auto means v_prediction here), min-SNR gamma, noise offset."""
    caption_dropout: float = 0.1
    """Share of samples trained with the empty caption, for classifier-free guidance."""
    ema: bool = True
    """Keep an EMA of the U-Net weights and sample and export it (false: the trained weights; with
    optim.name = "adamw_schedulefree", its own average of them, which an EMA would bypass)."""
    ema_decay: float = 0.999
    """Largest EMA decay of the U-Net weights."""
    ema_power: float = 0.75
    """EMA warmup: decay at step n is min(ema_decay, 1 - (1 + n) ** -ema_power)."""
    optim: OptimConfig = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=100)
    """Optimizer and learning-rate schedule."""
    sample_prompts: tuple[str, ...] = (
        "a photo of a large pink and teal striped ring on a blue background",
        "a drawing of a small yellow ball with red spots on grass in the top left",
        "a pencil sketch of a large person with red hair in a blue striped shirt on a wooden table",
        "pixel art of a large red cup on a white background",
        "a photo of a toy on a green background",
        "a photo of zwx toy on a purple background",
    )
    """Validation prompts (a held-out look, a held-out pair, partial and odd prompts among them), written
    as a prompts x seeds grid."""
    sample_seeds: tuple[int, ...] = (0, 1)
    """Validation seeds."""
    val_prompts: int = 16
    """Seen-combination prompts (styles taking turns) drawn and judged at each validation (0 = off)."""
    sample_steps: int = 25
    """DDIM steps for validation and evaluation images."""
    guidance: float = 6.0
    """Classifier-free guidance scale for validation and evaluation images."""
    eval_prompts: int = 400
    """Final evaluation: this many seen-combination prompts and half as many held-out ones, one image
    each, judged; plus the odd-prompt test (0 = off)."""
    odd_prompt_seeds: int = 5
    """Seeds per colour of each odd prompt ("a photo of a toy / zwx toy on a {colour} background")."""
    logit_normal_until: float = 0.0
    """Share of max_steps that draws timesteps from diffusion.timesteps' density before switching to
    uniform (0: the density for the whole run)."""
    attention_weight: float = 0.0
    """Weight of the attention loss (tune.world.attention_loss): the class noun's cross-attention pulled
    onto the object, the background's words off it. Needs world data with masks (`tune data world
    --masks`); 0 is off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, _POSITIVE, 1)
        check_at_least(self, _NON_NEGATIVE, 0)
        if not (0 <= self.caption_dropout < 1 and 0 < self.ema_decay < 1 and self.ema_power > 0):
            raise ConfigError("need 0 <= caption_dropout < 1, 0 < ema_decay < 1 and ema_power > 0")
        if self.attention_weight < 0:
            raise ConfigError(f"attention_weight must be >= 0; got {self.attention_weight}")
        if not (self.sample_prompts and self.sample_seeds):
            raise ConfigError("sample_prompts and sample_seeds need at least one entry each")
        groups, heads = self.unet_norm_num_groups, self.unet_attention_heads
        widths = self.unet_block_out_channels
        ok = len(widths) == 4 and min(groups, heads) > 0
        if not ok or any(w <= 0 or w % math.lcm(groups, heads) for w in widths):
            raise ConfigError(
                "unet_block_out_channels must be 4 widths divisible by unet_norm_num_groups and "
                f"unet_attention_heads; got {list(widths)}"
            )
        blocks = self.unet_down_block_types
        if len(blocks) != len(widths) or not set(blocks) <= set(UP_BLOCK_FOR):
            raise ConfigError(
                "unet_down_block_types must name one block per level, each CrossAttnDownBlock2D or "
                f"DownBlock2D; got {list(blocks)}"
            )
        if self.diffusion.prediction_type == "epsilon" and self.beta_schedule == "squaredcos_cap_v2":
            raise ConfigError(
                "diffusion.prediction_type epsilon cannot start sampling from squaredcos_cap_v2's pure noise "
                "(x0 = x / ~0); use v_prediction or beta_schedule scaled_linear"
            )


_POSITIVE = ("resolution", "sample_steps")
_NON_NEGATIVE = ("val_prompts", "eval_prompts")


def check_inputs(cfg: Config) -> None:
    """Say what to run when the VAE, the CLIP export or the data is missing (before a run dir exists)."""
    check_base_parts(cfg.vae, cfg.clip)
    if cfg.init_unet:
        unet_weight_files(cfg.init_unet)
    if not Path(cfg.data_dir).is_dir():
        res = ("" if cfg.resolution == 64 else f" --resolution {cfg.resolution}") + (
            " --masks" if cfg.attention_weight else ""
        )
        raise DataError(
            f"no world data at {cfg.data_dir}; write it with "
            f"`tune data world {cfg.data_dir} --count 30000 --split train{res}` or set data_dir=PATH"
        )
    if cfg.attention_weight and not (Path(cfg.data_dir) / MASK_FOLDER).is_dir():
        raise DataError(
            f"attention_weight is {cfg.attention_weight:g} but {cfg.data_dir} has no masks; write the data "
            f"with `tune data world DIR --masks` (or set attention_weight=0)"
        )


def main(cfg: Config) -> RunDir:
    # ---- run dir & seed -----------------------------------------------------------------------------
    check_inputs(cfg)
    run, cfg = start_run(RECIPE, cfg)
    accelerator = build_accelerator(cfg.mixed_precision)
    device = accelerator.device

    # ---- models -------------------------------------------------------------------------------------
    vae, text_encoder, tokenizer = load_base_parts(cfg.vae, cfg.clip, device)  # frozen
    vae_levels = tuple(vae.config.block_out_channels)
    if cfg.resolution % 2 ** (len(vae_levels) - 1):
        raise ConfigError(f"resolution must be a multiple of the VAE's factor {2 ** (len(vae_levels) - 1)}")
    # SD1.5's topology at our widths; the preset's latent size (the U-Net's sample_size) follows the VAE.
    preset = dataclasses.replace(
        PRESETS["small"],
        resolution=cfg.resolution,
        vae_block_out_channels=vae_levels,
        unet_block_out_channels=tuple(cfg.unet_block_out_channels),
        unet_attention_heads=cfg.unet_attention_heads,
        unet_norm_num_groups=cfg.unet_norm_num_groups,
        unet_down_block_types=tuple(cfg.unet_down_block_types),
    )
    unet = build_unet(preset, text_encoder.config.hidden_size, vae.config.latent_channels).to(device).train()
    if cfg.init_unet:
        new = init_unet_from(unet, cfg.init_unet)
        log.info("unet: started from %s; %d new tensors (identity at start)", cfg.init_unet, len(new))
    pred_type = "v_prediction" if cfg.diffusion.prediction_type == "auto" else cfg.diffusion.prediction_type
    noise_scheduler = DDPMScheduler(
        beta_schedule=cfg.beta_schedule, beta_start=0.00085, beta_end=0.012, prediction_type=pred_type
    )
    ema = ema_unet = None
    if cfg.ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
        ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)  # the EMA weights, to sample and export
    # "trailing" spacing starts sampling at t = 999, where the cosine schedule is pure noise, as in training.
    sampling = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    scheduler = DDIMScheduler.from_config(noise_scheduler.config, **sampling)
    no_checker = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline(vae, text_encoder, tokenizer, ema_unet or unet, scheduler, **no_checker)
    pipe.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in unet.parameters())
    log.info("unet: %.2fM parameters, %dx%d latents", n_params / 1e6, preset.latent_size, preset.latent_size)

    # ---- data ---------------------------------------------------------------------------------------
    data_cfg = DataConfig(
        resolution=cfg.resolution,
        bucketing=False,
        min_side=cfg.resolution,
        caption_dropout=cfg.caption_dropout,
        caption_column="captions",  # a list per image: one is drawn each step
        cache_latents=True,
        keep_masks=cfg.attention_weight > 0,  # the objects' masks, for the attention loss
    )
    t0 = time.perf_counter()
    dataset = build_dataset(cfg.data_dir, data_cfg, seed=cfg.seed)
    cache_latents(dataset, vae, device=device, batch_size=64, accelerator=accelerator)
    loader = build_dataloader(
        dataset, batch_size=cfg.batch_size, tokenizer=tokenizer, seed=cfg.seed, accelerator=accelerator
    )
    data_time_s = time.perf_counter() - t0  # scanning and caching: slow once, then cache hits
    judge = try_load_judge()
    val_set = make_eval_prompts(cfg.val_prompts, "train", 3) if cfg.val_prompts and judge else []

    # ---- optimizer ----------------------------------------------------------------------------------
    optimizer = build_optimizer(unet.parameters(), cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    accelerator.register_for_checkpointing(loader)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    step = resume_from_checkpoint(accelerator, run, cfg.resume)
    attention = (
        world_attention_loss(accelerator.unwrap_model(unet), tokenizer, cfg.attention_weight)
        if cfg.attention_weight
        else None
    )
    run.update_info(vae=cfg.vae, clip=cfg.clip, unet_params=n_params, max_steps=cfg.max_steps)

    def validate(step: int) -> None:
        """The sample grid and, with a judge, the judged accuracy of `val_set`, drawn by the sampled U-Net."""
        if ema is not None and ema_unet is not None:
            ema.copy_to(ema_unet.parameters())
        prompts, seeds, out = list(cfg.sample_prompts), list(cfg.sample_seeds), run.sample_dir(step)
        sample_grid(pipe, prompts, seeds, out, steps=cfg.sample_steps, guidance=cfg.guidance, progress=False)
        if val_set:
            table, *_ = judge_prompts(
                pipe, judge, val_set, 1000, steps=cfg.sample_steps, guidance=cfg.guidance
            )
            metrics = table["overall"]
            run.log_metrics(step, **{f"val_{k}": v for k, v in metrics.items()})
            log.info("step %d judged: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))

    # ---- loop ---------------------------------------------------------------------------------------
    started = last = time.perf_counter()
    start_step = step
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="unet", unit="step")
    while step < cfg.max_steps:
        for batch in loader:
            batch = batch.to(device)
            # Noise and timesteps depend on (seed, step) only: each new DataLoader iterator draws from the
            # global RNG, so after a resume it would not repeat the uninterrupted run's draws. Several
            # processes each draw their own.
            draw = step * accelerator.num_processes + accelerator.process_index
            generator = torch.Generator().manual_seed(cfg.seed * 2**32 + draw)
            with torch.no_grad():  # the frozen text tower, on this step's captions
                encoder_hidden_states = text_encoder(batch.input_ids)[0]
            diffusion = cfg.diffusion
            if step >= cfg.logit_normal_until * cfg.max_steps > 0:
                diffusion = dataclasses.replace(diffusion, timesteps="uniform")
            maps = attention is not None and attention.start(batch)  # record the maps of this forward
            loss = diffusion_step(
                unet, noise_scheduler, batch.latents, encoder_hidden_states, diffusion, generator
            )
            if maps:
                assert attention is not None
                loss = loss + attention(batch, tuple(batch.latents.shape[-2:]))
            accelerator.backward(loss)
            applied = nonfinite.check(loss)  # a NaN/inf loss skips the update (its gradients are dropped)
            if applied:
                if cfg.optim.max_grad_norm:
                    accelerator.clip_grad_norm_(unet.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if applied and ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            step += 1
            loss_value = float(loss.detach())
            seconds = round(time.perf_counter() - last, 4)  # data + compute; validation is not counted
            if nonfinite.finish(run, step, loss_value):  # else logged as skipped; N in a row stop the run
                run.log_metrics(step, loss=loss_value, lr=lr_schedule.get_last_lr()[0], s_per_step=seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if is_due(step, cfg.sample_every, cfg.max_steps) and accelerator.is_main_process:
                with evaluation_weights(accelerator):
                    validate(step)
            if is_due(step, cfg.checkpoint_every, cfg.max_steps) or step == cfg.max_steps:
                save_checkpoint(accelerator, run, step, keep=cfg.checkpoints_keep)
            if step >= cfg.max_steps:
                break
            last = time.perf_counter()
    bar.close()
    if attention is not None:
        attention.close()  # the U-Net's own processors, for sampling and export
    use_final_weights(accelerator)  # a schedule-free optimizer's averaged weights are the trained ones
    train_time_s = time.perf_counter() - started
    if not accelerator.is_main_process:  # the main process exports and evaluates alone
        run.finish()
        return run

    # ---- save/export --------------------------------------------------------------------------------
    if ema is not None and ema_unet is not None:
        ema.copy_to(ema_unet.parameters())
    with atomic_folder(run.export_dir / EXPORT_PIPELINE, module_bytes(*pipe.components.values())) as folder:
        pipe.save_pretrained(folder)  # swapped in complete, after the free space was checked
    log.info(
        "exported the pipeline (%s U-Net) to %s",
        "EMA" if ema is not None else "trained",
        run.export_dir / EXPORT_PIPELINE,
    )
    judge = try_load_judge()  # read again: a judge retrained while this run trained reads its final images
    if cfg.eval_prompts and judge is not None:
        # Times of this process (a resumed run trained from start_step on).
        times = {"data_time_s": round(data_time_s, 1), "train_time_s": round(train_time_s, 1)}
        report = {"step": step, "start_step": start_step, "unet_params": n_params, **times}
        sizes = dict(prompts=cfg.eval_prompts, odd_prompt_seeds=cfg.odd_prompt_seeds)
        report = evaluate_generation(
            pipe, judge, run.eval_dir / "unet", report, **sizes, steps=cfg.sample_steps, guidance=cfg.guidance
        )
        seen, heldout = report["seen"]["overall"], report["heldout"]["overall"]
        log.info("eval: seen %s; held-out %s; odd prompts %s", seen, heldout, report["odd_prompts"])
    run.finish()
    return run
