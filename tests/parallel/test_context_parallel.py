"""Context parallelism (CP) reproduces CP = 1 on packed micro-batches (torchrun, gloo, CPU).

Every layout runs workers/context_parallel.py: three packed micro-batches through
megatron's schedule with the trainer's loss path, in `token` and `sequence` modes. The
batches hold a document shorter than 2 * CP, odd lengths, a micro-batch whose single
target lands on CP rank 0 (rank 1 holds no target at all), and SkipAlign positions.
The CP = 1 run uses unpadded documents, so it also checks that CP's padding changes
nothing. Attention is `sdpa` with the K/V all-gather; `flash` (its chunk sequences, with
the CPU stand-in for flash-attn) and `flex` (forward) are compared with that CP = 1 sdpa
run; `te` is covered on GPUs (tests/model/test_te_context_parallel.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_and_read
from tests.parallel.test_model_parallel import assert_tensors_close, merged

pytestmark = pytest.mark.slow

MODES = ("token", "sequence")
LAYOUTS = {  # name: (nproc, args)
    "cp2": (2, ["--cp", "2"]),
    "tp2cp2": (4, ["--tp", "2", "--cp", "2"]),
    "pp2cp2": (4, ["--pp", "2", "--cp", "2"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return run_and_read("context_parallel.py", 1, tmp_path_factory.mktemp("cp1"), ["--cp", "1"])


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory) -> tuple[str, list[dict]]:
    nproc, args = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    return request.param, run_and_read("context_parallel.py", nproc, out, args)


def _last_stage_tp0(results: list[dict]) -> list[dict]:
    """One result per CP rank: the loss is computed on the last stage, TP ranks agree."""
    chosen = [r for r in results if r["last_stage"] and r["tp_rank"] == 0]
    return sorted(chosen, key=lambda r: r["cp_rank"])


def _mode(results: list[dict], mode: str) -> list[dict]:
    return [{**r[mode], **{k: r[k] for k in ("last_stage", "tp_rank")}} for r in results]


@pytest.mark.parametrize("mode", MODES)
def test_losses_and_gradients_equal_cp1(layout, reference, mode):
    name, results = layout
    ranks = _last_stage_tp0(results)
    assert len(ranks) == 2, f"{name}: expected 2 CP ranks on the last stage"
    (expected,) = [r[mode] for r in reference]
    # Micro-batch objective: the CP ranks' shares add up to the CP = 1 loss.
    per_rank = torch.tensor([r[mode]["losses"] for r in ranks], dtype=torch.float64)
    torch.testing.assert_close(
        per_rank.sum(0), torch.tensor(expected["losses"], dtype=torch.float64), rtol=0, atol=2e-6
    )
    # Per document (summed over CP inside the worker): weighted loss and nll sums.
    for rank in ranks:
        assert len(rank[mode]["documents"]) == len(expected["documents"]) == 3
        for actual_docs, expected_docs in zip(
            rank[mode]["documents"], expected["documents"], strict=True
        ):
            torch.testing.assert_close(
                torch.tensor(actual_docs), torch.tensor(expected_docs), rtol=1e-5, atol=1e-5
            )
    targets = torch.tensor([r[mode]["targets"] for r in ranks]).sum(0)
    assert targets.tolist() == expected["targets"]
    # Gradients of the whole objective, gathered to full shapes over TP and stages.
    assert_tensors_close(merged(_mode(results, mode), "grads"), merged([expected], "grads"))
    assert all(r[mode]["grads_finite"] for r in results)


@pytest.mark.parametrize("mode", MODES)
def test_a_cp_rank_without_targets_contributes_zero_not_nan(layout, mode):
    _, results = layout
    ranks = _last_stage_tp0(results)
    # Micro-batch 1 is the 2-token document: its only target is on CP rank 0.
    assert ranks[0][mode]["targets"][1] == 1.0
    assert ranks[1][mode]["targets"][1] == 0.0
    assert ranks[1][mode]["losses"][1] == 0.0 and ranks[1][mode]["nll_sums"][1] == 0.0


def test_data_exercises_cp_edge_cases(layout, reference):
    """Guards the claims in the module docstring about what the batches contain."""
    _, results = layout
    (expected,) = [r["token"] for r in reference]
    # SkipAlign moved positions far beyond every document's length (<= 48 tokens).
    assert min(expected["positions_max"]) > 100
    # Each CP rank holds half of the padded tokens, and padding happened (odd lengths).
    ranks = _last_stage_tp0(results)
    held = torch.tensor([r["token"]["tokens_held"] for r in ranks])
    assert (held[0] == held[1]).all()
    assert (held.sum(0) >= torch.tensor(expected["tokens_held"])).all()
    assert (held.sum(0) > torch.tensor(expected["tokens_held"])).any()


def _documents(results: list[dict], mode: str) -> torch.Tensor:
    """Per-document (weighted loss, nll sum) of every micro-batch, from CP rank 0 of the
    last stage (the worker already summed them over the CP group)."""
    rank = _last_stage_tp0(results)[0]
    return torch.tensor([d for mb in rank[mode]["documents"] for d in mb], dtype=torch.float64)


def test_flex_context_parallel_forward_equals_cp1(tmp_path_factory, reference):
    """The flex backend's CP path (block mask over global positions) through the whole
    model, forward only: torch has no flex_attention backward on CPU."""
    results = run_and_read(
        "context_parallel.py",
        2,
        tmp_path_factory.mktemp("flex_cp2"),
        ["--cp", "2", "--backend", "flex", "--forward-only"],
    )
    for mode in MODES:
        (expected,) = [r for r in reference]
        torch.testing.assert_close(
            _documents(results, mode), _documents([expected], mode), rtol=1e-5, atol=1e-5
        )


@pytest.fixture(scope="module")
def flash_cp2(tmp_path_factory) -> list[dict]:
    return run_and_read(
        "context_parallel.py",
        2,
        tmp_path_factory.mktemp("flash_cp2"),
        ["--cp", "2", "--backend", "flash"],
    )


@pytest.mark.parametrize("mode", MODES)
def test_flash_context_parallel_equals_cp1_sdpa(flash_cp2, reference, mode):
    """The flash backend's CP path (one varlen sequence per local chunk, bottom-right
    causal) through the whole model on CP 2, forward and backward, against the
    single-process sdpa run: per-document losses, micro-batch losses and gradients."""
    (expected,) = [r[mode] for r in reference]
    ranks = _last_stage_tp0(flash_cp2)
    per_rank = torch.tensor([r[mode]["losses"] for r in ranks], dtype=torch.float64)
    torch.testing.assert_close(
        per_rank.sum(0), torch.tensor(expected["losses"], dtype=torch.float64), rtol=0, atol=2e-6
    )
    torch.testing.assert_close(
        _documents(flash_cp2, mode), _documents(reference, mode), rtol=1e-5, atol=1e-5
    )
    assert all(r[mode]["grads_finite"] for r in flash_cp2)
    assert_tensors_close(merged(_mode(flash_cp2, mode), "grads"), merged([expected], "grads"))


def _te_skip_reason() -> str | None:
    from megatron_longalign.model.backends import unavailable_reason

    reason = unavailable_reason("te")
    if reason is not None:
        return reason
    if torch.cuda.device_count() < 2:
        return f"TE context parallelism needs >= 2 CUDA GPUs, found {torch.cuda.device_count()}"
    return None


@pytest.mark.skipif(_te_skip_reason() is not None, reason=str(_te_skip_reason()))
def test_transformer_engine_context_parallel_equals_cp1(tmp_path_factory):
    """TE's own CP attention (ring, cp_comm_type p2p) with cu_seqlens_q_padded, bf16 on
    NCCL: CP=2 against CP=1 of the same backend, within bf16 tolerance."""
    one = run_and_read(
        "context_parallel.py",
        1,
        tmp_path_factory.mktemp("te_cp1"),
        ["--cp", "1", "--backend", "te"],
    )
    two = run_and_read(
        "context_parallel.py",
        2,
        tmp_path_factory.mktemp("te_cp2"),
        ["--cp", "2", "--backend", "te"],
    )
    for mode in MODES:
        torch.testing.assert_close(
            _documents(two, mode), _documents(one, mode), rtol=2e-2, atol=2e-2
        )
        assert all(r[mode]["grads_finite"] for r in two)
        assert_tensors_close_bf16(
            merged(_mode(two, mode), "grads"), merged(_mode(one, mode), "grads")
        )


def assert_tensors_close_bf16(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        atol = 3e-2 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(actual[name], want, rtol=0, atol=atol, msg=name)
