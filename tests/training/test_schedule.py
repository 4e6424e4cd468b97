"""LR schedule (megatron's OptimizerParamScheduler): warmup + cosine/linear decay against
hand-computed values, with the trainer's convention that update k uses lr(k)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longalign.config.training import OptimConfig
from megatron_longalign.training.schedule import build_scheduler, current_lr


def lrs_of_updates(optim: OptimConfig, total_steps: int) -> list[float]:
    """The lr of updates 1..total_steps, stepping as the trainer does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = build_scheduler(optimizer, optim, total_steps)
    lrs = []
    for _ in range(total_steps):
        scheduler.step(1)
        lrs.append(current_lr(optimizer))
    return lrs


def test_warmup_then_cosine_by_hand():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=3, lr_decay_style="cosine")
    # warmup: 1e-3 * k / 3; then r = (k - 3) / 7, 1e-4 + 9e-4 * (1 + cos(pi r)) / 2
    expected = [
        1e-3 / 3,
        2e-3 / 3,
        1e-3,
        1e-4 + 9e-4 * (1 + math.cos(math.pi * 1 / 7)) / 2,
        1e-4 + 9e-4 * (1 + math.cos(math.pi * 2 / 7)) / 2,
        1e-4 + 9e-4 * (1 + math.cos(math.pi * 3 / 7)) / 2,
        1e-4 + 9e-4 * (1 + math.cos(math.pi * 4 / 7)) / 2,
        1e-4 + 9e-4 * (1 + math.cos(math.pi * 5 / 7)) / 2,
        1e-4 + 9e-4 * (1 + math.cos(math.pi * 6 / 7)) / 2,
        1e-4,  # the last update of the run uses exactly min_lr
    ]
    assert lrs_of_updates(optim, 10) == pytest.approx(expected, rel=1e-12)
    # Spot values: the middle of the decay is the midpoint of lr and min_lr.
    optim_even = OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_style="cosine")
    assert lrs_of_updates(optim_even, 10)[5] == pytest.approx(5.5e-4)  # k = 6, r = 1/2


def test_linear_decay_and_warmup_init():
    optim = OptimConfig(
        lr=2e-3, min_lr=0.0, lr_warmup_init=1e-3, lr_warmup_steps=2, lr_decay_style="linear"
    )
    # warmup from 1e-3: 1.5e-3, 2e-3; then 2e-3 * (1 - (k - 2) / 4) for k = 3..6
    expected = [1.5e-3, 2e-3, 1.5e-3, 1e-3, 0.5e-3, 0.0]
    assert lrs_of_updates(optim, 6) == pytest.approx(expected, abs=1e-15)


def test_constant_and_no_warmup():
    optim = OptimConfig(lr=5e-4, min_lr=0.0, lr_warmup_steps=0, lr_decay_style="constant")
    assert lrs_of_updates(optim, 4) == pytest.approx([5e-4] * 4)


def test_explicit_decay_steps_then_min_lr():
    optim = OptimConfig(
        lr=1e-3, min_lr=1e-5, lr_warmup_steps=0, lr_decay_steps=4, lr_decay_style="linear"
    )
    lrs = lrs_of_updates(optim, 6)
    assert lrs[:4] == pytest.approx([1e-5 + 0.99e-3 * (1 - k / 4) for k in range(1, 5)])
    assert lrs[4:] == pytest.approx([1e-5, 1e-5])


def test_warmup_must_end_before_decay():
    optim = OptimConfig(lr=1e-3, lr_warmup_steps=10)
    with pytest.raises(ValueError, match="optim.lr_warmup_steps"):
        lrs_of_updates(optim, 10)
