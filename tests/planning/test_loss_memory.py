"""The planner's output layer + loss term under model.loss_impl: `standard` (the whole
micro-batch's logits, unchanged) and `chunked` (model/fused_loss.py: one chunk of logits
at a time and the fp32 output-weight gradient accumulator), written out by hand here and
checked against the profiler's record of the real chunked loss on CPU."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_longalign.planning.memory import (
    CPU_FP32,
    GB,
    GPU_BF16,
    Layout,
    Workload,
    chunked_loss_bytes,
    estimate_memory,
    loss_chunk_tokens,
)
from tests.helpers.tiny_model import tiny_model_config
from tests.planning.test_memory import load

# hidden 64, vocabulary 2048 (a multiple of 128 x TP for TP 1 and 2: no padding).
TINY = tiny_model_config(vocab_size=2048, name="custom", attention_backend="auto")


def test_chunked_term_by_hand_bf16_tp1():
    model = dataclasses.replace(TINY, loss_impl="chunked", loss_chunk_tokens=1024)
    est = estimate_memory(model, Layout(), Workload(4096, 1), GPU_BF16)
    T, V, h, c = 4096, 2048, 64, 1024  # 4 chunks of 1024 tokens
    # Kept from forward to backward: LSE fp32 + labels int64 + ownership mask bool.
    saved = T * (4 + 8 + 1)
    # Forward, one chunk at a time: its bf16 matmul output and the fp32 copy.
    forward = c * (2 + 4) * V
    # Backward: the bf16 weight gradient, the bf16 hidden-state gradient and the fp32
    # weight-gradient accumulator all along; plus the larger of a chunk's logits (bf16
    # matmul + fp32) and the chunk's bf16 gradient with one block of the weight GEMM:
    # 2 c V / 3 h = 21845 rows > V, so one block of all V rows, in bf16 and fp32.
    kept = 2 * V * h + T * h * 2 + 4 * V * h
    block = c * 2 * V + V * h * (2 + 4)
    backward = kept + max(c * (2 + 4) * V, block)
    assert backward == 1_310_720 + 12_582_912
    assert forward == 12_582_912 < backward
    assert est.logits == saved + backward == 13_946_880
    assert est.loss_impl == "chunked" and est.loss_chunk_tokens == 1024


def test_chunked_term_by_hand_fp32_tp2_sp_cp2_uneven_chunks():
    model = dataclasses.replace(TINY, loss_impl="chunked", loss_chunk_tokens=1536)
    layout = Layout(tp=2, cp=2, sequence_parallel=True)
    est = estimate_memory(model, layout, Workload(8192, 1), CPU_FP32)
    # T = 8192 / CP 2 = 4096 tokens (all of the TP group's: SP gathers them), V = 2048 /
    # TP 2 = 1024 per rank; chunks of 1536, 1536 and 1024 tokens. fp32: no separate
    # matmul output (`.to(fp32)` is the same tensor), and the weight gradient accumulates
    # in place (no fp32 accumulator next to it).
    T, V, h, c = 4096, 1024, 64, 1536
    saved = T * (4 + 8 + 1) + T * h * 4  # + the SP-gathered hidden states
    forward = c * 4 * V
    backward = 4 * V * h + T * h * 4 + c * 4 * V
    assert est.logits == saved + max(forward, backward) == 1_101_824 + 7_602_176


def test_standard_term_unchanged():
    model = load("llama3_8b", loss_impl="standard")
    # bf16 logits + their fp32 copy, s/CP x V_pad/TP: 6 bytes an element.
    for layout, vocab in [(Layout(), 128_256), (Layout(tp=8, sequence_parallel=True), 129_024)]:
        est = estimate_memory(model, layout, Workload(8192, 1))
        assert est.logits == pytest.approx(8192 * vocab / layout.tp * 6)
        assert est.loss_impl == "standard" and est.loss_chunk_tokens is None
    # fp32: one buffer, 4 bytes an element.
    cpu = estimate_memory(
        dataclasses.replace(TINY, loss_impl="standard"), Layout(), Workload(4096, 1), CPU_FP32
    )
    assert cpu.logits == 4096 * 2048 * 4
    # The 64k recipe's previous layout, as docs/PLANNING.md and the recipes quoted it
    # before the chunked loss: TP2+SP x CP2 x DP2, full recompute, 57.3 GB, 12.6 of logits.
    layout = Layout(tp=2, cp=2, dp=2, sequence_parallel=True, recompute="full")
    est = estimate_memory(model, layout, Workload(65536, 16))
    assert round(est.total / GB, 1) == 57.3 and round(est.logits / GB, 1) == 12.6


def test_loss_chunk_tokens_overrides_auto():
    model = load("llama3_8b")
    assert model.loss_impl == "chunked" and model.loss_chunk_tokens is None
    # Auto: the most tokens (a multiple of 256) whose fp32 logits on one TP rank fit
    # 256 MiB: 2^28 / (4 x 128256) = 523 -> 512 at TP 1; 2^28 / (4 x 64128) -> 1024;
    # 2^28 / (4 x 16128) = 4161 -> 4096 at TP 8. On a GPU at least 2048.
    assert loss_chunk_tokens(model, Layout(), CPU_FP32) == 512
    assert loss_chunk_tokens(model, Layout(tp=2, sequence_parallel=True), CPU_FP32) == 1024
    assert loss_chunk_tokens(model, Layout()) == 2048
    assert loss_chunk_tokens(model, Layout(tp=2, sequence_parallel=True)) == 2048
    assert loss_chunk_tokens(model, Layout(tp=8, sequence_parallel=True)) == 4096
    fixed = dataclasses.replace(model, loss_chunk_tokens=4096)
    for tp in (1, 2, 8):
        assert loss_chunk_tokens(fixed, Layout(tp=tp, sequence_parallel=tp > 1)) == 4096
    work = Workload(65536, 1)
    auto, override = (estimate_memory(m, Layout(), work) for m in (model, fixed))
    assert (auto.loss_chunk_tokens, override.loss_chunk_tokens) == (2048, 4096)
    # Bigger chunks: more logits held. T = 65536, V = 128256 at TP 1, h = 4096, chunks
    # of c = 4096: the backward (bf16 weight gradient, bf16 hidden-state gradient, fp32
    # accumulator, then a chunk's 6 c V, or its bf16 gradient 2 c V plus a weight-GEMM
    # block of 2 c V / 3 h rows in bf16 and fp32) is above the forward's 6 c V.
    T, V, h, c = 65536, 128_256, 4096, 4096
    rows = 2 * c * V // (3 * h)
    backward = 2 * V * h + T * h * 2 + 4 * V * h + max(6 * c * V, 2 * c * V + rows * h * 6)
    assert backward > 6 * c * V
    assert override.logits == T * 13 + backward
    assert override.logits > auto.logits


@pytest.mark.parametrize(
    "layout",
    [
        Layout(),
        Layout(tp=2, cp=2, dp=2, sequence_parallel=True, recompute="full"),
        Layout(tp=8, sequence_parallel=True),
        Layout(tp=2, cp=4, sequence_parallel=True, recompute="full"),
    ],
    ids=lambda layout: f"{layout.label()}-{layout.recompute}",
)
def test_chunked_below_standard_for_llama3_8b_at_64k(layout):
    chunked, standard = load("llama3_8b"), load("llama3_8b", loss_impl="standard")
    work = Workload(65536, 16)
    c = estimate_memory(chunked, layout, work)
    s = estimate_memory(standard, layout, work)
    assert c.logits < s.logits
    assert c.total < s.total
    # Only the loss term (and the working set it no longer hides) differs.
    assert (c.weights, c.grads, c.optimizer, c.overhead) == (
        s.weights,
        s.grads,
        s.optimizer,
        s.overhead,
    )
    assert c.total - c.logits >= s.total - s.logits


# ---- against the real chunked loss ----------------------------------------------------


def _profiled_peak_bytes(fn) -> int:
    """Peak of the bytes allocated while `fn` runs, from the profiler's allocation
    records (torch keeps no CPU allocator statistics)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        pytest.skip("this torch's profiler keeps no allocation records")
    events = sorted(
        (e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    ("dtype", "profile", "tokens", "hidden", "chunk"),
    [
        ("float32", CPU_FP32, 2048, 256, 512),
        ("bfloat16", GPU_BF16, 2048, 256, 512),
        ("bfloat16", GPU_BF16, 1500, 256, 512),  # chunks of 512, 512, 476
        ("bfloat16", GPU_BF16, 1024, 1024, 256),  # the kept [V, h] gradients dominate
    ],
)
@pytest.mark.parametrize("hinted", [False, True], ids=["recompute", "grads-in-forward"])
def test_chunked_term_matches_the_profiled_fused_loss(
    dtype, profile, tokens, hidden, chunk, hinted
):
    """model/fused_loss.py forward + backward on one rank: the profiler's peak equals the
    planner's term within 2% (the difference: per-token temporaries it leaves out), with
    the gradients recomputed in backward and made in forward (the trainer's path: the
    same buffers, one step earlier). A change to fused_loss.py's buffers that fails this
    needs chunked_loss_bytes updated."""
    import torch

    from megatron_longalign.model.fused_loss import chunked_linear_cross_entropy

    vocab = 4096
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    states = (torch.randn(tokens, hidden) * 0.1).to(dt).requires_grad_()
    weight = (torch.randn(vocab, hidden) * 0.02).to(dt).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))

    hint = torch.ones(tokens) if hinted else None

    def step():
        nll = chunked_linear_cross_entropy(
            states, weight, labels, chunk_tokens=chunk, grad_hint=hint
        )
        nll.sum().backward()

    measured = _profiled_peak_bytes(step)
    model = dataclasses.replace(TINY, hidden_size=hidden, vocab_size=vocab, loss_chunk_tokens=chunk)
    estimated = chunked_loss_bytes(model, Layout(), Workload(tokens, 1), profile)
    assert abs(estimated - measured) / measured < 0.02, (estimated, measured)
