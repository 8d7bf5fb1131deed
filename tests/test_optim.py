"""tune.optim: every optimizer by name, Prodigy's own step size, the schedule-free weights switch."""

from __future__ import annotations

import copy as copy_module

import pytest
import torch

from tune.config import load_config
from tune.errors import ConfigError
from tune.optim import (
    OPTIMIZERS,
    OptimConfig,
    build_lr_schedule,
    build_optimizer,
    eval_weights,
    has_eval_weights,
    optimizer_metrics,
)


def fit(cfg: OptimConfig, steps: int = 30) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    """A few steps of least squares on a fixed problem."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    optimizer = build_optimizer(list(model.parameters()), cfg)
    schedule = build_lr_schedule(optimizer, cfg, steps)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adamw_schedulefree"])
def test_each_optimizer_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    start = torch.nn.functional.mse_loss(torch.nn.Linear(8, 1)(x), y)
    model, optimizer = fit(OptimConfig(name=name, lr=1e-2))
    with eval_weights([optimizer]):
        assert torch.nn.functional.mse_loss(model(x), y) < start


def test_prodigy_ignores_the_adam_lr_and_estimates_its_step_size() -> None:
    cfg = load_config(OptimConfig, None, ["name='prodigy'", "lr=5e-4", "prodigy.d_coef=0.5"])
    assert cfg.prodigy.d_coef == 0.5 and cfg.prodigy.lr == 1.0
    _, optimizer = fit(cfg)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1.0 and group["d_coef"] == 0.5
    assert optimizer_metrics(optimizer)["d"] > 100 * cfg.prodigy.d0  # grown from d0 within 30 steps
    assert optimizer_metrics(fit(OptimConfig())[1]) == {}


def test_schedule_free_switches_to_its_average_and_back() -> None:
    model, optimizer = fit(OptimConfig(name="adamw_schedulefree", lr=1e-2, warmup_steps=5))
    assert has_eval_weights(optimizer) and not has_eval_weights(fit(OptimConfig())[1])
    training = model.weight.detach().clone()
    with eval_weights([optimizer]):
        averaged = model.weight.detach().clone()
    assert not torch.allclose(training, averaged)
    torch.testing.assert_close(model.weight.detach(), training)  # back, up to rounding
    with eval_weights([optimizer]), eval_weights([optimizer]):  # nested: the inner block switches nothing
        torch.testing.assert_close(model.weight.detach(), averaged)
    assert optimizer.param_groups[0]["train_mode"]
    # its warmup is its own: the lr schedule stays flat
    assert optimizer.param_groups[0]["lr"] == 1e-2 and optimizer.param_groups[0]["warmup_steps"] == 5


def test_schedule_free_state_round_trips() -> None:
    model, optimizer = fit(OptimConfig(name="adamw_schedulefree", lr=1e-2), steps=10)
    state = copy_module.deepcopy(optimizer.state_dict())  # else both share the state tensors
    copy = torch.nn.Linear(8, 1)
    copy.load_state_dict(model.state_dict())
    again = build_optimizer(list(copy.parameters()), OptimConfig(name="adamw_schedulefree", lr=1e-2))
    again.load_state_dict(state)
    for opt, m in ((optimizer, model), (again, copy)):
        m(torch.ones(1, 8)).sum().backward()
        opt.step()
    assert torch.equal(model.weight, copy.weight)


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="constant with adamw_schedulefree"):
        OptimConfig(name="adamw_schedulefree", schedule="cosine")
    with pytest.raises(ConfigError, match="optim.prodigy needs"):
        load_config(OptimConfig, None, ["name='prodigy'", "prodigy.d_coef=0"])
    with pytest.raises(ConfigError, match="prodigy"):
        load_config(OptimConfig, None, ["name='prodigi'"])
    assert {"prodigy", "adamw_schedulefree"} <= set(OPTIMIZERS)


def test_prodigy_steps_every_training_group_by_its_one_estimate(caplog: pytest.LogCaptureFixture) -> None:
    """Pivotal tuning gives its embedding group lr 5e-3 beside adapters at optim.lr 1e-3; prodigyopt refuses
    different rates at its first step, so every training group gets Prodigy's multiplier (a frozen group
    stays at 0), the run says so, and the optimizer steps."""
    cfg = load_config(OptimConfig, None, ["name='prodigy'", "lr=1e-3", "prodigy.lr=0.5"])
    adapters, embedding, frozen = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    groups = [{"params": [adapters]}, {"params": [embedding], "lr": 5e-3}, {"params": [frozen], "lr": 0.0}]
    with caplog.at_level("WARNING", logger="tune.optim"):
        optimizer = build_optimizer(groups, cfg)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.5, 0.0])
    assert "do not apply" in caplog.text
    for _ in range(3):
        (adapters.square().sum() + embedding.square().sum() + frozen.square().sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(adapters.data, torch.ones(3)) and not torch.equal(embedding.data, torch.ones(3))
    assert torch.equal(frozen.data, torch.ones(3))
