"""The chunked fused linear cross entropy (model/fused_loss.py) in one process: against
torch's cross entropy on materialised logits in fp64 (every chunk size, padded columns),
and through the whole model against `model.loss_impl=standard`. The parallel layouts are
in tests/parallel/test_fused_loss.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron_longalign.model import fused_loss
from megatron_longalign.model.config import model_problems
from megatron_longalign.model.fused_loss import auto_chunk_tokens, chunked_linear_cross_entropy
from megatron_longalign.model.gpt import packed_seq_params_from
from tests.model.conftest import build, pack, tiny_config


def _reference(hidden, weight, labels, valid):
    """Materialised logits over the real columns, torch's cross entropy."""
    return F.cross_entropy(hidden @ weight[:valid].t(), labels, reduction="none")


def _hint(mode: str, upstream: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """The loss weights given to the forward: none (recompute in backward), exactly the
    upstream gradient, a third of it (the schedule scaled the loss by 3), or unrelated
    weights (another loss on the NLL: the forward's gradients must be discarded)."""
    if mode == "none":
        return None
    if mode == "exact":
        return upstream.clone()
    if mode == "scaled":
        return upstream / 3
    return torch.rand(upstream.shape, dtype=upstream.dtype, generator=generator)


@pytest.mark.parametrize("hint", ["none", "exact", "scaled", "unrelated"])
@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("valid", [50, 43])
def test_equals_cross_entropy_on_materialised_logits(chunk, valid, hint):
    """fp64: exact to rounding. 37 tokens: chunks of 5 leave a remainder; 1000 is one
    chunk. valid 43 of 50 columns: 7 padded columns never enter the softmax and get a zero
    gradient (a TP rank whose whole shard is padding: tests/parallel/test_fused_loss.py).
    With every kind of gradient hint (gradients made in forward, or recomputed)."""
    generator = torch.Generator().manual_seed(chunk * 100 + valid)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, valid, (37,), generator=generator)
    upstream = torch.rand(37, dtype=torch.float64, generator=generator)
    upstream[::4] = 0  # non-target tokens
    grad_hint = _hint(hint, upstream, generator)
    fused_loss._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nll = chunked_linear_cross_entropy(
            hidden, weight, labels, valid_columns=valid, chunk_tokens=chunk, grad_hint=grad_hint
        )
        (nll * upstream).sum().backward()
    recomputed = [w for w in caught if "recomputed" in str(w.message)]
    assert len(recomputed) == (hint == "unrelated")
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    expected = _reference(ref_hidden, ref_weight, labels, valid)
    (expected * upstream).sum().backward()
    exact = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(nll, expected, **exact)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **exact)
    torch.testing.assert_close(weight.grad, ref_weight.grad, **exact)
    assert weight.grad[valid:].abs().sum() == 0  # padded columns


def test_gradients_in_forward_skip_the_recompute():
    """With the hint, backward makes no matmul: the output-layer matmuls are three per
    chunk (logits, hidden-state and weight gradients) instead of four."""
    generator = torch.Generator().manual_seed(9)
    hidden = torch.randn(40, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 30, (40,), generator=generator)
    upstream = torch.rand(40, dtype=torch.float64, generator=generator)
    counts = {}
    for hint in (None, upstream):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            nll = chunked_linear_cross_entropy(
                hidden, weight, labels, chunk_tokens=10, grad_hint=hint
            )
            (nll * upstream).sum().backward()
        counts[hint is None] = sum(
            e.count
            for e in prof.key_averages()
            if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")
        )
    assert counts == {True: 4 * 4, False: 3 * 4}


def test_no_gradients_are_made_without_grad():
    """Forward-only (validation, scoring): the hint is ignored, no gradient is computed."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(12, 8, generator=generator, requires_grad=True)
    weight = torch.randn(20, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 20, (12,), generator=generator)
    with torch.no_grad():
        nll = chunked_linear_cross_entropy(hidden, weight, labels, grad_hint=torch.ones(12))
    torch.testing.assert_close(nll, _reference(hidden, weight, labels, 20).detach())
    assert nll.grad_fn is None


def test_lse_is_accumulated_in_fp32_for_bf16_logits():
    """bf16 hidden and weight: the per-token NLL is fp32 and matches the fp32 cross
    entropy of the same bf16 logits far better than a bf16 log-sum-exp would."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 32, generator=generator).bfloat16()
    weight = torch.randn(300, 32, generator=generator).bfloat16()
    labels = torch.randint(0, 300, (64,), generator=generator)
    nll = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    assert nll.dtype == torch.float32
    logits = (hidden @ weight.t()).float()  # the bf16 matmul, then fp32
    expected = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-4)
    bf16_lse = torch.logsumexp(hidden @ weight.t(), dim=-1).float()  # no fp32 accumulation
    bf16_error = (bf16_lse - logits.gather(1, labels[:, None])[:, 0] - expected).abs().max()
    assert (nll - expected).abs().max() < bf16_error


def test_auto_chunk_tokens_hand_values():
    # 256 MiB of fp32 logits: 2^28 / (4 V) tokens, rounded down to a multiple of 256.
    assert auto_chunk_tokens(32768) == 2048
    assert auto_chunk_tokens(128256) == 512  # 523.2 -> 512
    assert auto_chunk_tokens(64128) == 1024  # Llama-3 at TP 2: 1046.5 -> 1024
    assert auto_chunk_tokens(10**7) == 256  # never below one multiple
    # A GPU's floor (GPU_MIN_CHUNK_TOKENS): raises small chunks, leaves larger ones.
    assert auto_chunk_tokens(128256, min_tokens=2048) == 2048
    assert auto_chunk_tokens(16128, min_tokens=2048) == 4096  # Llama-3 at TP 8: 4161


def test_bad_arguments_are_named():
    hidden, weight = torch.zeros(4, 8), torch.zeros(10, 8)
    with pytest.raises(ValueError, match="valid_columns=11"):
        chunked_linear_cross_entropy(hidden, weight, torch.zeros(4), valid_columns=11)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_linear_cross_entropy(hidden, weight, torch.zeros(4), chunk_tokens=0)
    with pytest.raises(ValueError, match=r"weight must be \[V_local, 8\]"):
        chunked_linear_cross_entropy(hidden, torch.zeros(10, 4), torch.zeros(4))


def test_config_rules_name_the_fields():
    problems = model_problems(tiny_config(loss_impl="fused", loss_chunk_tokens=0), prefix="model.")
    assert any("model.loss_impl='fused'" in p for p in problems)
    assert any("model.loss_chunk_tokens must be >= 1" in p for p in problems)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        # 300 of a padded 384-column vocabulary, tied embeddings, chunks of 5 over 12 tokens
        {"vocab_size": 300, "make_vocab_size_divisible_by": 128, "tie_word_embeddings": True},
    ],
    ids=["plain", "padded-tied"],
)
def test_the_model_gives_the_same_loss_and_gradients_with_either_impl(changes):
    """The whole model, one process: per-token NLL and every parameter's gradient (the
    output weight or tied embedding, and everything the hidden-state gradient reaches)."""
    config = tiny_config(loss_chunk_tokens=5, **changes)
    model = build(config)
    batch = pack([7, 5], vocab=config.vocab_size)
    kwargs = dict(
        position_ids=batch["position_ids"],
        packed_seq_params=packed_seq_params_from(batch["cu_seqlens"], 7),
        labels=batch["labels"],
    )
    upstream = torch.rand(1, 12, generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("standard", "chunked", "chunked-hinted"):
        model.loss_impl = impl.split("-")[0]
        model.zero_grad(set_to_none=True)
        hint = {"loss_mask": upstream} if impl == "chunked-hinted" else {}
        nll = model(batch["tokens"], **kwargs, **hint)
        (nll * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (nll.detach(), grads)
    standard, standard_grads = results["standard"]
    for impl in ("chunked", "chunked-hinted"):
        chunked, chunked_grads = results[impl]
        assert chunked.shape == standard.shape == (1, 12)
        torch.testing.assert_close(chunked, standard, rtol=1e-5, atol=1e-5)
        assert chunked_grads.keys() == standard_grads.keys()
        for name, grad in standard_grads.items():
            torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_logits_stay_available_without_labels():
    """No labels: the model returns megatron's logits [1, T, V] whatever loss_impl is."""
    model = build(tiny_config())
    assert model.loss_impl == "chunked"  # the schema's default reaches the model
    batch = pack([6], vocab=256)
    logits = model(
        batch["tokens"],
        position_ids=batch["position_ids"],
        packed_seq_params=packed_seq_params_from(batch["cu_seqlens"], 6),
    )
    assert logits.shape == (1, 6, 256)


@pytest.mark.parametrize("hinted", [False, True])
def test_bf16_gradients_accumulate_over_chunks_in_fp32(hinted):
    """bf16 inputs, 8 chunks, and a weight gradient summed over them in vocabulary blocks
    (300 rows in blocks of 100): both gradients match the fp32 computation on the same
    bf16 values to bf16 precision (a per-chunk bf16 sum would drift further)."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(128, 32, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(300, 32, generator=generator).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (128,), generator=generator)
    upstream = torch.rand(128, generator=generator)
    hint = upstream if hinted else None
    nll = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=16, grad_hint=hint)
    (nll * upstream).sum().backward()
    ref_hidden = hidden.detach().float().requires_grad_()
    ref_weight = weight.detach().float().requires_grad_()
    expected = _reference(ref_hidden, ref_weight, labels, 300)
    (expected * upstream).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    for got, want in ((hidden.grad, ref_hidden.grad), (weight.grad, ref_weight.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2 * scale)
