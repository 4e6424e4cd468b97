"""The `flash` backend's plumbing on CPU, with flash-attn replaced by the stand-in
(tests/helpers/flash_standin.py) behind the real import seam: the core-attention module
(THD, padded layout, bshd), its context-parallel chunk sequences, and the whole model
against `sdpa` (losses and gradients). The real kernel is covered on GPUs
(tests/model/test_attention.py::test_flash_equals_sdpa_on_gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longalign.model.attention import (
    FlashCoreAttention,
    flash_context_parallel_sequences,
    layout_cu_seqlens,
    packed_seq_params_from,
    sdpa_varlen,
)
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.parallel.context_parallel import (
    ContextParallelView,
    context_parallel_token_index,
)
from tests.helpers.fake_group import FakeGroup
from tests.model.conftest import build, doc_slices, pack, tiny_config
from tests.model.test_attention import LENGTHS, _cu, _qkv, dense_reference
from tests.model.test_gpt import _skipalign_positions

pytestmark = pytest.mark.usefixtures("flash_standin_installed")

# Padded document layout, multiples of 2 * CP = 8 (CP 4) and 4 (CP 2).
LAYOUT = [0, 8, 16, 48, 56, 120]


def _module(cp_size: int = 1, cp_rank: int = 0, **config_changes) -> FlashCoreAttention:
    from megatron.core.transformer.enums import AttnMaskType

    config = to_transformer_config(
        tiny_config(**config_changes), use_cpu_initialization=True, context_parallel_size=cp_size
    )
    group = FakeGroup(cp_size, cp_rank)
    module = FlashCoreAttention(
        config=config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        pg_collection=type("Groups", (), {"cp": group})(),
    )
    return module


# ---------------------------------------------------------------------------------------
# the core-attention module
# ---------------------------------------------------------------------------------------


def test_thd_equals_the_dense_reference():
    module = _module()
    cu = _cu(LENGTHS)
    q, k, v = _qkv(int(cu[-1]), 4, 2, dim=16)
    out = module(q, k, v, None, packed_seq_params=packed_seq_params_from(cu, max(LENGTHS)))
    expected = dense_reference(q, k, v, cu, module.softmax_scale).reshape(q.size(0), -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padded_documents_are_attended_as_laid_out():
    """cu_seqlens count real tokens, cu_seqlens_padded give the layout (and max_seqlen is
    of the padded documents, as the data pipeline sets it): flash must use the layout."""
    real, padded = [0, 3, 8], [0, 4, 12]
    q, k, v = _qkv(12, 4, 2, dim=16, seed=3)
    module = _module()
    packed = packed_seq_params_from(_cu_list(real), 8, cu_seqlens_padded=_cu_list(padded))
    out = module(q, k, v, None, packed_seq_params=packed).reshape(12, 4, 16)
    keep = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])  # the real tokens
    expected = dense_reference(q[keep], k[keep], v[keep], _cu_list(real), module.softmax_scale)
    torch.testing.assert_close(out[keep], expected, atol=1e-5, rtol=1e-5)


def test_bshd_is_causal_per_row():
    module = _module()
    seq, batch = 6, 3
    q, k, v = (x.reshape(seq, batch, *x.shape[1:]) for x in _qkv(seq * batch, 4, 2, dim=16))
    out = module(q, k, v, None)
    assert out.shape == (seq, batch, 4 * 16)
    for b in range(batch):
        expected = dense_reference(q[:, b], k[:, b], v[:, b], _cu([seq]), module.softmax_scale)
        torch.testing.assert_close(out[:, b], expected.reshape(seq, -1), atol=1e-5, rtol=1e-5)


def _cu_list(bounds: list[int]) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


# ---------------------------------------------------------------------------------------
# context parallelism: one varlen sequence per local chunk
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rank,cu_k,key_ranges,max_k",
    [
        # doc 0 (8 tokens, chunks of 2): chunks 0 and 3; doc 1 (16, chunks of 4): 0 and 3.
        (0, [0, 2, 10, 14, 30], [(0, 2), (0, 8), (8, 12), (8, 24)], 16),
        # chunks 1 and 2 of each document.
        (1, [0, 4, 10, 18, 30], [(0, 4), (0, 6), (8, 16), (8, 20)], 12),
    ],
)
def test_chunk_sequences_by_hand(rank, cu_k, key_ranges, max_k):
    """Layout [0, 8, 24] at CP 2: every local chunk is a sequence whose keys run from its
    document's start to the chunk's end (1.25 x the tokens in all, on either rank)."""
    seqs = flash_context_parallel_sequences([0, 8, 24], 2, rank, torch.device("cpu"))
    assert seqs.cu_seqlens_q.tolist() == [0, 2, 4, 8, 12]
    assert seqs.cu_seqlens_k.tolist() == cu_k
    assert seqs.cu_seqlens_q.dtype == seqs.cu_seqlens_k.dtype == torch.int32
    expected_keys = [i for start, end in key_ranges for i in range(start, end)]
    assert seqs.key_index.tolist() == expected_keys
    assert (seqs.max_seqlen_q, seqs.max_seqlen_k) == (4, max_k)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_context_parallel_rows_and_gradients_equal_whole_sequence_attention(cp, heads, kv_heads):
    """Each rank's local queries against all keys (what the all-gather delivers) give the
    rows of whole-sequence attention at their global positions, and the gradients summed
    over ranks (what the all-gather's backward does for K/V) equal whole-sequence ones."""
    cu = _cu_list(LAYOUT)
    q, k, v = (x.requires_grad_() for x in _qkv(LAYOUT[-1], heads, kv_heads, dim=16, seed=cp))
    scale = _module().softmax_scale
    expected = sdpa_varlen(q, k, v, LAYOUT, scale)
    cotangent = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), (q, k, v))
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    for rank in range(cp):
        module = _module(cp, rank, num_attention_heads=heads, num_query_groups=kv_heads)
        packed = packed_seq_params_from(cu, max(np.diff(LAYOUT)))
        view = ContextParallelView.build(layout_cu_seqlens(packed), cp, rank, q.device)
        index = torch.as_tensor(context_parallel_token_index(np.array(LAYOUT), cp, rank))
        out = module._attend_gathered(q[index], k, v, view, packed)
        torch.testing.assert_close(out, expected[index], atol=1e-5, rtol=1e-5)
        for total, grad in zip(
            grads, torch.autograd.grad((out * cotangent[index]).sum(), (q, k, v)), strict=True
        ):
            total += grad
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flash_accepts_context_parallelism():
    module = _module(cp_size=2, cp_rank=1)
    assert module.supports_context_parallel and module.cp_size == 2


# ---------------------------------------------------------------------------------------
# the whole model: flash == sdpa
# ---------------------------------------------------------------------------------------

DOCS = [5, 1, 12, 7, 3, 9]  # several documents of unequal lengths in one packed row


def _losses_and_grads(model, batch, positions, packed):
    weights = torch.rand(batch["tokens"].shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    loss = model(batch["tokens"], positions, labels=batch["labels"], packed_seq_params=packed)
    (weights * loss).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_flash_equals_sdpa(config, batch, positions, packed) -> None:
    sdpa = build(config, backend="sdpa")
    flash = build(config, backend="flash")
    assert flash.attention_backend == "flash"
    flash.load_state_dict(sdpa.state_dict())
    expected_loss, expected_grads = _losses_and_grads(sdpa, batch, positions, packed)
    loss, grads = _losses_and_grads(flash, batch, positions, packed)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, want in expected_grads.items():
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(grads[name], want, atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA 4:2, MQA
def test_model_with_packed_documents_equals_sdpa(kv_heads):
    batch = pack(DOCS, seed=5)
    packed = packed_seq_params_from(batch["cu_seqlens"], max(DOCS))
    _assert_flash_equals_sdpa(
        tiny_config(num_query_groups=kv_heads), batch, batch["position_ids"], packed
    )


def test_model_with_skipalign_positions_equals_sdpa():
    batch = pack(DOCS, seed=6)
    packed = packed_seq_params_from(batch["cu_seqlens"], max(DOCS))
    _assert_flash_equals_sdpa(tiny_config(), batch, _skipalign_positions(DOCS), packed)


def test_model_with_padded_documents_equals_sdpa():
    """The data pipeline's padded layout (cu_seqlens real, cu_seqlens_padded laid out,
    max_seqlen of the padded documents), without CP."""
    padded_lengths = [8, 4, 12, 8, 4, 12]
    batch = pack(padded_lengths, seed=7)
    real = torch.tensor([0, *np.cumsum(DOCS).tolist()], dtype=torch.int32)
    packed = packed_seq_params_from(real, max(padded_lengths), batch["cu_seqlens"])
    _assert_flash_equals_sdpa(tiny_config(), batch, _skipalign_positions(padded_lengths), packed)


def test_model_bshd_rows_equal_sdpa():
    batch = pack([10, 10], seed=8)
    rows = {key: batch[key].reshape(2, 10) for key in ("tokens", "labels", "position_ids")}
    _assert_flash_equals_sdpa(tiny_config(), rows, rows["position_ids"], None)


def test_document_boundaries_matter():
    """Guards the comparisons above: a model fed one document per row differs from the
    packed one, so equal losses mean documents were kept apart."""
    batch = pack(DOCS, seed=5)
    flash = build(tiny_config(), backend="flash")
    with torch.no_grad():
        packed = flash(
            batch["tokens"],
            batch["position_ids"],
            labels=batch["labels"],
            packed_seq_params=packed_seq_params_from(batch["cu_seqlens"], max(DOCS)),
        )
        whole = flash(
            batch["tokens"],
            batch["position_ids"],
            labels=batch["labels"],
            packed_seq_params=packed_seq_params_from(_cu([sum(DOCS)]), sum(DOCS)),
        )
    for part in doc_slices(batch["cu_seqlens"])[1:]:  # every document after the first
        assert (packed[:, part] - whole[:, part]).abs().max() > 1e-3
