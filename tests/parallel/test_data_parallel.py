"""DP=2 with megatron DDP and the distributed optimizer matches DP=1 over the same
global batch, for three Adam steps (workers/train_steps.py).

Two loss paths (see the worker's docstring for the exact scaling):
- mean: megatron's default 2-tuple averaging; both runs use micro-batch size 1, so the
  mean over micro-batches and DP ranks equals the DP=1 mean over its 4 micro-batches.
- sum: weighted sum with calculate_per_token_loss=True and no num_tokens division; the
  DP=2 run also uses a different micro-batch size (2 instead of 1), since that path must
  not depend on either.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_and_read

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    return {
        1: run_and_read(
            "train_steps.py", 1, tmp_path_factory.mktemp("dp1"), ["--sum-micro-batch-size", "1"]
        ),
        2: run_and_read(
            "train_steps.py", 2, tmp_path_factory.mktemp("dp2"), ["--sum-micro-batch-size", "2"]
        ),
    }


# Losses and grad norms: fp32 reduction order differs between the runs (~3e-7
# relative); any scaling mistake (a factor of DP, micro-batches or tokens) is >= 2x.
STEP_RTOL = 1e-5
# Final weights after 3 Adam steps at lr 1e-2: Adam normalises each element's update,
# so an element whose gradient is fp32 rounding noise (|g| ~ 1e-10, its sign differing
# between the runs) moves by lr |g| / (|g| + eps) ~ 1e-4 per step, eps = 1e-8: 1.6e-4
# seen with the chunked loss, 1.8e-5 with the standard one (the noise differs, not the
# gradient: losses and grad norms above agree to 1e-5). A shard the distributed
# optimizer failed to update or gather would be off by ~lr = 1e-2 per step.
PARAM_ATOL = 1e-3


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_dp2_matches_dp1(runs, mode):
    single = runs[1][0][mode]
    assert sorted(r["dp_rank"] for r in runs[2]) == [0, 1]
    for rank_result in runs[2]:
        got = rank_result[mode]
        torch.testing.assert_close(got["losses"], single["losses"], rtol=STEP_RTOL, atol=0.0)
        torch.testing.assert_close(
            got["grad_norms"], single["grad_norms"], rtol=STEP_RTOL, atol=0.0
        )
    params_dp2 = runs[2][0][mode]["params"]
    assert params_dp2.keys() == single["params"].keys()
    for name, value in single["params"].items():
        diff = (torch.tensor(params_dp2[name]) - torch.tensor(value)).abs().max().item()
        assert diff <= PARAM_ATOL, (name, diff)


def test_sum_path_applies_the_gradient_of_the_weighted_sum(runs):
    # First step, before any update: the optimizer's grad norm on DP=1 and on DP=2
    # (distributed optimizer, other micro-batch size) is the norm of the plain-autograd
    # gradient of sum_t w_t * loss_t over the global batch. Averaging over DP ranks
    # would halve it; megatron's num_tokens division would divide it by the number of
    # target tokens (~80).
    for dp in (1, 2):
        for rank_result in runs[dp]:
            got = rank_result["sum"]
            assert got["grad_norms"][0] == pytest.approx(got["plain_grad_norm"], rel=STEP_RTOL)


def test_training_moves_the_loss(runs):
    # Guards the comparison above against a no-op optimizer.
    for mode in ("mean", "sum"):
        losses = runs[1][0][mode]["losses"]
        assert losses[2] < losses[0] - 0.1, (mode, losses)
