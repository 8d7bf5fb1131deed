"""Textual inversion: teach a base model a subject as a new word, training only that word's embedding.

    tune run textual_inversion --config default concept=concepts/sks-toy
    tune run textual_inversion base_model=PATH instance_dir=PATH instance_prompt="a photo of sks toy" \\
        token=sks initializer_token=toy output_dir=PATH

The token (`token`, or the concept's) is added to the tokenizer with `num_vectors` embedding rows,
each starting from `initializer_token`'s embedding (the concept's class word by default); every other
weight of the model stays as it was, bit for bit (tune.tokens). A word the tokenizer has as one token is
refused, unless the base's text encoder reads it as next to nothing (our base's letters, w-person's "w":
`tune.personalize.resolve_pivotal`); then its own row trains in place, one vector. On SDXL the same token goes into both
tokenizers and text encoders and both sets of rows train. The result is a few hundred bytes:
export/learned_embeds.safetensors, which `pipe.load_textual_inversion(path, token="sks")` loads in
diffusers for SD1/SD2 (A1111 and ComfyUI read it too, under its file name); for SDXL it holds `clip_l`
and `clip_g`, what A1111 and ComfyUI read, and diffusers loads it with two calls (tune.tokens). Each
checkpoint folder holds the embedding at that step under the same name. `eval_every` scores the embedding
during training as `tune eval` does and keeps the best step's in export/best/.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from tune import personalize as p
from tune.embeddings import EMBEDDINGS_FILE, save_embeddings
from tune.errors import ConfigError
from tune.evaluation import start_training_eval
from tune.models.conditioning import TextEncoders
from tune.models.identity import base_model_hash
from tune.optim import OptimConfig, build_lr_schedule, build_optimizer, optimizer_metrics
from tune.runs import RunDir
from tune.tokens import add_tokens, is_known_word, is_new_token, text_towers
from tune.training import (
    NonFiniteGuard,
    build_accelerator,
    build_trackers,
    checkpoint_trainable_only,
    compiled,
    enable_gradient_checkpointing,
    evaluation_weights,
    is_due,
    log_step,
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
RECIPE = "textual_inversion"


@dataclass(frozen=True)
class Config(p.PersonalizeConfig):
    """Settings of the `textual_inversion` recipe."""

    initializer_token: str = ""
    """Word the new embedding starts from (the subject's class, e.g. "toy"); "" means the concept's class word."""
    num_vectors: int = 1
    """Embedding vectors behind a new token (more can hold more detail, and overfit sooner); a word the
    tokenizer has, trained in its own row, is one vector whatever this says."""
    max_steps: int = 500
    batch_size: int = 2
    optim: OptimConfig = OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=20)
    """Optimizer and learning-rate schedule of the embedding (no weight decay: it would shrink the vector)."""
    sample_every: int = 250
    checkpoint_every: int = 250
    eval_every: int = 0
    """Score the embedding with `tune eval`'s metrics on `eval_suite` every this many steps, at step 0 and
    at the last step (eval/report.json; another suite: eval/<suite>/report.json), keeping the best step's
    embedding in export/best/; 0 = never."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_vectors < 1:
            raise ConfigError(f"num_vectors must be >= 1; got {self.num_vectors}")


def main(cfg: Config) -> RunDir:
    # ---- run dir & seed -----------------------------------------------------------------------------
    subject = p.resolve_subject(cfg)  # before the run directory exists: a wrong key leaves nothing behind
    if not subject.token:
        raise ConfigError(
            "textual inversion needs the new word: token=sks (one the tokenizer lacks), or a concept"
        )
    if subject.token not in subject.instance_prompt.split():
        raise ConfigError(
            f"instance_prompt {subject.instance_prompt!r} must contain the token {subject.token!r}: its embedding "
            "is the only thing trained"
        )
    initializer = cfg.initializer_token or subject.class_word
    if not initializer:
        raise ConfigError('initializer_token is required without a concept: the subject\'s class, e.g. "toy"')
    pipe = p.load_base(cfg.base_model)  # a missing or broken base fails before the run directory exists
    tokenizers, text_encoders = text_towers(pipe)  # SDXL: both tokenizers and text encoders
    evaluator = start_training_eval(
        subject, every=cfg.eval_every, suite=cfg.eval_suite, clip=cfg.eval_clip, guidance=cfg.sample.guidance
    )
    # A new word is added; one the base reads as next to nothing (our base's "w") trains in place; else refused.
    # A word the tokenizer has trains in its own row, one vector: num_vectors counts a new word's rows.
    vectors = cfg.num_vectors
    if not is_new_token(tokenizers, subject.token, vectors) and is_known_word(tokenizers, subject.token):
        vectors = 1
    how = p.resolve_pivotal(
        p.PivotalConfig(enabled=True, num_vectors=vectors), subject, tokenizers, text_encoders
    )
    if vectors != cfg.num_vectors:
        log.warning(
            "%r is a word the tokenizer has: it trains in its own row as one vector (num_vectors %d is for a new word)",
            subject.token,
            cfg.num_vectors,
        )
        cfg = replace(cfg, num_vectors=vectors)  # config.toml records what trained
    run, cfg = start_run(RECIPE, cfg)
    accelerator = build_accelerator(
        cfg.mixed_precision, cfg.grad_accum, build_trackers(cfg.report_to, run), batch_size=cfg.batch_size
    )
    device = accelerator.device

    # ---- models -------------------------------------------------------------------------------------
    unet, vae = pipe.unet, pipe.vae
    base_hash = base_model_hash(unet, *text_encoders)
    dtype = weight_dtype(accelerator)
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    unet.to(device, dtype)
    vae.to(device, p.vae_dtype(pipe, dtype))  # SDXL's VAE stays fp32 under fp16
    for text_encoder in text_encoders:
        text_encoder.to(device, torch.float32)  # the trained embeddings stay fp32
    new_tokens = add_tokens(
        tokenizers, text_encoders, subject.token, initializer, cfg.num_vectors, known=how == "known"
    )
    new_tokens.train_rows_only()
    if cfg.gradient_checkpointing:
        for text_encoder in text_encoders:
            enable_gradient_checkpointing(unet, text_encoder)
    set_channels_last(unet, cfg.channels_last)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # ---- data ---------------------------------------------------------------------------------------
    resolution = p.resolve_resolution(cfg.resolution, pipe)
    dataset, loader = p.build_photo_loader(
        subject.photos,
        new_tokens.expand(subject.instance_prompt),  # "sks" -> "sks sks_1 ..." for several vectors
        cfg.data,
        pipe=pipe,
        resolution=resolution,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        accelerator=accelerator,
        holdout=p.holdout_share(cfg),  # photos kept out for val_loss
    )
    prompts = p.validation_prompts(subject, cfg.sample)
    # val_every: the loss on held-out photos (None when 0)
    val_loss = p.build_validation_loss(
        cfg, subject.photos, new_tokens.expand(subject.instance_prompt), pipe, noise_scheduler, dtype
    )

    # ---- optimizer ----------------------------------------------------------------------------------
    optimizer = build_optimizer(new_tokens.weights, cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    # The prepared text encoders (DDP wrappers on several GPUs) run the training forward; `text_encoders`
    # stay the plain modules that the pipeline samples with.
    *text_models, optimizer, lr_schedule = accelerator.prepare(*text_encoders, optimizer, lr_schedule)
    # SDXL: both encoders' states, te2's pooled embeds at the first EOS, each photo's size and crop
    text_model = TextEncoders.of(pipe, *text_models)
    unet_model = compiled(unet, cfg.compile, cfg.compile_mode)
    # masks: the token's attention pulled onto the subject (data.mask_attention_weight)
    attention = p.trigger_attention_loss(
        cfg.data, unet, pipe.tokenizer, new_tokens.expand(subject.token), compiled=cfg.compile
    )
    photo_loss = p.PhotoLoss(
        unet_model, vae, text_model, noise_scheduler, cfg.diffusion, cfg.seed, dtype, attention=attention
    )
    accelerator.register_for_checkpointing(loader)
    checkpoint_trainable_only(accelerator)
    on_checkpoint(
        accelerator,
        lambda folder, step: save_embeddings(new_tokens, folder / EMBEDDINGS_FILE, {"tune_step": str(step)}),
    )
    step = resume_from_checkpoint(accelerator, run, cfg.resume)
    if evaluator is not None:
        evaluator.attach(run.path, step)
    run.update_info(
        **p.run_info(subject, cfg, base_hash, dataset, pipe=pipe),
        initializer_token=initializer,
        token_ids=list(new_tokens.ids),
    )
    if cfg.report_to != "none":
        accelerator.init_trackers("textual_inversion", config=tracker_config(cfg))

    def evaluate(at: int) -> None:  # eval_every: score the embedding as it is now, keep the best one
        if evaluator is None or not accelerator.is_main_process:
            return

        def keep_best() -> None:
            save_embeddings(new_tokens, run.export_dir / "best" / EMBEDDINGS_FILE, {"tune_step": str(at)})

        evaluator.evaluate_in_training(pipe, at, keep_best, accelerator=accelerator, modules=text_encoders)

    # ---- loop ---------------------------------------------------------------------------------------
    if step == 0 and val_loss is not None:
        val_loss.log(run, accelerator, 0)
    if step == 0 and cfg.sample_every:  # the base model, with the token at its initializer's embedding
        p.sample_validation(
            pipe, prompts, cfg.sample, run.sample_dir(0), accelerator=accelerator, modules=text_encoders
        )
    if step == 0:  # the base model, the token at its initializer's embedding
        evaluate(0)
    for text_encoder in text_encoders:
        text_encoder.train()
    batches = p.forever(loader)
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="textual_inversion", unit="step")
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + k
            batch = next(batches).to(device)
            with accelerator.accumulate(*text_models), accelerator.autocast():
                loss = photo_loss(batch, micro)
                accelerator.backward(loss)
                if nonfinite.check(loss):  # a NaN/inf loss skips the update (its gradients are dropped)
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        accelerator.clip_grad_norm_(new_tokens.weights, cfg.optim.max_grad_norm)
                    optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach())
        new_tokens.restore_frozen_rows()  # weight decay and 8-bit state would move the other rows
        step += 1
        loss_value = loss_sum / cfg.grad_accum
        # per text encoder (their widths differ on SDXL): embedding_norm, embedding_norm_2
        norms = {
            "embedding_norm" + (f"_{i + 1}" if i else ""): float(new_tokens.vectors(i).norm(dim=1).mean())
            for i in range(len(new_tokens.rows))
        }
        seconds = round(time.perf_counter() - t0, 4)
        lr = lr_schedule.get_last_lr()[0]
        if nonfinite.finish(run, step, loss_value):  # else logged as skipped; N in a row stop the run
            log_step(
                run,
                accelerator,
                step,
                loss=loss_value,
                lr=lr,
                **norms,
                **optimizer_metrics(optimizer),
                s_per_step=seconds,
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if is_due(step, cfg.sample_every, cfg.max_steps):
            p.sample_validation(
                pipe,
                prompts,
                cfg.sample,
                run.sample_dir(step),
                accelerator=accelerator,
                modules=text_encoders,
            )
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

    # ---- save/export --------------------------------------------------------------------------------
    if accelerator.is_main_process:
        meta = {"tune_step": "final", "tune_base_model_hash": base_hash, "initializer_token": initializer}
        path = save_embeddings(new_tokens, run.export_dir / EMBEDDINGS_FILE, meta)
        log.info("exported %s (token %r): see tune.tokens for loading it", path, subject.token)
    accelerator.end_training()
    run.finish()
    return run
