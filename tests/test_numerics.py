"""Shared training numerics (tune.diffusion) and the optimizer factory (tune.optim)."""

import pytest
import torch
from diffusers import DDPMScheduler

from tune.config import load_config
from tune.diffusion import DiffusionConfig, denoising_loss, loss_weights, sample_noise, training_target
from tune.errors import ConfigError
from tune.optim import OPTIMIZERS, OptimConfig, build_lr_schedule, build_optimizer, optimizer_state_bytes


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_targets_match_the_scheduler_formulas(scheduler):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(training_target(scheduler, "epsilon", x0, noise, t), noise)
    v = training_target(scheduler, "v_prediction", x0, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_min_snr_weights(scheduler):
    t = torch.tensor([10, 500, 990])
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.equal(loss_weights(scheduler, t, "epsilon", 0.0), torch.ones(3))
    torch.testing.assert_close(loss_weights(scheduler, t, "epsilon", 5.0), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(
        loss_weights(scheduler, t, "v_prediction", 5.0), torch.clamp(snr, max=5) / (snr + 1)
    )
    assert loss_weights(scheduler, t, "epsilon", 5.0)[0] < 1  # high SNR (small t) is down-weighted


def test_prior_preservation_loss():
    pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    target[2:] = 3.0  # class images: squared error 9
    is_prior = torch.tensor([False, False, True, True])
    assert denoising_loss(pred, target, torch.ones(4)).item() == pytest.approx(5.0)
    assert denoising_loss(pred, target, torch.ones(4), is_prior, 0.5).item() == pytest.approx(1 + 0.5 * 9)


def test_noise_offset_is_seeded_and_per_channel():
    x = torch.zeros(2, 4, 8, 8)
    a = sample_noise(x, 0.1, torch.Generator().manual_seed(1))
    b = sample_noise(x, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_noise(x, 0.0, torch.Generator().manual_seed(1)))


def test_config_validation():
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match="prediction_type"):
        DiffusionConfig(prediction_type="x0")
    with pytest.raises(ConfigError, match="^name must be one of adamw, adamw8bit"):
        load_config(OptimConfig, None, ["name=sgd"])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)  # 8192 weights: above bitsandbytes' 4096-element 8-bit threshold
    x, y = torch.randn(32, 128), torch.randn(32, 64)
    opt = build_optimizer(model.parameters(), OptimConfig(name=name, lr=1e-2))
    first = None
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first


def test_8bit_state_is_at_most_30_percent_of_adamw():
    def state_bytes(name):
        model = torch.nn.Linear(256, 256)
        opt = build_optimizer(model.parameters(), OptimConfig(name=name))
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
        return optimizer_state_bytes(opt)

    assert state_bytes("adamw8bit") <= 0.30 * state_bytes("adamw")


def test_schedules_warm_up_and_decay():
    p = torch.nn.Parameter(torch.zeros(1))

    def lrs(schedule):
        opt = build_optimizer([p], OptimConfig(lr=1.0, schedule=schedule, warmup_steps=2))
        sched = build_lr_schedule(opt, OptimConfig(lr=1.0, schedule=schedule, warmup_steps=2), max_steps=6)
        out = []
        for _ in range(6):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("constant") == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    linear = lrs("linear")
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[3] > linear[4] > linear[5] > 0
    cosine = lrs("cosine")
    assert cosine[2] == 1.0 and cosine[3] > cosine[4] > cosine[5] > 0
