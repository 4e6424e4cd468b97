"""The non-TE context-parallel attention, one rank at a time: given every rank's keys and
values (what the all-gather delivers), each rank's local queries must get exactly the
rows of whole-sequence attention at their global positions. The multi-process tests
(tests/parallel/test_context_parallel.py) add the all-gather and its backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longalign.model.attention import (
    document_causal_block_mask,
    packed_seq_params_from,
    sdpa_varlen_context_parallel,
)
from megatron_longalign.model.backends import unavailable_reason
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.parallel.context_parallel import (
    ContextParallelView,
    context_parallel_token_index,
)
from tests.model.conftest import tiny_config
from tests.model.test_attention import SCALE, _qkv, dense_reference

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Padded to multiples of 2 * CP = 8 (CP 4) and 4 (CP 2): short and long documents.
LAYOUT = [0, 8, 16, 48, 56, 120]


def _cu(bounds) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_sdpa_context_parallel_rows_equal_whole_sequence_attention(cp, heads, kv_heads):
    q, k, v = _qkv(LAYOUT[-1], heads, kv_heads, seed=cp)
    expected = dense_reference(q, k, v, _cu(LAYOUT), SCALE)
    for rank in range(cp):
        view = ContextParallelView.build(_cu(LAYOUT), cp, rank, torch.device("cpu"))
        index = context_parallel_token_index(np.array(LAYOUT), cp, rank)
        np.testing.assert_array_equal(view.query_index.numpy(), index)
        out = sdpa_varlen_context_parallel(q[index], k, v, view, SCALE)
        torch.testing.assert_close(out, expected[index], atol=1e-5, rtol=1e-5)


def test_gather_order_restores_global_order():
    cp = 4
    views = [ContextParallelView.build(_cu(LAYOUT), cp, r, torch.device("cpu")) for r in range(cp)]
    gathered = torch.cat([view.query_index for view in views])  # rank-ordered all-gather
    np.testing.assert_array_equal(gathered[views[0].gather_order].numpy(), np.arange(LAYOUT[-1]))


@pytest.mark.skipif(unavailable_reason("flex") is not None, reason="flex_attention unavailable")
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("block_size", [4, 16, 128])
def test_flex_context_parallel_forward_equals_whole_sequence_attention(cp, block_size):
    """flex's CPU forward with the CP block mask (queries at global positions). Its
    backward is CUDA-only in torch; the GPU test covers it."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _qkv(LAYOUT[-1], 4, 2, seed=7)
    expected = dense_reference(q, k, v, _cu(LAYOUT), SCALE)
    for rank in range(cp):
        index = torch.as_tensor(context_parallel_token_index(np.array(LAYOUT), cp, rank))
        mask = document_causal_block_mask(_cu(LAYOUT), block_size, query_index=index)
        out = flex_attention(
            q[index].transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            block_mask=mask,
            scale=SCALE,
            enable_gqa=True,
        )[0].transpose(0, 1)
        torch.testing.assert_close(out, expected[index], atol=1e-5, rtol=1e-5)


def test_every_core_attention_backend_accepts_context_parallelism():
    """sdpa, flex and flash all have a context-parallel path (flash since its chunk
    sequences, tests/model/test_flash_attention.py); a backend without one is refused at
    build time rather than computing something else."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longalign.model.attention import CORE_ATTENTION_MODULES, SDPACoreAttention

    config = to_transformer_config(tiny_config(), context_parallel_size=2)
    assert set(CORE_ATTENTION_MODULES) == {"sdpa", "flex", "flash"}
    for cls in CORE_ATTENTION_MODULES.values():
        assert cls.supports_context_parallel, cls.backend
        cls.__new__(cls)._reject_unsupported(config, AttnMaskType.causal, "self", 0.0)

    class WithoutContextParallel(SDPACoreAttention):
        backend = "no-cp"
        supports_context_parallel = False

    with pytest.raises(NotImplementedError, match="'no-cp' does not support context parallel"):
        WithoutContextParallel.__new__(WithoutContextParallel)._reject_unsupported(
            config, AttnMaskType.causal, "self", 0.0
        )


def test_padded_documents_are_attended_as_laid_out():
    """Without CP, cu_seqlens_padded (real lengths in cu_seqlens) makes the padded
    documents the attention units: real tokens' rows equal unpadded attention."""
    from megatron_longalign.model.attention import SDPACoreAttention

    real, padded = [0, 3, 8], [0, 4, 12]
    q, k, v = _qkv(12, 4, 2, seed=3)
    module = SDPACoreAttention.__new__(SDPACoreAttention)
    module.softmax_scale = SCALE
    packed = packed_seq_params_from(_cu(real), 8, cu_seqlens_padded=_cu(padded))
    out = module._attend(q, k, v, packed)
    keep = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])  # the real tokens
    expected = dense_reference(q[keep], k[keep], v[keep], _cu(real), SCALE)
    torch.testing.assert_close(out[keep], expected, atol=1e-5, rtol=1e-5)
