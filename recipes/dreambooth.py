"""DreamBooth: fine-tune the whole U-Net (text encoder optional) on a few photos of a subject.

    tune run dreambooth --config default concept=concepts/sks-toy
    tune run dreambooth base_model=PATH instance_dir=PATH instance_prompt="a photo of sks toy" \\
        class_prompt="a photo of toy" output_dir=PATH

Photos are captioned "a photo of {token} {class}". With prior preservation (on when the concept says
so, or when class_prompt is given), the base model first draws `num_class_images` images of the class
prompt with the shared sampler (with `prior.from_captions` and `prior.from_prompts`, of the photos' captions
and the validation prompts with the trigger taken out too, in turn, each trained with its prompt; the
default config takes both; cached under the cache dir by base model, prompts, seeds
and sampler settings, so the next run reuses them); every batch then pairs the photos with as many class
images, and the loss is instance loss + prior.loss_weight * class loss, so the class word keeps its meaning.
An exponential moving average of the U-Net weights (diffusers' EMAModel) is what the validation
grids show and what is exported. With pivotal tuning (`pivotal.enabled`; "auto" in the default config) a
trigger that is a new word ("sks") becomes a new token whose embedding trains beside the U-Net (a word
the base reads as next to nothing, our base's "w", trains its own row), so the class word keeps its meaning; its embedding is written to each checkpoint and export/learned_embeds.safetensors.

On SDXL both text encoders condition the U-Net (and train with train_text_encoder), with pooled text
embeds and each image's size and crop (`tune.models.conditioning`).

Writes export/pipeline/ (a complete diffusers folder of the base's pipeline class, the new token in its
tokenizer) and, by default, export/<run name>.safetensors (one checkpoint file for A1111 and ComfyUI, with
the base's text encoder: the token is the embedding file beside it) and export/<run name>_lora.safetensors
(the fine-tune's difference to the base as a kohya LoRA, by SVD: `tune lora extract`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from tune import personalize as p
from tune.durable import atomic_folder, check_disk_space
from tune.embeddings import EMBEDDINGS_FILE, save_embeddings
from tune.errors import ConfigError, ModelError
from tune.evaluation import start_training_eval
from tune.lora import run_metadata, save_lora
from tune.lora.svd import extract_lora, summarize_errors
from tune.models import save_single_file
from tune.models.conditioning import TextEncoders
from tune.models.identity import base_model_hash
from tune.optim import (
    OptimConfig,
    build_lr_schedule,
    build_optimizer,
    optimizer_metrics,
    optimizer_state_bytes,
)
from tune.runs import EXPORT_PIPELINE, RunDir
from tune.tokens import text_towers
from tune.training import (
    NonFiniteGuard,
    build_accelerator,
    build_trackers,
    compiled,
    enable_gradient_checkpointing,
    evaluation_weights,
    is_due,
    log_step,
    module_bytes,
    on_checkpoint,
    resume_from_checkpoint,
    save_checkpoint,
    set_channels_last,
    start_run,
    tracker_config,
    use_final_weights,
    weight_dtype,
)

log = logging.getLogger(__name__)
# Runs record this name; a copy made by `tune cp` keeps it, so `--config NAME` finds its configs.
RECIPE = "dreambooth"


@dataclass(frozen=True)
class Config(p.PersonalizeConfig):
    """Settings of the `dreambooth` recipe."""

    train_text_encoder: bool = False
    """Also fine-tune the text encoder (stronger subject, more language drift, more memory)."""
    max_steps: int = 300
    batch_size: int = 1  # photos; prior preservation adds as many class images
    optim: OptimConfig = OptimConfig(lr=5e-5, weight_decay=1e-2, warmup_steps=20)
    """Optimizer and learning-rate schedule; adamw8bit keeps about a quarter of adamw's state."""
    prior: p.PriorConfig = p.PriorConfig()
    """Prior preservation: class images, their count and loss weight."""
    pivotal: p.PivotalConfig = p.PivotalConfig()
    """Pivotal tuning: also train the trigger as a new token (its rows only, at pivotal.lr)."""
    ema: bool = True
    """Keep an exponential moving average of the U-Net weights; grids and export use it."""
    ema_decay: float = 0.999
    """Largest EMA decay; with warmup the decay at step n is min(ema_decay, 1 - (1 + n) ** -ema_power)."""
    ema_power: float = 0.75
    """EMA warmup exponent (short fine-tunes need the average to follow early steps closely)."""
    sample_every: int = 150
    checkpoint_every: int = 150
    checkpoints_keep: int = 1  # each holds the U-Net, its EMA and the optimizer state
    export_single_file: bool = True
    """Also write export/<run name>.safetensors, one fp16 SD1.x checkpoint for A1111 and ComfyUI."""
    export_lora_rank: int = 32
    """Also write export/<run name>_lora.safetensors, the fine-tune as a kohya LoRA of this rank (SVD of
    each module's change, as `tune lora extract` does; errors in the log and the file); 0 = off."""
    export_lora_conv_rank: int = 0
    """That LoRA's rank for the resnets' 3x3 convs (0: attention, MLP and projections only)."""
    eval_every: int = 0
    """Score the (EMA) model with `tune eval`'s metrics on `eval_suite` every this many steps, at step 0
    and at the last step (eval/report.json; another suite: eval/<suite>/report.json), keeping the best
    step's pipeline in export/best/; 0 = never."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.export_lora_rank < 0 or self.export_lora_conv_rank < 0:
            raise ConfigError(
                f"export_lora_rank and export_lora_conv_rank must be >= 0; got {self.export_lora_rank}, "
                f"{self.export_lora_conv_rank}"
            )
        if not (0 < self.ema_decay < 1 and self.ema_power > 0):
            raise ConfigError(
                f"need 0 < ema_decay < 1 and ema_power > 0; got {self.ema_decay}, {self.ema_power}"
            )


def main(cfg: Config) -> RunDir:
    # ---- run dir & seed -----------------------------------------------------------------------------
    subject = p.resolve_subject(cfg)  # before the run directory exists: a wrong key leaves nothing behind
    prompts = p.validation_prompts(subject, cfg.sample)  # the samples' prompts, which class images follow too
    prior = p.resolve_prior(cfg.prior, subject, prompts)
    pipe = p.load_base(cfg.base_model)  # a missing or broken base fails before the run directory exists
    tokenizers, text_encoders = text_towers(pipe)  # SDXL: both; pivotal's trigger goes into both
    pivotal = p.resolve_pivotal(cfg.pivotal, subject, tokenizers, text_encoders)  # off, new or known
    cfg = replace(cfg, pivotal=replace(cfg.pivotal, enabled=pivotal != "off"))  # config.toml records which
    evaluator = start_training_eval(
        subject, every=cfg.eval_every, suite=cfg.eval_suite, clip=cfg.eval_clip, guidance=cfg.sample.guidance
    )
    run, cfg = start_run(RECIPE, cfg)
    accelerator = build_accelerator(
        cfg.mixed_precision, cfg.grad_accum, build_trackers(cfg.report_to, run), batch_size=cfg.batch_size
    )
    device = accelerator.device

    # ---- models -------------------------------------------------------------------------------------
    unet, vae = pipe.unet, pipe.vae
    base_hash = base_model_hash(unet, *text_encoders)
    # The text encoders run in the training forward when they train, or the trigger's rows do.
    train_text = cfg.train_text_encoder or cfg.pivotal.enabled
    dtype = weight_dtype(accelerator)
    vae.requires_grad_(False).to(device, p.vae_dtype(pipe, dtype))
    for model in text_encoders:
        model.requires_grad_(cfg.train_text_encoder)
        model.to(device, torch.float32 if train_text else dtype)  # trained weights stay fp32
    unet.requires_grad_(True).to(device, torch.float32)
    class_dir = None
    if prior is not None:  # drawn by the base model, before training changes it
        class_dir = p.prepare_class_images(
            pipe, prior, cfg.prior, base_hash=base_hash, cache_dir=cfg.data.cache_dir, accelerator=accelerator
        )
    # After the class images, which the base draws without the token.
    new_tokens = p.add_trigger(cfg.pivotal, pivotal, subject, tokenizers, text_encoders)
    if new_tokens:
        new_tokens.train_rows_only()
    embeddings = list(new_tokens.weights) if new_tokens else []
    ema = ema_unet = None
    if cfg.ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
        ema_unet = (
            copy.deepcopy(unet).requires_grad_(False).eval()
        )  # holds the EMA weights to sample and export
    if cfg.gradient_checkpointing:
        for model in text_encoders if train_text else [None]:
            enable_gradient_checkpointing(unet, model)
    set_channels_last(unet, cfg.channels_last)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sample_pipe = p.with_components(pipe, unet=ema_unet or unet)
    sample_pipe.set_progress_bar_config(disable=True)

    # ---- data ---------------------------------------------------------------------------------------
    instance_prompt = new_tokens.expand(subject.instance_prompt) if new_tokens else subject.instance_prompt
    dataset, loader = p.build_photo_loader(
        subject.photos,
        instance_prompt,
        cfg.data,
        pipe=pipe,
        resolution=p.resolve_resolution(cfg.resolution, pipe),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        accelerator=accelerator,
        class_dir=class_dir,
        class_prompt=prior.class_prompt if prior else None,
        cache_text=not train_text,
        holdout=p.holdout_share(cfg),  # photos kept out for val_loss
    )
    # val_every: the loss on held-out photos (None when 0)
    val_loss = p.build_validation_loss(cfg, subject.photos, instance_prompt, pipe, noise_scheduler, dtype)

    # ---- optimizer ----------------------------------------------------------------------------------
    trained = [unet, *text_encoders] if train_text else [unet]
    embedding = {id(w) for w in embeddings}
    params = [q for m in trained for q in m.parameters() if q.requires_grad and id(q) not in embedding]
    groups: list[dict] = [{"params": params}]
    if embeddings:
        groups.append({"params": embeddings, "lr": cfg.pivotal.lr, "weight_decay": 0.0})
    optimizer = build_optimizer(groups, cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    *trained, optimizer, lr_schedule = accelerator.prepare(*trained, optimizer, lr_schedule)
    # The prepared models (DDP wrappers on several GPUs) run the training forward; `unet` and
    # `text_encoder` stay the plain modules that are averaged, sampled and exported.
    unet_model = compiled(trained[0], cfg.compile, cfg.compile_mode)
    text_model = TextEncoders.of(pipe, *trained[1:])  # the prepared encoders when they train
    weight = prior.loss_weight if prior else 1.0
    trigger = new_tokens.expand(subject.token) if new_tokens else subject.token
    # masks: the trigger's attention pulled onto the subject (data.mask_attention_weight)
    attention = p.trigger_attention_loss(cfg.data, unet, pipe.tokenizer, trigger, compiled=cfg.compile)
    photo_loss = p.PhotoLoss(
        unet_model, vae, text_model, noise_scheduler, cfg.diffusion, cfg.seed, dtype, weight, attention
    )
    accelerator.register_for_checkpointing(loader)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if new_tokens is not None:  # the token beside the weights, for `tune eval` and `tune sample` at a step
        on_checkpoint(accelerator, lambda folder, step: save_embeddings(new_tokens, folder / EMBEDDINGS_FILE))
    step = resume_from_checkpoint(accelerator, run, cfg.resume)
    if evaluator is not None:
        evaluator.attach(run.path, step)
    run.update_info(
        **p.run_info(subject, cfg, base_hash, dataset, pipe=pipe),
        unet_params=sum(q.numel() for q in unet.parameters()),
    )
    if cfg.report_to != "none":
        accelerator.init_trackers("dreambooth", config=tracker_config(cfg))

    def validate(at: int) -> None:
        if ema is not None and ema_unet is not None:
            ema.copy_to(ema_unet.parameters())
        p.sample_validation(
            sample_pipe,
            prompts,
            cfg.sample,
            run.sample_dir(at),
            accelerator=accelerator,
            modules=[unet, *text_encoders],
        )

    def evaluate(at: int) -> None:  # eval_every: score the (EMA) model as it is now, keep the best one
        if evaluator is None or not accelerator.is_main_process:
            return
        if ema is not None and ema_unet is not None:
            ema.copy_to(ema_unet.parameters())

        def keep_best() -> None:
            sample_pipe.save_pretrained(run.export_dir / "best")

        modules = [unet, *text_encoders]
        evaluator.evaluate_in_training(sample_pipe, at, keep_best, accelerator=accelerator, modules=modules)

    # ---- loop ---------------------------------------------------------------------------------------
    if step == 0 and val_loss is not None:
        val_loss.log(run, accelerator, 0)
    if step == 0 and cfg.sample_every:  # the base model
        validate(0)
    if step == 0:  # the base model: no average yet, so no weights to switch
        evaluate(0)
    unet.train()
    for model in text_encoders:
        model.train(train_text)
    batches = p.forever(loader)
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    applied = True
    bar = tqdm(total=cfg.max_steps, initial=step, desc="dreambooth", unit="step")
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + k
            batch = next(batches).to(device)
            with accelerator.accumulate(*trained), accelerator.autocast():
                loss = photo_loss(batch, micro)
                accelerator.backward(loss)
                applied = nonfinite.check(loss)  # a NaN/inf loss skips the update (its gradients are dropped)
                if applied:
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        accelerator.clip_grad_norm_(params + embeddings, cfg.optim.max_grad_norm)
                    optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach())
        if new_tokens is not None:
            new_tokens.restore_frozen_rows()
        if ema is not None and applied:
            ema.step(unet.parameters())
        step += 1
        loss_value = loss_sum / cfg.grad_accum
        seconds = round(time.perf_counter() - t0, 4)
        if nonfinite.finish(run, step, loss_value):  # else logged as skipped; N in a row stop the run
            lr = lr_schedule.get_last_lr()[0]
            log_step(
                run,
                accelerator,
                step,
                loss=loss_value,
                lr=lr,
                **optimizer_metrics(optimizer),
                s_per_step=seconds,
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if is_due(step, cfg.sample_every, cfg.max_steps):
            validate(step)
        if is_due(step, cfg.eval_every, cfg.max_steps):
            with evaluation_weights(accelerator):
                evaluate(step)
        if val_loss is not None and is_due(step, cfg.val_every, cfg.max_steps):
            val_loss.log(run, accelerator, step)
        if is_due(step, cfg.checkpoint_every, cfg.max_steps) or step == cfg.max_steps:
            save_checkpoint(accelerator, run, step, keep=cfg.checkpoints_keep)
    bar.close()
    use_final_weights(accelerator)  # a schedule-free optimizer's averaged weights are the trained ones
    if evaluator is not None:
        run.update_info(best_step=evaluator.best_step)
    run.update_info(optimizer=cfg.optim.name, optimizer_state_bytes=optimizer_state_bytes(optimizer))

    # ---- save/export --------------------------------------------------------------------------------
    if accelerator.is_main_process:
        if ema is not None and ema_unet is not None:
            ema.copy_to(ema_unet.parameters())
        final_unet = ema_unet or unet
        if dtype != torch.float32:  # the frozen parts were cast for training: export the base's own weights
            pipe = p.load_base(cfg.base_model)
        components = {"unet": final_unet.to(torch.float32)}
        if train_text:  # the trained ones (and the tokenizers with the token), also when `pipe` was reloaded
            names = ("text_encoder", "text_encoder_2")
            components.update(zip(names, (m.to(torch.float32) for m in text_encoders), strict=False))
            components.update(zip(("tokenizer", "tokenizer_2"), tokenizers, strict=False))
        export = p.with_components(pipe, **components)
        size = module_bytes(*export.components.values())  # checked against the free space before writing
        # complete or absent, never half
        with atomic_folder(run.export_dir / EXPORT_PIPELINE, size) as folder:
            export.save_pretrained(folder)
        if new_tokens is not None:
            save_embeddings(new_tokens, run.export_dir / EMBEDDINGS_FILE, {"tune_base_model_hash": base_hash})
        if cfg.export_single_file:
            check_disk_space(run.export_dir, size // 2, "the single-file export")
            save_single_file(
                without_new_rows(export, new_tokens),
                run.export_dir / f"{run.path.resolve().name}.safetensors",
            )
        if cfg.export_lora_rank:
            export_lora(run, export, cfg, device)
        log.info("exported %s", run.export_dir / EXPORT_PIPELINE)
    accelerator.end_training()
    run.finish()
    return run


def without_new_rows(export: Any, new_tokens: Any) -> Any:
    """The export with its text encoders' embedding matrices back to the base's (the added rows cut off, a
    known word's row at its base value): a single-file checkpoint holds the base's text encoder matrix (what
    A1111 and ComfyUI expect); the token is the embedding file beside it."""
    if new_tokens is None:
        return export
    names = ("text_encoder", "text_encoder_2")
    cut = {}
    for name, rows in zip(names, new_tokens.rows, strict=False):
        encoder = copy.deepcopy(getattr(export, name))
        rows.base_shaped(encoder)
        cut[name] = encoder
    return p.with_components(export, **cut)


def export_lora(run: RunDir, export: Any, cfg: Config, device: torch.device) -> None:
    """export/<run name>_lora.safetensors: the exported pipeline minus the base, by SVD per module."""
    name = f"{run.path.resolve().name}_lora"
    try:
        lora, errors = extract_lora(
            export,
            p.load_base(cfg.base_model),
            cfg.export_lora_rank,
            cfg.export_lora_conv_rank,
            text_encoder=cfg.train_text_encoder,
            dtype=torch.float16,
            device=device,
        )
    except ModelError as err:  # a run too short to move a weight (lr 0 in warmup) has no LoRA to write
        log.warning("no %s: %s", name, err)
        return
    summary = summarize_errors(errors)
    metadata = run_metadata(run.path, output_name=name, step=None)
    metadata["tune_extract_error"] = json.dumps({k: round(v, 6) for k, v in summary.items()})
    v_prediction = export.scheduler.config.get("prediction_type") == "v_prediction"
    path = run.export_dir / f"{name}.safetensors"
    save_lora(lora, path, "kohya", dtype=torch.float16, metadata=metadata, v_prediction=v_prediction)
    run.update_info(export_lora_error=summary)
    log.info("exported %s (relative error %s)", name, ", ".join(f"{k} {v:.3g}" for k, v in summary.items()))
