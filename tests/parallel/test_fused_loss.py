"""The chunked fused linear cross entropy equals megatron's output layer + vocab-parallel
cross entropy (model.loss_impl=standard) on parallel layouts (torchrun, gloo, CPU):
per-token NLL and the gradients of the hidden states, the output weight and the tied
embedding; and through the whole model on the PP2 last stage and with CP2.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_and_read
from tests.parallel.test_model_parallel import assert_tensors_close, merged, token_losses

pytestmark = pytest.mark.slow

FP32 = {"rtol": 1e-5, "atol": 1e-5}


def _output_layer_results(tmp_path, nproc: int, args: list[str]) -> list[dict]:
    return run_and_read("fused_loss.py", nproc, tmp_path, ["--tp", str(nproc), *args])


def _assert_impls_equal(result: dict, impls=("chunked", "chunked_hinted")) -> None:
    for impl in impls:
        _assert_impl_equals_standard(result["standard"], result[impl])


def _assert_impl_equals_standard(standard: dict, chunked: dict) -> None:
    torch.testing.assert_close(torch.tensor(chunked["nll"]), torch.tensor(standard["nll"]), **FP32)
    torch.testing.assert_close(
        torch.tensor(chunked["hidden_grad"]), torch.tensor(standard["hidden_grad"]), **FP32
    )
    assert standard["weight_grads"].keys() == chunked["weight_grads"].keys()
    assert standard["weight_grads"]  # the output weight, or the tied embedding
    for name, grad in standard["weight_grads"].items():
        torch.testing.assert_close(
            torch.tensor(chunked["weight_grads"][name]), torch.tensor(grad), **FP32, msg=name
        )


@pytest.mark.parametrize(
    "nproc, args",
    [
        (1, ["--chunk", "7"]),  # 92 tokens: 13 full chunks and one of 1
        (1, ["--vocab", "500", "--tied", "--chunk", "64"]),  # padded vocabulary, tied
        (2, ["--chunk", "7"]),
        (2, ["--vocab", "500", "--tied", "--chunk", "64"]),  # rank 1's shard is part padding
        (2, ["--sp", "--chunk", "7"]),  # sequence parallelism: hidden gathered over TP
        (2, ["--sp", "--vocab", "450", "--tied", "--chunk", "1000"]),  # one chunk
        (2, ["--vocab", "60", "--chunk", "7"]),  # 128 padded columns: rank 1 holds no real one
    ],
    ids=[
        "tp1",
        "tp1-padded-tied",
        "tp2",
        "tp2-padded-tied",
        "tp2-sp",
        "tp2-sp-padded-tied",
        "tp2-rank-all-padding",
    ],
)
def test_chunked_equals_standard_on_the_output_layer(tmp_path, nproc, args):
    results = _output_layer_results(tmp_path, nproc, args)
    assert len(results) == nproc
    for result in results:
        _assert_impls_equal(result)


def test_a_chunked_loss_without_the_tp_all_reduce_fails_the_comparison(tmp_path):
    """Mutation check: the chunked LSE computed on each rank's shard alone (the TP
    all-reduces of max, sum of exp and target logit forgotten) must not pass, with the
    gradients made in backward or in forward."""
    (result, _) = _output_layer_results(tmp_path, 2, ["--chunk", "7", "--forget-tp-reduce"])
    for impl in ("chunked", "chunked_hinted"):  # both ways of making the gradients
        with pytest.raises(AssertionError):
            _assert_impls_equal(result, impls=(impl,))


def _flat(nested) -> torch.Tensor:
    """A ragged nest of lists (per micro-batch, per document) as one vector."""
    if isinstance(nested, list):
        parts = [_flat(x) for x in nested]
        return torch.cat(parts) if parts else torch.zeros(0)
    return torch.tensor([float(nested)])


def _model_runs(tmp_path, script: str, nproc: int, args: list[str]) -> dict[str, list[dict]]:
    return {
        impl: run_and_read(script, nproc, tmp_path / impl, [*args, "--loss-impl", impl])
        for impl in ("standard", "chunked")
    }


def test_chunked_equals_standard_on_the_pp2_last_stage(tmp_path):
    runs = _model_runs(tmp_path, "fwd_bwd.py", 2, ["--pp", "2"])
    torch.testing.assert_close(
        token_losses(runs["chunked"]), token_losses(runs["standard"]), rtol=0, atol=1e-5
    )
    # Every stage's gradients: the last stage's output layer, and what flows back.
    assert_tensors_close(merged(runs["chunked"], "grads"), merged(runs["standard"], "grads"))


def test_chunked_equals_standard_with_context_parallelism(tmp_path):
    runs = _model_runs(tmp_path, "context_parallel.py", 2, ["--cp", "2"])
    for standard, chunked in zip(runs["standard"], runs["chunked"], strict=True):
        for mode in ("token", "sequence"):
            want, got = standard[mode], chunked[mode]
            for key in ("documents", "losses", "nll_sums"):
                torch.testing.assert_close(_flat(got[key]), _flat(want[key]), **FP32, msg=key)
            assert got["targets"] == want["targets"]
            assert_tensors_close(
                {k: torch.tensor(v) for k, v in got.get("grads", {}).items()},
                {k: torch.tensor(v) for k, v in want.get("grads", {}).items()},
            )
