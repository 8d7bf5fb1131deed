"""The plumbing every training recipe shares: run start, seeding, accelerate, checkpoints and resume.

One job per module:

    run          start_run, ReplicaRunDir, build_accelerator, checkpoints, resume, NonFiniteGuard,
                 module_bytes                                         (being split up)

Every public name is re-exported, so `from tune.training import save_checkpoint` works as it did
when this package was one module.
"""

from tune.training.run import (
    PAUSE_AFTER_CHECKPOINT_ENV,
    PAUSE_IN_CHECKPOINT_ENV,
    NonFiniteGuard,
    ReplicaRunDir,
    build_accelerator,
    checkpoint_bytes,
    module_bytes,
    resume_from_checkpoint,
    save_checkpoint,
    start_run,
)

__all__ = [
    "NonFiniteGuard",
    "PAUSE_AFTER_CHECKPOINT_ENV",
    "PAUSE_IN_CHECKPOINT_ENV",
    "ReplicaRunDir",
    "build_accelerator",
    "checkpoint_bytes",
    "module_bytes",
    "resume_from_checkpoint",
    "save_checkpoint",
    "start_run",
]
