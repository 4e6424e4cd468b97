"""Core-attention backends against a dense block-diagonal causal reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_longalign.model import attention as attn
from megatron_longalign.model.attention import (
    FlexCoreAttention,
    SDPACoreAttention,
    document_causal_block_mask,
    document_ids,
    packed_seq_params_from,
    sdpa_varlen,
)
from megatron_longalign.model.backends import unavailable_reason
from megatron_longalign.model.config import to_transformer_config
from tests.model.conftest import doc_slices, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LENGTHS = [1, 7, 4, 12, 3]  # a 1-token document and odd lengths
SCALE = 0.37
CUDA_ONLY = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (flex backward / flash-attn)"
)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)


def _qkv(total: int, heads: int, kv_heads: int, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(total, heads, dim, generator=gen),
        torch.randn(total, kv_heads, dim, generator=gen),
        torch.randn(total, kv_heads, dim, generator=gen),
    )


def dense_reference(q, k, v, cu_seqlens, scale):
    """Plain softmax attention over all T tokens with a block-diagonal causal mask:
    token i may attend to j iff both are in the same document and j <= i. KV heads are
    expanded so query head h uses KV head h // (heads / kv_heads)."""
    heads = q.size(1)
    k = k[:, torch.arange(heads) // (heads // k.size(1))]
    v = v[:, torch.arange(heads) // (heads // v.size(1))]
    doc = document_ids(cu_seqlens).long()
    idx = torch.arange(q.size(0))
    allowed = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_sdpa_varlen_equals_dense_block_diagonal_reference(heads, kv_heads):
    cu = _cu(LENGTHS)
    q, k, v = _qkv(int(cu[-1]), heads, kv_heads)
    out = sdpa_varlen(q, k, v, cu.tolist(), SCALE)
    torch.testing.assert_close(out, dense_reference(q, k, v, cu, SCALE), atol=1e-6, rtol=1e-5)


def test_sdpa_varlen_never_builds_a_pack_sized_matrix(monkeypatch):
    """One SDPA call per document, each of that document's length only (O(max L_i^2))."""
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[-2], k.shape[-2], kwargs.get("is_causal")))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", spy)
    cu = _cu(LENGTHS)
    sdpa_varlen(*_qkv(int(cu[-1]), 4, 2), cu.tolist(), SCALE)
    assert seen == [(n, n, True) for n in LENGTHS]


def _module(cls, **config_changes):
    from megatron.core.transformer.enums import AttnMaskType

    config = to_transformer_config(tiny_config(**config_changes), use_cpu_initialization=True)
    return cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)


@pytest.mark.parametrize("cls", [SDPACoreAttention, FlexCoreAttention])
def test_core_attention_module_thd_matches_reference(cls):
    """What megatron passes in THD mode: q [T, heads, dim], k/v [T, kv_heads, dim];
    output [T, heads * dim] (megatron reshapes it to [T, 1, heads * dim])."""
    module = _module(cls)
    cu = _cu(LENGTHS)
    q, k, v = _qkv(int(cu[-1]), 4, 2, dim=16)
    with torch.no_grad():  # flex has no CPU backward
        out = module(q, k, v, None, packed_seq_params=packed_seq_params_from(cu, max(LENGTHS)))
    expected = dense_reference(q, k, v, cu, module.softmax_scale).reshape(q.size(0), -1)
    assert out.shape == (q.size(0), 4 * 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [SDPACoreAttention, FlexCoreAttention])
def test_core_attention_module_bshd_is_causal_per_row(cls):
    module = _module(cls)
    seq, batch = 6, 3
    q, k, v = (x.reshape(seq, batch, *x.shape[1:]) for x in _qkv(seq * batch, 4, 2, dim=16))
    with torch.no_grad():
        out = module(q, k, v, None)
    assert out.shape == (seq, batch, 4 * 16)
    cu = _cu([seq])
    for b in range(batch):
        expected = dense_reference(q[:, b], k[:, b], v[:, b], cu, module.softmax_scale)
        torch.testing.assert_close(out[:, b], expected.reshape(seq, -1), atol=1e-5, rtol=1e-5)


def test_sdpa_module_uses_megatrons_default_scale():
    assert _module(SDPACoreAttention).softmax_scale == pytest.approx(1 / 16**0.5)


def test_sdpa_module_rejects_what_it_cannot_do():
    with pytest.raises(NotImplementedError, match="dropout"):
        from megatron.core.transformer.enums import AttnMaskType

        config = to_transformer_config(tiny_config(), attention_dropout=0.1)
        SDPACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    module = _module(SDPACoreAttention)
    q, k, v = _qkv(5, 4, 2, dim=16)
    with pytest.raises(ValueError, match="documents end at 4 but 5 tokens"):
        module(q, k, v, None, packed_seq_params=packed_seq_params_from(_cu([2, 2]), 2))


# ---------------------------------------------------------------------------------------
# flex block mask
# ---------------------------------------------------------------------------------------

BLOCK_CASES = [
    ([1, 13, 7, 16, 3, 33], 4),
    ([1, 13, 7, 16, 3, 33], 8),
    ([1, 13, 7, 16, 3, 33], 16),  # T = 73: a partial last block
    ([40, 1, 40], 16),  # documents spanning several blocks: full blocks off the diagonal
    ([5], 128),
]


def _token_mask_from_block_mask(block_mask, total: int, block: int) -> torch.Tensor:
    """What flex computes: full blocks attend entirely, partial blocks apply mask_mod,
    others nothing."""
    idx = torch.arange(total)
    qb, kb = idx[:, None] // block, idx[None, :] // block

    def block_set(counts, indices) -> torch.Tensor:
        nb = counts.size(-1)
        table = torch.zeros(nb, indices.size(-1) + 1, dtype=torch.bool)
        for i in range(nb):
            table[i, indices[0, 0, i, : counts[0, 0, i]].long()] = True
        return table[qb, kb]

    partial = block_set(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = block_set(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    mod = block_mask.mask_mod(0, 0, idx[:, None], idx[None, :])
    return full | (partial & mod)


@pytest.mark.parametrize("lengths,block", BLOCK_CASES)
def test_flex_block_mask_is_exactly_document_causal(lengths, block):
    cu = _cu(lengths)
    total = int(cu[-1])
    doc = document_ids(cu)
    idx = torch.arange(total)
    expected = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    block_mask = document_causal_block_mask(cu, block)
    assert torch.equal(_token_mask_from_block_mask(block_mask, total, block), expected)


@pytest.mark.parametrize("lengths,block", BLOCK_CASES)
def test_flex_attention_forward_equals_sdpa(lengths, block):
    from torch.nn.attention.flex_attention import flex_attention

    cu = _cu(lengths)
    q, k, v = _qkv(int(cu[-1]), 4, 2)
    out = flex_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        block_mask=document_causal_block_mask(cu, block),
        scale=SCALE,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(out, sdpa_varlen(q, k, v, cu.tolist(), SCALE), atol=1e-5, rtol=1e-5)


@CUDA_ONLY
def test_flex_gradients_equal_sdpa_on_gpu():
    module = _module(FlexCoreAttention).cuda()
    cu = _cu([1, 130, 7, 300]).cuda()
    q, k, v = (x.cuda().requires_grad_() for x in _qkv(int(cu[-1]), 4, 2, dim=16))
    out = module(q, k, v, None, packed_seq_params=packed_seq_params_from(cu, 300))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_out = sdpa_varlen(q, k, v, cu.tolist(), module.softmax_scale).reshape(out.shape)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=2e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(
    unavailable_reason("flash") is not None, reason="flash-attn and a CUDA GPU are needed"
)
def test_flash_equals_sdpa_on_gpu():
    module = _module(attn.FlashCoreAttention).cuda()
    cu = _cu([1, 130, 7, 300]).cuda()
    q, k, v = (x.cuda().bfloat16() for x in _qkv(int(cu[-1]), 4, 2, dim=16))
    out = module(q, k, v, None, packed_seq_params=packed_seq_params_from(cu, 300))
    ref = sdpa_varlen(q.float(), k.float(), v.float(), cu.tolist(), module.softmax_scale)
    torch.testing.assert_close(out.float(), ref.reshape(out.shape), atol=2e-2, rtol=2e-2)


def test_document_ids_and_slices_agree():
    cu = _cu(LENGTHS)
    doc = document_ids(cu)
    for i, part in enumerate(doc_slices(cu)):
        assert (doc[part] == i).all()
