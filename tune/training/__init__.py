"""The plumbing every training recipe shares: run start, seeding, accelerate, checkpoints and resume.

A recipe calls, in order:

    run, cfg = start_run("lora", cfg)                       # run dir, resolved config, seed
    accelerator = build_accelerator(cfg.mixed_precision, cfg.grad_accum)
    ... build models, optimizer, lr schedule, loader; accelerator.prepare(...) ...
    accelerator.register_for_checkpointing(loader)           # anything with state_dict/load_state_dict
    step = resume_from_checkpoint(accelerator, run, cfg.resume)   # 0 when starting fresh
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, accelerator)
    ... loop: loss, backward; `if nonfinite.check(loss): optimizer.step()`;
              `if nonfinite.finish(run, step, loss_value): log the step`;
              save_checkpoint(accelerator, run, step) every N steps ...

One job per module:

    run          start_run, ReplicaRunDir                            run dir, resolved config, seed
    accelerator  build_accelerator, resolve_mixed_precision,         processes, mixed precision, grad accum
                 weight_dtype
    checkpoints  save_checkpoint, resume_from_checkpoint,            complete-marked checkpoints, resume,
                 checkpoint_trainable_only, on_checkpoint,           what they hold, files written with them,
                 checkpoint_bytes, module_bytes                      sizes for disk-space checks
    guard        NonFiniteGuard                                      skip NaN/inf steps, stop after N
    speed        compiled, set_channels_last,                        torch.compile, memory order,
                 enable_gradient_checkpointing                       activation recompute
    steps        is_due, log_step, step_generator                    cadence, metrics rows, per-step noise
    trackers     build_trackers, tracker_config                      report_to: TensorBoard, W&B
    weights      evaluation_weights, use_final_weights,              schedule-free optimizers' evaluation
                 use_training_weights                                weights for sampling, saving, export

Every public name is re-exported, so `from tune.training import save_checkpoint` works as it did
when this package was one module.
"""

from tune.training.accelerator import build_accelerator, resolve_mixed_precision, weight_dtype
from tune.training.checkpoints import (
    PAUSE_AFTER_CHECKPOINT_ENV,
    PAUSE_IN_CHECKPOINT_ENV,
    checkpoint_bytes,
    checkpoint_trainable_only,
    module_bytes,
    on_checkpoint,
    resume_from_checkpoint,
    save_checkpoint,
)
from tune.training.guard import NonFiniteGuard
from tune.training.run import ReplicaRunDir, start_run
from tune.training.speed import compiled, enable_gradient_checkpointing, set_channels_last
from tune.training.steps import is_due, log_step, step_generator
from tune.training.trackers import build_trackers, tracker_config
from tune.training.weights import evaluation_weights, use_final_weights, use_training_weights

__all__ = [
    "NonFiniteGuard",
    "PAUSE_AFTER_CHECKPOINT_ENV",
    "PAUSE_IN_CHECKPOINT_ENV",
    "ReplicaRunDir",
    "build_accelerator",
    "build_trackers",
    "checkpoint_bytes",
    "checkpoint_trainable_only",
    "compiled",
    "enable_gradient_checkpointing",
    "evaluation_weights",
    "is_due",
    "log_step",
    "module_bytes",
    "on_checkpoint",
    "resolve_mixed_precision",
    "resume_from_checkpoint",
    "save_checkpoint",
    "set_channels_last",
    "start_run",
    "step_generator",
    "tracker_config",
    "use_final_weights",
    "use_training_weights",
    "weight_dtype",
]
