"""Run start: the run directory (created by the main process only), the resolved config, the seed."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tune.config import to_toml
from tune.errors import ConfigError, TuneError
from tune.runs import RunDir, default_output_dir, step_dir_name
from tune.training.accelerator import _distributed_cpu

log = logging.getLogger(__name__)


class ReplicaRunDir(RunDir):
    """The run directory as the other processes of a multi-process run see it: the same paths, no writes.

    The main process creates the folder, holds its LOCK and writes every file (config, run.json,
    metrics, samples, COMPLETE markers, exports, DONE); these calls are no-ops here.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, None)

    def sample_dir(self, step: int) -> Path:
        return self.samples_dir / step_dir_name(step)

    def log_metrics(self, step: int, **values: Any) -> None:
        pass

    def update_info(self, **values: Any) -> None:
        pass

    def mark_checkpoint_complete(self, step: int) -> None:
        pass

    def finish(self) -> None:
        self.close()


def start_run(recipe: str, cfg: Any) -> tuple[RunDir, Any]:
    """Create (or reopen, with `resume`) the run directory; save the resolved config; seed everything.

    Returns the run and the config with `output_dir` resolved (the saved config.toml names the
    folder, so running it again reproduces this run). Under `torchrun` / `accelerate launch` only the
    main process creates and writes the folder (the others get a `ReplicaRunDir` of the same path, and
    the main process's error, if creating it failed).
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, set_seed

    state = PartialState(cpu=_distributed_cpu())  # joins the process group under torchrun / accelerate launch
    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=str(default_output_dir(recipe)))
    resume = getattr(cfg, "resume", "")
    if resume not in ("", "latest") and not Path(resume).is_dir():
        raise ConfigError(f"resume must be '', 'latest' or a checkpoint folder; got {resume!r}")
    run: RunDir | None = None
    error = ""
    if state.is_main_process:
        try:
            run = RunDir.create(cfg.output_dir, recipe, to_toml(cfg), resume=bool(resume))
        except TuneError as err:
            if state.num_processes == 1:
                raise
            error = str(err)
    if state.num_processes > 1:
        # The main process's folder name (a default one holds a timestamp) and its error, if any.
        shared = broadcast_object_list([cfg.output_dir, error])
        cfg = dataclasses.replace(cfg, output_dir=shared[0])
        if shared[1]:
            raise TuneError(shared[1])
        if run is None:
            run = ReplicaRunDir(Path(cfg.output_dir))
            logging.getLogger().setLevel(logging.WARNING)  # progress is logged once, by the main process
    assert run is not None
    set_seed(cfg.seed)
    log.info("run directory: %s", run.path)
    return run, cfg
