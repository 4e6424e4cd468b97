"""The CPU stand-in for flash-attn's `flash_attn_varlen_func` (tests/helpers/flash_standin.py)
against hand-computed values and torch SDPA with an explicit bottom-right causal mask,
and its installation behind the backends' import seam."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_longalign.model import backends
from megatron_longalign.model.backends import (
    import_flash_attn_varlen,
    resolve_attention_backend,
    unavailable_reason,
)
from tests.helpers import flash_standin
from tests.helpers.flash_standin import flash_attn_varlen_func

# (Lq, Lk) per sequence: fewer queries than keys (a CP chunk against its document's
# prefix), equal, more queries than keys (leading rows see no key), an empty sequence.
SEQUENCES = [(2, 5), (4, 4), (5, 2), (0, 3), (3, 9)]


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(heads: int, kv_heads: int, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    total_q = sum(lq for lq, _ in SEQUENCES)
    total_k = sum(lk for _, lk in SEQUENCES)
    return (
        torch.randn(total_q, heads, dim, generator=gen),
        torch.randn(total_k, kv_heads, dim, generator=gen),
        torch.randn(total_k, kv_heads, dim, generator=gen),
    )


def _call(q, k, v, **kwargs):
    cu_q, cu_k = _cu([lq for lq, _ in SEQUENCES]), _cu([lk for _, lk in SEQUENCES])
    max_q, max_k = max(lq for lq, _ in SEQUENCES), max(lk for _, lk in SEQUENCES)
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _sdpa_bottom_right(q, k, v, scale):
    """Independent reference: per sequence, torch SDPA (its own GQA head mapping,
    enable_gqa) with an explicit bottom-right causal mask; rows without any key -> 0."""
    outputs, qs, ks = [], 0, 0
    for lq, lk in SEQUENCES:
        if lq:
            i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
            mask = j <= i + lk - lq
            out = F.scaled_dot_product_attention(
                q[qs : qs + lq].transpose(0, 1),
                k[ks : ks + lk].transpose(0, 1),
                v[ks : ks + lk].transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            ).transpose(0, 1)
            outputs.append(torch.where(mask.any(-1)[:, None, None], out, 0.0))
        qs, ks = qs + lq, ks + lk
    return torch.cat(outputs)


def test_hand_computed_two_queries_three_keys():
    """Lq = 2, Lk = 3, one head, D = 1, scale 1: bottom-right alignment lets query 0 see
    keys 0 and 1 (top-left would give it key 0 only) and query 1 all three."""
    q = torch.tensor([[[1.0]], [[2.0]]])
    k = torch.tensor([[[0.0]], [[1.0]], [[2.0]]])
    v = torch.tensor([[[1.0]], [[2.0]], [[4.0]]])
    out = flash_attn_varlen_func(
        q, k, v, _cu([2]), _cu([3]), 2, 3, softmax_scale=1.0, causal=True
    ).flatten()
    e = math.e
    expected = [(1 + 2 * e) / (1 + e), (1 + 2 * e**2 + 4 * e**4) / (1 + e**2 + e**4)]
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # Not causal: both queries see all keys.
    out = flash_attn_varlen_func(q, k, v, _cu([2]), _cu([3]), 2, 3, softmax_scale=1.0).flatten()
    expected0 = (1 + 2 * e + 4 * e**2) / (1 + e + e**2)
    torch.testing.assert_close(out[0], torch.tensor(expected0), atol=1e-6, rtol=1e-6)


def test_more_queries_than_keys_matches_flash_attns_documented_mask():
    """flash-attn's docstring: seqlen_q = 5, seqlen_k = 2 keeps rows 3 (key 0) and 4
    (keys 0, 1); rows that see no key output zero."""
    q = torch.randn(5, 2, 4)
    k, v = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    out = flash_attn_varlen_func(q, k, v, _cu([5]), _cu([2]), 5, 2, causal=True)
    assert (out[:3] == 0).all()
    torch.testing.assert_close(out[3], v[0].expand(2, 4))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_equals_sdpa_with_a_bottom_right_mask(heads, kv_heads, scale):
    q, k, v = _qkv(heads, kv_heads)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = _call(q, k, v, causal=True, softmax_scale=scale)
    expected = _sdpa_bottom_right(q, k, v, scale or 1 / math.sqrt(q.size(-1)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_query_head_h_uses_kv_head_h_over_group():
    """Head mapping, checked without any library: with K/V head 1 all zeros, query heads
    2, 3 (group 1 of 4:2) average v's head 1 uniformly."""
    q, k, v = _qkv(4, 2)
    k[:, 1] = 0.0
    out = _call(q, k, v, causal=False)
    assert (out[0, 2:] - v[:5, 1].mean(0)).abs().max() < 1e-6  # sequence 0: 5 keys
    assert (out[0, :2] - v[:5, 1].mean(0)).abs().max() > 1e-3


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = _qkv(4, 2, dim=16)
    default = _call(q, k, v, causal=True)
    torch.testing.assert_close(default, _call(q, k, v, causal=True, softmax_scale=0.25))
    assert (default - _call(q, k, v, causal=True, softmax_scale=0.37)).abs().max() > 1e-3


def test_low_precision_is_computed_in_fp32_and_returned_in_its_dtype():
    q, k, v = _qkv(4, 2)
    out = _call(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16
    expected = _call(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), causal=True)
    torch.testing.assert_close(out, expected.bfloat16())


def test_dropout_drops_probabilities_reproducibly():
    q, k, v = _qkv(4, 2)
    plain = _call(q, k, v, causal=True)
    torch.manual_seed(5)
    dropped = _call(q, k, v, causal=True, dropout_p=0.5)
    torch.manual_seed(5)
    torch.testing.assert_close(_call(q, k, v, causal=True, dropout_p=0.5), dropped)
    assert (dropped - plain).abs().max() > 1e-2


def test_what_the_kernel_would_get_wrong_raises():
    q, k, v = _qkv(4, 2)
    cu_q, cu_k = _cu([lq for lq, _ in SEQUENCES]), _cu([lk for _, lk in SEQUENCES])
    with pytest.raises(ValueError, match="max_seqlen_q=4"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 9, causal=True)
    with pytest.raises(ValueError, match="max_seqlen_k=8"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 8, causal=True)
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen_func(q, k, v, cu_q.long(), cu_k, 5, 9, causal=True)
    with pytest.raises(ValueError, match="start at 0"):
        flash_attn_varlen_func(q, k, v, cu_q + 1, cu_k, 5, 9, causal=True)
    too_long = cu_q.clone()
    too_long[-1] += 1
    with pytest.raises(ValueError, match="ends at"):
        flash_attn_varlen_func(q, k, v, too_long, cu_k, 5, 9, causal=True)
    with pytest.raises(ValueError, match="divisible"):
        flash_attn_varlen_func(q[:, :3], k, v, cu_q, cu_k, 5, 9, causal=True)
    # Rows past cu_seqlens_q[-1] are never written by the kernel: NaN here.
    out = flash_attn_varlen_func(q, k, v, cu_q[:-1], cu_k[:-1], 5, 9, causal=True)
    assert out[: int(cu_q[-2])].isfinite().all() and out[int(cu_q[-2]) :].isnan().all()


def test_installed_behind_the_import_seam_and_removed_after():
    before = unavailable_reason("flash")
    with flash_standin.installed():
        assert import_flash_attn_varlen() is flash_attn_varlen_func
        assert unavailable_reason("flash") is None
        assert resolve_attention_backend("flash") == "flash"
        assert "te" in backends._NEEDS_CUDA  # only flash's CUDA requirement is lifted
    assert unavailable_reason("flash") == before
    if before is not None:  # the real package is not installed here
        with pytest.raises(backends.BackendUnavailableError):
            import_flash_attn_varlen()
