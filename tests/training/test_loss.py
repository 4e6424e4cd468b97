"""loss_func: sum of weight x token nll, and megatron's 3-tuple, on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longalign.training.loss import (
    LOSS,
    NLL_SUM,
    NUM_TARGETS,
    loss_func,
)


def test_hand_computed_example():
    # Two documents: tokens 0-2 (targets at 1, 2) and 3-4 (target at 4, weight 0.5), as
    # in sequence mode with M = 2: doc 1 has N = 2 -> 1/4 each, doc 2 has N = 1 -> 1/2.
    weights = torch.tensor([0.0, 0.25, 0.25, 0.0, 0.5])
    nll = torch.tensor([[9.0, 2.0, 4.0, 7.0, 3.0]], requires_grad=True)
    loss, num_targets, report = loss_func(weights, nll)
    # 0.25 * 2 + 0.25 * 4 + 0.5 * 3 = 3.0: the mean of the per-sequence means (3 and 3).
    assert loss.item() == pytest.approx(3.0)
    assert num_targets.dtype == torch.int and num_targets.item() == 3
    assert report[LOSS].item() == pytest.approx(3.0)
    assert report[NLL_SUM].item() == pytest.approx(9.0)  # 2 + 4 + 3, unweighted
    assert report[NUM_TARGETS].item() == 3
    assert report.keys() == {LOSS, NLL_SUM, NUM_TARGETS}  # what the trainer sums
    loss.backward()
    # d loss / d nll_t = w_t: nothing else scales the gradient.
    torch.testing.assert_close(nll.grad, weights[None])


def test_token_mean_differs_from_weighted_loss():
    weights = torch.tensor([0.1, 0.1, 0.8, 0.0])
    nll = torch.tensor([1.0, 2.0, 3.0, 100.0])
    loss, num_targets, report = loss_func(weights, nll)
    assert loss.item() == pytest.approx(0.1 + 0.2 + 2.4)
    assert num_targets.item() == 3
    # The token mean, as the trainer computes it from the job-wide sums.
    assert (report[NLL_SUM] / report[NUM_TARGETS]).item() == pytest.approx(2.0)


def test_report_does_not_alias_the_loss():
    # megatron divides the returned loss in place in its non per-token modes; the report
    # must keep the value it had.
    loss, _, report = loss_func(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 4.0]))
    loss.detach().div_(7.0)
    assert report[LOSS].item() == pytest.approx(3.0)


def test_no_targets_is_zero_not_nan():
    loss, num_targets, report = loss_func(torch.zeros(4), torch.rand(4))
    assert loss.item() == 0.0 and num_targets.item() == 0
    assert report[NLL_SUM].item() == 0.0 and report[NUM_TARGETS].item() == 0


def test_non_finite_nll_shows_in_the_loss():
    # The trainer detects bad steps from the loss: an inf must not be hidden, even on a
    # zero-weight position (0 * inf = nan), while the unweighted report stays finite.
    loss, _, report = loss_func(torch.tensor([0.0, 1.0]), torch.tensor([math.inf, 1.0]))
    assert not math.isfinite(loss.item())
    assert report[NLL_SUM].item() == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 loss weights for 4 token losses"):
        loss_func(torch.zeros(3), torch.zeros(1, 4))
