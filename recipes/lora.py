"""LoRA: teach a base model a subject from a few photos with small low-rank adapters (a few MB).

    tune run lora --config default concept=concepts/sks-toy
    tune run lora base_model=PATH instance_dir=PATH instance_prompt="a photo of sks toy" output_dir=PATH

Adapters (peft) go on the U-Net's cross-attention projections (attn2 to_q, to_k, to_v, to_out.0) by
default; `lora.type` picks LoRA, DoRA, LoHa or LoKr (`tune run lora lora.type=lokr lora.decompose_factor=8`);
`lora.targets` adds self-attention, feed-forward, transformer projections, resnet convs or
the text encoder(s). Zero-initialised up-projections make the adapter a no-op at step 0, so the step-0
grid is the base model's. Optionally (`pivotal.enabled`) the trigger word becomes a new token whose
embedding trains alongside (pivotal tuning); its embedding is exported too. On an SDXL base the
U-Net gets both text encoders' states, the pooled text embeds and each photo's size and crop
(`tune.models.conditioning`), and `text_encoder` puts adapters on both encoders; pivotal tuning adds the trigger to both
tokenizers and trains its row in each encoder (exported as one clip_l/clip_g file, as A1111 and ComfyUI
read SDXL embeddings).

Writes checkpoints/step_N/lora.safetensors (the adapter at step N), export/pytorch_lora_weights.safetensors
(diffusers: `pipe.load_lora_weights(path)`; for DoRA, LoHa and LoKr PEFT's own tensors, see tune.lora.extract), export/<run name>.safetensors (kohya: A1111, ComfyUI) and,
with pivotal tuning, export/learned_embeds.safetensors (`pipe.load_textual_inversion(path, token=...)`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from tune import lora as lora_io
from tune import personalize as p
from tune.embeddings import EMBEDDINGS_FILE, save_embeddings
from tune.errors import ConfigError
from tune.evaluation import start_training_eval
from tune.lora.inject import (
    TYPE_OPTIONS,
    AdapterType,
    LoraTarget,
    UnetBlock,
    inject_lora,
    type_options,
    unet_target_pattern,
)
from tune.models.conditioning import TextEncoders
from tune.optim import OptimConfig, build_lr_schedule, build_optimizer, optimizer_metrics
from tune.runs import RunDir
from tune.tokens import text_towers
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
RECIPE = "lora"

EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class LoraOptions:
    """The adapters (the `[lora]` table)."""

    type: AdapterType = "lora"
    """lora, dora (LoRA plus a trained magnitude per output row), loha (Hadamard product of two low-rank
    pairs) or lokr (Kronecker product of a small and a low-rank factor); all through peft."""
    rank: int = 8
    """Rank r of each adapter."""
    alpha: float | None = None
    """Scale numerator: the update is (alpha / rank) * delta; unset means alpha = rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training (lora, dora)."""
    rank_dropout: float = 0.0
    """loha, lokr: dropout over the delta's output rows during training."""
    module_dropout: float = 0.0
    """loha, lokr: probability of skipping a whole module's adapter during a training step."""
    decompose_both: bool = False
    """lokr: also factor the small Kronecker factor (w1) into a low-rank pair."""
    decompose_factor: int = -1
    """lokr: size of the small factor's dimensions (must divide them); -1 = the divisor pair nearest
    the square root."""
    rank_dropout_scale: bool = False
    """lokr: rescale the delta by the share of rows rank_dropout kept."""
    targets: tuple[LoraTarget, ...] = ("attn2",)
    """Module groups that get adapters: attn2 (cross-attention), attn1 (self-attention), ff (feed-forward),
    proj (transformer proj_in/proj_out), resnets (resnet convs), text_encoder (q/k/v/out_proj, fc1/fc2; on
    SDXL of both text encoders)."""
    blocks: tuple[UnetBlock, ...] = ("down", "mid", "up")
    """The U-Net blocks whose `targets` get adapters: "down", "mid", "up". Leaving out the down blocks
    spares the backward pass through them, unless a token or the text encoder trains (their gradient
    crosses the whole U-Net)."""

    def __post_init__(self) -> None:
        if self.rank < 1 or (self.alpha is not None and self.alpha <= 0) or not 0 <= self.dropout < 1:
            raise ConfigError(f"need lora.rank >= 1, lora.alpha > 0, 0 <= lora.dropout < 1; got {self}")
        if not self.targets:
            raise ConfigError("lora.targets needs at least one group, e.g. ['attn2']")
        unet_target_pattern(self.targets, self.blocks)  # a U-Net group, known blocks: refused before the run
        if not (0 <= self.rank_dropout < 1 and 0 <= self.module_dropout < 1):
            raise ConfigError(f"lora.rank_dropout and lora.module_dropout must be in [0, 1); got {self}")
        self.type_options()  # only this type's options may be set

    def type_options(self) -> dict[str, object]:
        """This type's options, as peft's config names them."""
        values = {name: getattr(self, name) for options in TYPE_OPTIONS.values() for name in options}
        return type_options(self.type, values, self.dropout)


@dataclass(frozen=True)
class PivotalOptions(p.PivotalConfig):
    """Pivotal tuning (the `[pivotal]` table): the trigger word becomes a new token trained with the LoRA."""

    lora_lr: float = 0.0
    """Learning rate of the adapters while the token trains; 0 means optim.lr. The token carries most of the
    subject then, so the adapters want less (and with pivotal "auto" off, optim.lr holds for them)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_lr < 0:
            raise ConfigError(f"need pivotal.lora_lr >= 0 (0: optim.lr); got {self}")


@dataclass(frozen=True)
class Config(p.PersonalizeConfig):
    """Settings of the `lora` recipe."""

    max_steps: int = 400
    batch_size: int = 2  # photos; prior preservation adds as many class images
    optim: OptimConfig = OptimConfig(lr=5e-4, weight_decay=1e-4, schedule="constant", warmup_steps=20)
    """Optimizer and learning-rate schedule (of the adapters)."""
    lora: LoraOptions = LoraOptions()
    """Adapter rank, alpha, dropout and targets."""
    pivotal: PivotalOptions = PivotalOptions()
    """Pivotal tuning: also train the trigger as a new token."""
    prior: p.PriorConfig = p.PriorConfig(enabled=False)
    """Prior preservation; off unless enabled here (LoRA changes the model less than DreamBooth)."""
    export_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """dtype of the exported adapter files (checkpoints keep fp32)."""
    eval_every: int = 0
    """Score the adapter with `tune eval`'s metrics on `eval_suite` every this many steps, at step 0 and
    at the last step (eval/report.json; another suite: eval/<suite>/report.json), keeping the best step's
    adapter in export/best/; 0 = never."""


def main(cfg: Config) -> RunDir:
    # ---- run dir & seed -----------------------------------------------------------------------------
    subject = p.resolve_subject(cfg)  # before the run directory exists: a wrong key leaves nothing behind
    prompts = p.validation_prompts(subject, cfg.sample)  # the samples' prompts, which class images follow too
    prior = p.resolve_prior(cfg.prior, subject, prompts)
    pipe = p.load_base(cfg.base_model)  # a missing or broken base fails before the run directory exists
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)  # SDXL's second text encoder
    tokenizers, text_encoders = text_towers(pipe)  # SDXL: two of each; pivotal's trigger goes into both
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
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    base_hash = lora_io.base_model_hash(unet, *text_encoders)
    train_text = "text_encoder" in cfg.lora.targets or cfg.pivotal.enabled
    dtype = weight_dtype(accelerator)
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    unet.to(device, dtype)
    vae.to(device, p.vae_dtype(pipe, dtype))
    for model in text_encoders:
        model.to(device, torch.float32 if train_text else dtype)  # a trained text encoder stays fp32
    class_dir = None
    if prior is not None:  # drawn by the base model, before any adapter exists
        class_dir = p.prepare_class_images(
            pipe, prior, cfg.prior, base_hash=base_hash, cache_dir=cfg.data.cache_dir, accelerator=accelerator
        )
    new_tokens = p.add_trigger(cfg.pivotal, pivotal, subject, tokenizers, text_encoders)
    rank, alpha = cfg.lora.rank, cfg.lora.alpha or float(cfg.lora.rank)
    inject_lora(
        unet,
        text_encoder,
        cfg.lora.targets,
        rank,
        alpha,
        cfg.lora.dropout,
        text_encoder_2=text_encoder_2,
        type=cfg.lora.type,
        options=cfg.lora.type_options(),
        blocks=cfg.lora.blocks,
    )
    if new_tokens is not None:
        new_tokens.train_rows_only()  # after the injection, which freezes everything but the adapters
    embeddings = list(new_tokens.weights) if new_tokens else []
    embedding = {id(w) for w in embeddings}
    trainable = (q for m in (unet, *text_encoders) for q in m.parameters() if q.requires_grad)
    lora_params = [q for q in trainable if id(q) not in embedding]
    for q in lora_params:
        q.data = q.data.float()  # trained weights stay fp32 under mixed precision
    if cfg.gradient_checkpointing:
        for model in text_encoders if train_text else [None]:
            enable_gradient_checkpointing(unet, model)
    set_channels_last(unet, cfg.channels_last)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    log.info("%s: %d trainable tensors, rank %d, alpha %g", cfg.lora.type, len(lora_params), rank, alpha)

    # ---- data ---------------------------------------------------------------------------------------
    resolution = p.resolve_resolution(cfg.resolution, pipe)
    instance_prompt = new_tokens.expand(subject.instance_prompt) if new_tokens else subject.instance_prompt
    dataset, loader = p.build_photo_loader(
        subject.photos,
        instance_prompt,
        cfg.data,
        pipe=pipe,
        resolution=resolution,
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
    groups: list[dict] = [{"params": lora_params}]
    if new_tokens is not None:
        if cfg.pivotal.lora_lr:
            groups[0]["lr"] = cfg.pivotal.lora_lr
        groups.append({"params": embeddings, "lr": cfg.pivotal.lr, "weight_decay": 0.0})
    optimizer = build_optimizer(groups, cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    trained = [unet, *text_encoders] if train_text else [unet]
    *trained, optimizer, lr_schedule = accelerator.prepare(*trained, optimizer, lr_schedule)
    # The prepared models (DDP wrappers on several GPUs) run the training forward; `unet` and
    # `text_encoder` stay the plain modules that the pipeline samples with and the files are written from.
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
    checkpoint_trainable_only(accelerator)
    te, te2 = (text_encoder, text_encoder_2) if "text_encoder" in cfg.lora.targets else (None, None)

    def write_adapter(folder: Path, step: int) -> None:  # called inside each checkpoint save
        meta = {"tune_step": str(step)}
        lora_io.save_adapter(unet, te, folder / lora_io.CHECKPOINT_ADAPTER, meta, text_encoder_2=te2)
        if new_tokens is not None:
            save_embeddings(new_tokens, folder / EMBEDDINGS_FILE, meta)

    on_checkpoint(accelerator, write_adapter)
    step = resume_from_checkpoint(accelerator, run, cfg.resume)
    if evaluator is not None:
        evaluator.attach(run.path, step)
    run.update_info(
        **p.run_info(subject, cfg, base_hash, dataset, pipe=pipe),
        lora_tensors=len(lora_params),
        adapter_type=cfg.lora.type,
    )
    if cfg.report_to != "none":
        accelerator.init_trackers("lora", config=tracker_config(cfg))

    def evaluate(at: int) -> None:  # eval_every: score the adapter as it is now, keep the best one
        if evaluator is None or not accelerator.is_main_process:
            return

        def keep_best() -> None:
            best, meta = run.export_dir / "best", {"tune_step": str(at)}
            lora_io.save_adapter(
                unet, te, best / lora_io.FINAL_ADAPTER, meta, dtype=torch.float16, text_encoder_2=te2
            )
            if new_tokens is not None:
                save_embeddings(new_tokens, best / EMBEDDINGS_FILE, meta)

        evaluator.evaluate_in_training(pipe, at, keep_best, accelerator=accelerator, modules=sampled_modules)

    # ---- loop ---------------------------------------------------------------------------------------
    sampled_modules = [unet, *text_encoders]
    if step == 0 and val_loss is not None:
        val_loss.log(run, accelerator, 0)
    if step == 0 and cfg.sample_every:  # the base model (the adapter is still a no-op)
        p.sample_validation(
            pipe, prompts, cfg.sample, run.sample_dir(0), accelerator=accelerator, modules=sampled_modules
        )
    if step == 0:  # the base model: no average yet, so no weights to switch
        evaluate(0)
    unet.train()
    for model in text_encoders:
        model.train(train_text)
    batches = p.forever(loader)
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    dropout = cfg.lora.dropout or cfg.lora.rank_dropout or cfg.lora.module_dropout
    bar = tqdm(total=cfg.max_steps, initial=step, desc="lora", unit="step")
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + k
            if dropout:  # the same dropout masks after a resume
                torch.manual_seed(cfg.seed * 2**32 + micro)
            batch = next(batches).to(device)
            with accelerator.accumulate(*trained), accelerator.autocast():
                loss = photo_loss(batch, micro)
                accelerator.backward(loss)
                if nonfinite.check(loss):  # a NaN/inf loss skips the update (its gradients are dropped)
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        params = lora_params + embeddings
                        accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach())
        if new_tokens is not None:
            new_tokens.restore_frozen_rows()
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
            p.sample_validation(
                pipe,
                prompts,
                cfg.sample,
                run.sample_dir(step),
                accelerator=accelerator,
                modules=sampled_modules,
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
        file_dtype = EXPORT_DTYPES[cfg.export_dtype]
        final = lora_io.final_adapter_path(run.path)
        lora_io.save_adapter(unet, te, final, {"tune_step": "final"}, dtype=file_dtype, text_encoder_2=te2)
        kohya = lora_io.export_run(run.path, "kohya", dtype=file_dtype, force=True)
        if new_tokens is not None:
            save_embeddings(new_tokens, run.export_dir / EMBEDDINGS_FILE, {"tune_base_model_hash": base_hash})
        log.info("exported %s and %s", lora_io.final_adapter_path(run.path), kohya)
    accelerator.end_training()
    run.finish()
    return run
