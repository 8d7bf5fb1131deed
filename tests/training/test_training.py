"""Run start, checkpoints and exact resume through accelerate (tune.training)."""

from dataclasses import dataclass

import pytest
import torch

from tune.errors import ConfigError, TuneError
from tune.runs import read_run
from tune.training import build_accelerator, resume_from_checkpoint, save_checkpoint, start_run


@dataclass(frozen=True)
class Cfg:
    output_dir: str = ""
    seed: int = 0
    resume: str = ""


class Position:
    """Stands in for the data loader: anything with state_dict/load_state_dict is checkpointed."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def train(out, steps, resume="", stop_after=None):
    run, cfg = start_run("unit", Cfg(output_dir=str(out), resume=resume))
    acc = build_accelerator()
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    position = Position()
    model, opt, sched = acc.prepare(model, opt, sched)
    acc.register_for_checkpointing(position)
    step = resume_from_checkpoint(acc, run, cfg.resume)
    while step < steps:
        x = torch.randn(8, 4)  # from the global RNG, which the checkpoint restores
        loss = model(x).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        position.n += 1
        if step % 2 == 0:
            save_checkpoint(acc, run, step, keep=2)
        if step == stop_after:
            run.close()
            return None, run
    run.finish()
    return model.weight.detach().clone(), run


def test_resume_is_exact(tmp_path):
    whole, _ = train(tmp_path / "a", 6)
    _, run = train(tmp_path / "b", 6, stop_after=3)  # "crash" after step 3: checkpoint 2 is the latest
    assert read_run(run.path).checkpoint_steps == [2]
    resumed, run = train(tmp_path / "b", 6, resume="latest")
    assert torch.equal(whole, resumed)
    assert read_run(run.path).checkpoint_steps == [4, 6]  # keep=2 pruned the oldest


def test_resolved_output_dir_and_bad_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, cfg = start_run("unit", Cfg())
    assert (
        cfg.output_dir.startswith("runs/unit-")
        and f'output_dir = "{cfg.output_dir}"' in (run.path / "config.toml").read_text()
    )
    run.close()
    with pytest.raises(ConfigError, match="resume must be"):
        start_run("unit", Cfg(output_dir=str(tmp_path / "x"), resume="newest"))
    run, _ = start_run("unit", Cfg(output_dir=str(tmp_path / "y")))
    (run.checkpoints_dir / "step_000005").mkdir()
    with pytest.raises(TuneError, match="not a complete checkpoint"):
        resume_from_checkpoint(build_accelerator(), run, str(run.checkpoints_dir / "step_000005"))
