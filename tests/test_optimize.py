"""build_optimizer: fused AdamW where it applies (same updates as the foreach one), and the
warmup + cosine / constant schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grailcore.config import Config, OptimConfig
from grailcore.optimize import build_optimizer


def _cfg(**optim) -> Config:
    return Config(optim=OptimConfig(**{"lr": 1e-2, "weight_decay": 0.1, **optim}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def test_cpu_float_parameters_get_the_fused_optimizer_with_the_same_updates():
    fused_model, reference = _model(), _model()
    optimizer, _ = build_optimizer(fused_model, _cfg(), total_updates=10)
    assert optimizer.defaults["fused"] is True
    foreach = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, opt in ((fused_model, optimizer), (reference, foreach)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(fused_model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # it did train


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_then_schedule(schedule):
    optimizer, scheduler = build_optimizer(_model(), _cfg(warmup_steps=2, schedule=schedule), total_updates=6)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    decay = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)] if schedule == "cosine" else [1.0] * 4
    assert lrs == pytest.approx([1e-2 * f for f in [0.5, 1.0] + decay])
