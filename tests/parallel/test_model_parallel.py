"""TP, PP and TP x PP reproduce a single-rank run of the tiny GPT (torchrun, gloo, CPU).

Every layout runs workers/fwd_bwd.py: two micro-batches through megatron's pipeline
schedule, with the loss path the trainer uses for exact sums (see that worker), and
reports per-token losses and the full-shape gradient of their sum.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_and_read

pytestmark = pytest.mark.slow

# Gradients of a sum over 128 tokens reach ~15; TP changes fp32 reduction order, which
# moves them by ~1e-6 of their scale. Compare within 1e-5 of each tensor's scale.
RELATIVE_TOLERANCE = 1e-5


def merged(results: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Union over pipeline stages of the full tensors written by TP rank 0."""
    tensors = {}
    for result in results:
        tensors.update({k: torch.tensor(v) for k, v in result.get(key, {}).items()})
    return tensors


def token_losses(results: list[dict]) -> torch.Tensor:
    (losses,) = [r["token_losses"] for r in results if "token_losses" in r]
    return torch.tensor(losses)


def assert_tensors_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        atol = RELATIVE_TOLERANCE * max(1.0, want.abs().max().item())
        torch.testing.assert_close(actual[name], want, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return run_and_read("fwd_bwd.py", 1, tmp_path_factory.mktemp("tp1pp1"))


def check_layout(results: list[dict], reference: list[dict]) -> None:
    expected_losses = token_losses(reference)
    actual_losses = token_losses(results)
    assert actual_losses.shape == expected_losses.shape == (2, 2, 32)
    torch.testing.assert_close(actual_losses, expected_losses, rtol=0, atol=1e-5)
    assert_tensors_close(merged(results, "grads"), merged(reference, "grads"))


def test_schedule_and_ddp_give_plain_autograd_gradient(reference):
    # The reference itself: megatron's schedule + DDP + finalize_grads_as_sum must
    # apply exactly the gradient plain autograd gives for the summed token losses.
    assert_tensors_close(merged(reference, "grads"), merged(reference, "plain_grads"))


def test_tp2_matches_tp1(reference, tmp_path):
    check_layout(run_and_read("fwd_bwd.py", 2, tmp_path, ["--tp", "2"]), reference)


def test_pp2_matches_pp1(reference, tmp_path):
    check_layout(run_and_read("fwd_bwd.py", 2, tmp_path, ["--pp", "2"]), reference)


def test_tp2_pp2_matches_single_rank(reference, tmp_path):
    results = run_and_read("fwd_bwd.py", 4, tmp_path, ["--tp", "2", "--pp", "2"], timeout=180)
    check_layout(results, reference)
