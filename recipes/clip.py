"""CLIP: train a text tower and an image tower contrastively on the toy world's captions, from scratch.

    tune data world data/world-train --count 30000 --split train
    tune run clip --config default

The text tower is SD1.5's CLIP text transformer at our base model's width; it becomes the frozen
text encoder of the U-Net, which cross-attends to its per-token `last_hidden_state`. Each step draws one of an image's eight training captions (canonical, partial,
paraphrased, with a made-up word), so the tower learns every phrasing and that an unknown word changes
nothing. Other images a caption also describes (a partial caption fits many) are not counted as
negatives. An auxiliary linear head per tower predicts the world's attributes (the judge's: class,
colour, pattern, second colour, hair, background, style, size, position) from the embedding, the text
head only those its caption names: a dense signal that keeps the attributes linearly separable, so
held-out (colour, class) pairs compose; the heads are not exported.

Exports `export/clip/` (CLIPModel, tokenizer and image-processor files), `export/clip/text_encoder/`
(CLIPTextModel) and `export/clip/tokenizer/`; writes text-to-image and image-to-text top-1 retrieval
among 100 held-out and 100 training specs to `eval/clip.json`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPImageProcessorPil, CLIPModel

from tune.config import TrainConfig, check_at_least
from tune.data.config import DataConfig
from tune.data.loader import build_dataloader, build_dataset
from tune.durable import atomic_folder
from tune.errors import ConfigError
from tune.models import build_clip_tokenizer
from tune.models.scratch import build_clip_model
from tune.models.tokenizer import MIN_VOCAB_SIZE
from tune.optim import OptimConfig, build_lr_schedule, build_optimizer
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
from tune.world.captions import parse, spec_attributes
from tune.world.judge import HEADS, IGNORE, labels
from tune.world.retrieval import fits, read_captions, retrieval, retrieval_set, text_labels

log = logging.getLogger(__name__)
# Runs record this name; a copy made by `tune cp` keeps it, so `--config NAME` finds its configs.
RECIPE = "clip"

# The attributes the auxiliary heads predict (the judge's heads) -> their values, in label order.
ATTRIBUTES: dict[str, tuple[str, ...]] = HEADS
# Fixed (not cfg.seed) so that every run is scored on the same images; the training folder's images
# come from `tune data world --seed` (0 by default), so these jitters are new.
EVAL_SEED = 1_000_003
VAL_SEED = 2_000_003
EVAL_COUNT = 100
"""Distinct specs per retrieval test (validation, final held-out, final train): ranks 100 images."""
_POSITIVE = ("resolution", "patch_size", "projection_dim")
_POSITIVE += tuple(f"{t}_{k}" for t in ("text", "vision") for k in ("hidden_size", "num_layers", "num_heads"))


@dataclass(frozen=True)
class Config(TrainConfig):
    """Settings of the clip recipe."""

    max_steps: int = 1000
    batch_size: int = 128  # image-caption pairs, each contrasted against the rest of its batch
    sample_every: int = 100  # retrieval on a fixed held-out set, logged to metrics.jsonl (no images)
    checkpoint_every: int = 250
    data_dir: str = "data/world-train"
    """World imagefolder (metadata.jsonl with text, captions and attribute columns), written by
    `tune data world data/world-train --count 30000 --split train`."""
    resolution: int = 64
    """Image side in pixels: the training size and the vision tower's input size."""
    vocab_size: int = 1024
    """Upper bound on the BPE vocabulary learned from the captions (they run out of merges far below)."""
    text_hidden_size: int = 128
    """Text tower width: the U-Net's cross_attention_dim (the "small" preset's 128)."""
    text_num_layers: int = 4
    """Text transformer layers."""
    text_num_heads: int = 4
    """Text attention heads."""
    vision_hidden_size: int = 128
    """Vision tower (ViT) width."""
    vision_num_layers: int = 4
    """Vision transformer layers."""
    vision_num_heads: int = 4
    """Vision attention heads."""
    patch_size: int = 16
    """ViT patch side in pixels (resolution must be a multiple); 16 learned as fast per step as 8 did,
    at half the cost."""
    projection_dim: int = 128
    """Width of the shared embedding space."""
    aux_weight: float = 1.0
    """Weight of the auxiliary attribute-classification loss on both towers' embeddings (0: off)."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_steps=100)
    )
    """Optimizer and schedule. A partial [optim] table starts from OptimConfig's defaults, not these."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, _POSITIVE, 1)  # before the checks below divide by patch_size
        checks = [
            ("batch_size", self.batch_size >= 2, "must be >= 2 (pairs need in-batch negatives)"),
            (
                "resolution",
                self.resolution % self.patch_size == 0,
                f"must be a multiple of patch_size ({self.patch_size})",
            ),
            (
                "text_hidden_size",
                self.text_hidden_size % self.text_num_heads == 0,
                "must be a multiple of text_num_heads",
            ),
            (
                "vision_hidden_size",
                self.vision_hidden_size % self.vision_num_heads == 0,
                "must be a multiple of vision_num_heads",
            ),
            ("aux_weight", self.aux_weight >= 0, "must be >= 0"),
            ("vocab_size", self.vocab_size >= MIN_VOCAB_SIZE, f"must be >= {MIN_VOCAB_SIZE}"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{key} {rule}; got {getattr(self, key)!r}")


def contrastive_loss(logits_per_text: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; `same[i, j]` (off the diagonal): caption i also describes image j, a false
    negative, masked in both directions."""
    eye = torch.eye(len(same), dtype=torch.bool, device=same.device)
    same = same | same.T
    logits = logits_per_text.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def attribute_loss(head: torch.nn.Module, embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the attribute classifiers sharing one linear head (labels IGNORE skipped)."""
    # Unit-norm embeddings have coordinates of size 1/sqrt(d): rescale them to unit variance, or a
    # freshly initialised head needs hundreds of steps to grow confident logits.
    logits = head(embeds * math.sqrt(embeds.shape[-1])).split([len(v) for v in ATTRIBUTES.values()], dim=-1)
    losses = [F.cross_entropy(x, labels[:, k], ignore_index=IGNORE) for k, x in enumerate(logits)]
    kept = [loss for k, loss in enumerate(losses) if (labels[:, k] != IGNORE).any()]
    return torch.stack(kept).mean()


class ClipTraining(torch.nn.Module):
    """CLIP and its attribute heads as one module whose forward gives what the losses need: DDP
    synchronises gradients through a wrapped module's forward, and the heads are used outside CLIP's."""

    def __init__(self, model: CLIPModel, heads: torch.nn.ModuleDict) -> None:
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        text_labels: torch.Tensor,
        image_labels: torch.Tensor,
    ):
        out = self.model(input_ids=input_ids, pixel_values=pixel_values)
        loss_attr = (
            attribute_loss(self.heads["text"], out.text_embeds, text_labels)
            + attribute_loss(self.heads["image"], out.image_embeds, image_labels)
        ) / 2
        return out, loss_attr


def main(cfg: Config) -> RunDir:
    # --- run dir & seed ----------------------------------------------------------------------
    captions = read_captions(cfg.data_dir)  # before start_run: a missing dataset leaves no run folder
    run, cfg = start_run(RECIPE, cfg)
    accelerator = build_accelerator(cfg.mixed_precision)
    device = accelerator.device
    run.update_info(max_steps=cfg.max_steps, data_dir=cfg.data_dir)

    # --- models --------------------------------------------------------------------------------
    texts = sorted({text for caps, _ in captions.values() for text in caps})  # what the tokenizer learns
    with tempfile.TemporaryDirectory(prefix="tune-clip-tokenizer-") as tmp:
        tokenizer = build_clip_tokenizer(texts, cfg.vocab_size, tmp)  # deterministic: rebuilt at export
    model = build_clip_model(
        tokenizer,
        text=(cfg.text_hidden_size, cfg.text_num_layers, cfg.text_num_heads),
        vision=(cfg.vision_hidden_size, cfg.vision_num_layers, cfg.vision_num_heads),
        resolution=cfg.resolution,
        patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
    )
    n_labels = sum(len(v) for v in ATTRIBUTES.values())
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(cfg.projection_dim, n_labels) for k in ("text", "image")})
    log.info("clip: %.2fM parameters; vocabulary %d tokens", model.num_parameters() / 1e6, len(tokenizer))

    # --- data ----------------------------------------------------------------------------------
    data_cfg = DataConfig(resolution=cfg.resolution, bucketing=False, flip=False, min_side=cfg.resolution)
    dataset = build_dataset(cfg.data_dir, data_cfg, seed=cfg.seed)
    loader = build_dataloader(dataset, batch_size=cfg.batch_size, seed=cfg.seed, accelerator=accelerator)
    val_pixels, val_specs = retrieval_set("heldout", EVAL_COUNT, cfg.resolution, VAL_SEED)

    # --- optimizer -----------------------------------------------------------------------------
    # No weight decay on gains, biases and the logit scale (decay would pull the temperature to 1).
    params = [p for m in (model, heads) for p in m.parameters()]
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = build_optimizer(groups, cfg.optim)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    # `training` (a DDP wrapper with several processes) runs the losses; `model` stays the plain CLIPModel.
    training, optimizer, lr_schedule = accelerator.prepare(ClipTraining(model, heads), optimizer, lr_schedule)
    accelerator.register_for_checkpointing(loader)
    step = resume_from_checkpoint(accelerator, run, cfg.resume)

    # --- loop ----------------------------------------------------------------------------------
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="clip", unit="step")
    while step < cfg.max_steps:
        for batch in loader:
            # Caption choice depends on (seed, step) only, so a resumed run picks the same ones.
            rng = random.Random(f"{cfg.seed}:captions:{step}")
            rows = [captions[c] for c in batch.captions]
            chosen = [rng.choice(caps) for caps, _ in rows]
            # Padding to the batch's longest caption rather than to 77 gives the same gradients at a
            # fifth of the text tower's cost: attention is causal and the losses read the first EOS.
            ids = tokenizer(chosen, padding="longest", truncation=True, return_tensors="pt").input_ids
            image_labels = torch.tensor([list(labels(spec).values()) for _, spec in rows], device=device)
            text_targets = torch.tensor([text_labels(text) for text in chosen], device=device)  # parses too
            named, truths = [parse(t) for t in chosen], [spec_attributes(spec) for _, spec in rows]
            same = torch.tensor([[fits(n, t) for t in truths] for n in named], device=device)

            out, loss_attr = training(
                ids.to(device), batch.pixel_values.to(device), text_targets, image_labels
            )
            loss_clip = contrastive_loss(out.logits_per_text.float(), same)
            loss = loss_clip + cfg.aux_weight * loss_attr
            accelerator.backward(loss)
            if nonfinite.check(loss):  # a NaN/inf loss skips the update (its gradients are dropped)
                if cfg.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # CLIP's cap on the logit scale (100), which keeps training stable
                model.logit_scale.clamp_(max=math.log(100))
            step += 1

            values = {"loss": loss.item(), "loss_clip": loss_clip.item(), "loss_attr": loss_attr.item()}
            if nonfinite.finish(run, step, values["loss"]):  # else logged as skipped; N in a row stop the run
                run.log_metrics(
                    step,
                    **values,
                    lr=lr_schedule.get_last_lr()[0],
                    logit_scale=model.logit_scale.exp().item(),
                )
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            if is_due(step, cfg.sample_every, cfg.max_steps) and accelerator.is_main_process:
                with evaluation_weights(accelerator):
                    val = retrieval(model, tokenizer, val_pixels, val_specs)
                run.log_metrics(step, val_t2i_top1=val["t2i_top1"], val_i2t_top1=val["i2t_top1"])
                log.info("step %d: loss %.3f, held-out t2i top-1 %.2f", step, values["loss"], val["t2i_top1"])
            if is_due(step, cfg.checkpoint_every, cfg.max_steps) or step == cfg.max_steps:
                save_checkpoint(accelerator, run, step, keep=cfg.checkpoints_keep)
            if step >= cfg.max_steps:
                break
    bar.close()
    use_final_weights(accelerator)  # a schedule-free optimizer's averaged weights are the trained ones

    # --- save / export -------------------------------------------------------------------------
    if accelerator.is_main_process:
        clip_dir = run.export_dir / "clip"
        with atomic_folder(clip_dir, module_bytes(model)) as folder:  # complete or absent
            model.save_pretrained(folder)
            # The text tower alone as well: it loads as a CLIPTextModel with no unused-weights report.
            model.text_model.save_pretrained(folder / "text_encoder")
            build_clip_tokenizer(texts, cfg.vocab_size, folder / "tokenizer")
            for f in (folder / "tokenizer").iterdir():
                shutil.copy2(f, folder / f.name)
            # Pixels in [-1, 1] at the training size, so CLIPProcessor.from_pretrained(folder) feeds it right.
            CLIPImageProcessorPil(
                size={"shortest_edge": cfg.resolution},
                crop_size=cfg.resolution,
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
            ).save_pretrained(folder)

        report: dict = {"step": step, "specs": EVAL_COUNT}
        for split in ("heldout", "train"):
            r = report[split] = retrieval(
                model, tokenizer, *retrieval_set(split, EVAL_COUNT, cfg.resolution, EVAL_SEED)
            )
            log.info(
                "eval %s: text->image top-1 %.3f, image->text top-1 %.3f", split, r["t2i_top1"], r["i2t_top1"]
            )
        (run.eval_dir / "clip.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    run.finish()
    return run
