"""What the personalization recipes (lora, dreambooth, textual_inversion) share, so it is written once.

    tune run lora base_model=PATH instance_dir=PATH instance_prompt="a photo of sks toy" output_dir=PATH
    tune run lora concept=concepts/sks-toy

- `PersonalizeConfig`: the keys every personalization command takes (each recipe's `Config`
  subclasses it, adds its own keys and may change defaults), with the `[data]`, `[sample]` and
  `[prior]` tables defined here.
- `resolve_subject`: the subject from `concept=concepts/<name>` (photos, prompts, token, class word,
  validation prompts, prior-preservation settings) or from `instance_dir` / `instance_prompt`;
  keys given explicitly win over the concept's.
- `load_base`: the base model (a diffusers folder or single file), with a clear error when the
  default `models/world-base` is missing.
- `build_photo_loader`: photos (plus class images) to batches through the shared loader, with cached
  VAE latents whenever the crop is deterministic, so a second run on the same photos encodes nothing.
- `sample_validation`: the same prompts x seeds into `samples/step_XXXXXX/` at step 0 (the base
  model) and every `sample_every` steps, through the shared sampler.
- `build_validation_loss`: `val_loss` on held-out photos (a fixed share, or `val_dir`) at fixed noise
  and timesteps, at step 0, every `val_every` steps and at the end.
- `apply_run_weights`: a finished run's (or one checkpoint's) tuned weights put into its base pipeline
  for a `with` block, and taken out again (`tune eval`, the dashboard's live images).

The training loops themselves stay in the recipes, written out.

Where each job lives:
- `config`: `PersonalizeConfig` and its `[data]` (`PhotoOptions`), `[sample]` and `[prior]` tables, and the
  `[pivotal]` table the lora and dreambooth recipes take (`PivotalConfig`);
- `subject`: `Subject`, `resolve_subject`, `trigger_and_class`, `validation_prompts`, `without_trigger`;
- `trigger`: how the trigger trains (`resolve_pivotal`: off, a new token, or a blank known word's own row)
  and the token to train (`add_trigger`);
- `prior`: the class images (`resolve_prior`, `prepare_class_images`);
- `loading`: `load_base`, the photo loader (`build_photo_loader`, `encode_batch`, ...) and `PhotoLoss`;
- `attention_loss`: the trigger-attention loss on masked photos (`trigger_attention_loss` builds it);
- `hooks`: `sample_validation` and `run_info`, called during and after training;
- `validation`: the held-out photos (`holdout_share`) and `ValidationLoss` (`build_validation_loss`);
- `weights`: `apply_run_weights` (with `AppliedWeights`, `RECIPES`), used once a run has weights.
Generic training helpers (precision, step cadence, trackers, compile, checkpoint hooks) live in
`tune.training`; a few are re-exported here for callers that still reach them through this package.
"""

from __future__ import annotations

from tune.paths import find_path  # re-exported: the recipes look concepts and photos up with it
from tune.personalize.attention_loss import trigger_attention_loss
from tune.personalize.config import (
    DEFAULT_BASE_MODEL,
    CompileMode,
    MixedPrecision,
    PersonalizeConfig,
    PhotoOptions,
    PivotalConfig,
    PriorConfig,
    ReportTo,
    SampleConfig,
)
from tune.personalize.hooks import run_info, sample_validation
from tune.personalize.loading import (
    PhotoLoss,
    build_photo_loader,
    cache_info,
    encode_batch,
    forever,
    latent_multiple,
    load_base,
    resolve_resolution,
    sample_generators,
    vae_dtype,
    with_components,
)
from tune.personalize.prior import Prior, prepare_class_images, resolve_prior
from tune.personalize.subject import (
    Subject,
    resolve_subject,
    trigger_and_class,
    validation_prompts,
    without_trigger,
)
from tune.personalize.trigger import add_trigger, resolve_pivotal
from tune.personalize.validation import ValidationLoss, build_validation_loss, holdout_share
from tune.personalize.weights import AppliedWeights, apply_run_weights
from tune.training.accelerator import resolve_mixed_precision
from tune.training.checkpoints import checkpoint_trainable_only
from tune.training.steps import is_due
from tune.training.trackers import build_trackers

__all__ = [
    "AppliedWeights",
    "CompileMode",
    "DEFAULT_BASE_MODEL",
    "MixedPrecision",
    "PersonalizeConfig",
    "PhotoLoss",
    "PhotoOptions",
    "PivotalConfig",
    "Prior",
    "PriorConfig",
    "ReportTo",
    "SampleConfig",
    "Subject",
    "ValidationLoss",
    "add_trigger",
    "apply_run_weights",
    "build_photo_loader",
    "build_trackers",
    "build_validation_loss",
    "cache_info",
    "checkpoint_trainable_only",
    "encode_batch",
    "find_path",
    "forever",
    "holdout_share",
    "is_due",
    "latent_multiple",
    "load_base",
    "prepare_class_images",
    "resolve_mixed_precision",
    "resolve_pivotal",
    "resolve_prior",
    "resolve_resolution",
    "resolve_subject",
    "run_info",
    "sample_generators",
    "vae_dtype",
    "with_components",
    "sample_validation",
    "trigger_attention_loss",
    "trigger_and_class",
    "validation_prompts",
    "without_trigger",
]
