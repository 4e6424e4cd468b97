"""The attention probe (GATEAU's attention mass per key segment) against a dense float64
reference: explicit softmax(Q K^T * scale) over the whole packed micro-batch with the
document-causal mask, every query head repeated onto its KV head as megatron does. First
on q/k given directly (GQA, several documents, segments and measured rows only in some,
a layer subset, chunk sizes, a context-parallel split), then through the tiny model with
q/k captured from its core-attention modules. The CP2 run through torchrun is in
tests/parallel/test_attention_probe.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longalign.model import attention_probe as probe_module
from megatron_longalign.model.attention import SDPACoreAttention, _PackedCoreAttention
from megatron_longalign.model.attention_probe import AttentionProbe, ProbeRequest, attach_probe
from megatron_longalign.model.gpt import model_inputs
from megatron_longalign.parallel.context_parallel import ContextParallelView
from tests.model.conftest import build, tiny_config

SCALE = 0.4
# Four documents; segments in documents 0, 2 and 3 (document 1 has none); measured rows
# in documents 0, 1 and 3 (document 2 has none, so its segment is NaN).
LAYOUT = [0, 8, 12, 24, 40]
SEGMENTS = {0: (1, 4), 1: (5, 7), 2: (14, 18), 3: (24, 27), 4: (30, 36), 5: (38, 40)}
QUERIES = [(5, 8), (9, 12), (33, 40)]  # document 3's rows see segment 4 only partly


def request(layers=None, total: int = LAYOUT[-1]) -> ProbeRequest:
    mask = np.zeros(total, dtype=bool)
    for lo, hi in QUERIES:
        mask[lo:hi] = True
    segments = np.full(total, -1, dtype=np.int32)
    for s, (lo, hi) in SEGMENTS.items():
        segments[lo:hi] = s
    return ProbeRequest(mask, segments, len(SEGMENTS), layers)


def qk(seed: int, heads: int = 4, kv_heads: int = 2, dim: int = 8, total: int = LAYOUT[-1]):
    """Large-magnitude q/k so attention is far from uniform (a wrong mask, head mapping or
    scale changes the masses well beyond the tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total, heads, dim, generator=gen) * 1.5
    k = torch.randn(total, kv_heads, dim, generator=gen) * 1.5
    return q, k


def dense_sums(q, k, scale: float, layout, req: ProbeRequest) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, count) per segment for one layer, from the full T x T probabilities."""
    total, heads = q.size(0), q.size(1)
    keys = k.double().repeat_interleave(heads // k.size(1), dim=1)  # head h -> kv h // group
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * scale
    doc = torch.repeat_interleave(torch.arange(len(layout) - 1), torch.tensor(np.diff(layout)))
    pos = torch.arange(total)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # [H, T, T]
    numerators = np.zeros(req.num_segments)
    counts = np.zeros(req.num_segments)
    mask = torch.as_tensor(req.query_mask)
    for s in range(req.num_segments):
        keys_in = torch.as_tensor(req.key_segments == s)
        if not keys_in.any():
            continue
        rows = mask & (doc == doc[keys_in][0])
        numerators[s] = float(probs[:, rows][:, :, keys_in].sum())
        counts[s] = heads * int(rows.sum())
    return numerators, counts


def dense_mass(layers: list[tuple[torch.Tensor, torch.Tensor]], scale, layout, req) -> np.ndarray:
    sums = [dense_sums(q, k, scale, layout, req) for q, k in layers]
    numerators = sum(n for n, _ in sums)
    counts = sum(c for _, c in sums)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, numerators / np.maximum(counts, 1), np.nan)


def test_probe_equals_dense_reference_with_gqa_layer_subset_and_nan_segments():
    layers = {n: qk(seed=n) for n in (1, 2, 3)}
    req = request(layers=(1, 3))
    probe = AttentionProbe(req)
    for number, (q, k) in layers.items():
        probe.observe(number, q, k, SCALE, LAYOUT)
    expected = dense_mass([layers[1], layers[3]], SCALE, LAYOUT, req)
    mass = probe.result()
    assert mass.dtype == np.float64 and mass.shape == (len(SEGMENTS),)
    np.testing.assert_allclose(mass, expected, rtol=1e-5, atol=1e-7)
    # Segment 2's document has no measured row: NaN; the others are real masses.
    assert np.isnan(mass[2]) and np.isfinite(np.delete(mass, 2)).all()
    assert (np.delete(mass, 2) > 1e-3).all()
    # The subset matters: all three layers give a different answer.
    everything = dense_mass(list(layers.values()), SCALE, LAYOUT, req)
    assert np.nanmax(np.abs(everything - expected)) > 1e-3


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_probe_head_mapping_for_any_grouping(heads, kv_heads):
    q, k = qk(seed=5, heads=heads, kv_heads=kv_heads)
    probe = AttentionProbe(request())
    probe.observe(1, q, k, SCALE, LAYOUT)
    expected = dense_mass([(q, k)], SCALE, LAYOUT, request())
    np.testing.assert_allclose(probe.result(), expected, rtol=1e-5, atol=1e-7)


def test_small_chunks_give_the_same_result_and_never_a_pack_sized_matrix(monkeypatch):
    """key_chunk 3 (documents are 4 to 16 tokens) and query_chunk 2: many chunks, same
    masses; every score block is at most query_chunk x heads x key_chunk."""
    q, k = qk(seed=11)
    large = AttentionProbe(request(), key_chunk=4096)
    large.observe(1, q, k, SCALE, LAYOUT)
    shapes = []
    real = probe_module.chunk_scores

    def spy(rows, keys, positions, start, end, scale):
        out = real(rows, keys, positions, start, end, scale)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(probe_module, "chunk_scores", spy)
    small = AttentionProbe(request(), key_chunk=3, query_chunk=2)
    small.observe(1, q, k, SCALE, LAYOUT)
    np.testing.assert_allclose(small.result(), large.result(), rtol=1e-6, atol=1e-9)
    assert len(shapes) > 10
    assert max(s[0] for s in shapes) <= 2 and max(s[-1] for s in shapes) <= 3


def test_context_parallel_split_equals_whole_micro_batch():
    """Each CP rank's local queries (view.query_index) against the gathered keys: the two
    ranks' sums together are the CP1 sums (one probe fed both ranks' calls here; the
    torchrun test all-reduces them across processes)."""
    q, k = qk(seed=3)
    whole = AttentionProbe(request())
    whole.observe(1, q, k, SCALE, LAYOUT)
    split = AttentionProbe(request(), key_chunk=5)
    for rank in range(2):
        view = ContextParallelView.build(torch.tensor(LAYOUT), 2, rank, torch.device("cpu"))
        split.observe(1, q[view.query_index], k, SCALE, view.layout, view.query_index)
    np.testing.assert_allclose(split.result(), whole.result(), rtol=1e-6, atol=1e-9)


def test_segment_without_keys_is_nan_and_no_rows_is_all_nan():
    req = request()
    empty = ProbeRequest(req.query_mask, req.key_segments, req.num_segments + 1)  # id 6 unused
    probe = AttentionProbe(empty)
    probe.observe(1, *qk(seed=2), SCALE, LAYOUT)
    assert np.isnan(probe.result()[6]) and np.isfinite(probe.result()[0])
    nothing = AttentionProbe(ProbeRequest(np.zeros(40, bool), req.key_segments, 6))
    nothing.observe(1, *qk(seed=2), SCALE, LAYOUT)
    assert np.isnan(nothing.result()).all()


def test_request_and_micro_batch_mismatches_raise_naming_the_field():
    probe = AttentionProbe(request(total=LAYOUT[-1] + 4))
    with pytest.raises(ValueError, match="query_mask and key_segments have 44 entries.*40 tokens"):
        probe.observe(1, *qk(seed=1), SCALE, LAYOUT)
    with pytest.raises(ValueError, match="query_mask has 3 entries but key_segments has 2"):
        ProbeRequest(np.zeros(3, bool), np.zeros(2, np.int32), 1)
    with pytest.raises(ValueError, match="query_mask must be a 1-D bool array"):
        ProbeRequest(np.zeros(3, np.int64), np.zeros(3, np.int32), 1)
    with pytest.raises(ValueError, match=r"key_segments holds ids in \[-1, 2\]"):
        ProbeRequest(np.zeros(3, bool), np.array([-1, 0, 2]), 2)
    with pytest.raises(ValueError, match="layers are 1-based"):
        ProbeRequest(np.zeros(3, bool), np.zeros(3, np.int32), 1, layers=(0,))
    spanning = np.full(40, -1)
    spanning[6:10] = 0  # documents 0 and 1
    with pytest.raises(ValueError, match="segment 0 spans documents 0 to 1"):
        AttentionProbe(ProbeRequest(np.ones(40, bool), spanning, 1)).observe(
            1, *qk(seed=1), SCALE, LAYOUT
        )


# ---------------------------------------------------------------------------------------
# Through the model
# ---------------------------------------------------------------------------------------

MODEL_LAYOUT = [0, 13, 20, 37]


def _model_request(layers=None) -> ProbeRequest:
    mask = np.zeros(37, dtype=bool)
    mask[[8, 9, 10, 11, 12, 17, 19, 30, 31, 33, 36]] = True
    segments = np.full(37, -1, dtype=np.int32)
    segments[1:5], segments[5:7], segments[14:19], segments[21:28] = 0, 1, 2, 3
    return ProbeRequest(mask, segments, 4, layers)


def _micro_batch():
    from types import SimpleNamespace

    lengths = np.diff(MODEL_LAYOUT)
    rng = np.random.default_rng(0)
    return SimpleNamespace(
        tokens=rng.integers(0, 256, 37),
        labels=rng.integers(0, 256, 37),
        position_ids=np.concatenate([np.arange(n) for n in lengths]),
        cu_seqlens=np.array(MODEL_LAYOUT, dtype=np.int32),
        cu_seqlens_padded=None,
        max_seqlen=int(lengths.max()),
    )


def _capture_qk(model) -> tuple[dict[int, tuple], list]:
    """Forward pre-hooks on the core-attention modules: the q and k megatron hands them."""
    captured: dict[int, tuple] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, _PackedCoreAttention):

            def hook(mod, args, kwargs):
                captured[mod.layer_number] = (args[0].detach().clone(), args[1].detach().clone())

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return captured, handles


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("layers,backend", [(None, "sdpa"), ((2,), "sdpa"), ((1, 3), "flex")])
def test_probe_through_the_model_equals_reference_on_captured_qk(layers, backend):
    model = build(tiny_config(num_layers=3), backend=backend).eval()
    inputs = model_inputs(_micro_batch())
    inputs.pop("labels")
    captured, handles = _capture_qk(model)
    with torch.no_grad():
        plain = model(**inputs)
    for handle in handles:
        handle.remove()
    assert sorted(captured) == [1, 2, 3]
    scale = next(m for m in model.modules() if hasattr(m, "softmax_scale")).softmax_scale
    req = _model_request(layers)
    probe = AttentionProbe(req, key_chunk=4)
    with torch.no_grad(), attach_probe([model], probe):
        probed = model(**inputs)
    torch.testing.assert_close(probed, plain, rtol=0, atol=0)  # the probe only reads
    chosen = [captured[n] for n in (layers or sorted(captured))]
    expected = dense_mass(chosen, scale, MODEL_LAYOUT, req)
    np.testing.assert_allclose(probe.result(), expected, rtol=1e-5, atol=1e-7)
    assert np.isfinite(expected).all()


def test_attach_detaches_on_exit_and_on_error_and_refuses_a_second_probe():
    model = build(tiny_config(), backend="sdpa")
    cores = [m for m in model.modules() if hasattr(m, "probe")]
    assert len(cores) == 2
    probe = AttentionProbe(_model_request())
    with pytest.raises(KeyError), attach_probe([model], probe):
        assert all(m.probe is probe for m in cores)
        second = AttentionProbe(_model_request())
        with (
            pytest.raises(RuntimeError, match="already reports to a probe"),
            attach_probe([model], second),
        ):
            pass
        assert all(m.probe is probe for m in cores)  # the failed attach undid nothing of ours
        raise KeyError("boom")
    assert all(m.probe is None for m in cores)


def test_attach_refuses_a_core_attention_that_does_not_report_qk():
    """What a `te` model holds (TE's DotProductAttention, which keeps q and k inside
    Transformer Engine); here megatron's own DotProductAttention stands in for it,
    as TE is not installed on CPU."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    model = build(tiny_config(), backend="sdpa")
    attention = model.decoder.layers[1].self_attention
    attention.core_attention = DotProductAttention(
        model.config, layer_number=2, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    probe = AttentionProbe(_model_request())
    te_like = "layer 2's core attention is DotProductAttention.*'te'"
    with pytest.raises(TypeError, match=te_like), attach_probe([model], probe):
        pass
    assert model.decoder.layers[0].self_attention.core_attention.probe is None
    with (
        pytest.raises(ValueError, match="no attention layer"),
        attach_probe([torch.nn.Linear(2, 2)], probe),
    ):
        pass


def test_unpacked_bshd_rows_are_documents_of_the_layout():
    """Without packed_seq_params megatron passes [S, B, H, D]: each row is one causal
    document, so the request indexes B * S tokens, row after row."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_longalign.model.config import to_transformer_config

    config = to_transformer_config(tiny_config(), use_cpu_initialization=True)
    module = SDPACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    seq, batch = 10, 4
    q, k = qk(seed=9, heads=4, kv_heads=2, dim=16, total=seq * batch)
    layout = list(range(0, seq * batch + 1, seq))
    mask = np.zeros(seq * batch, dtype=bool)
    mask[[7, 8, 9, 25, 29]] = True
    segments = np.full(seq * batch, -1, dtype=np.int32)
    segments[2:6], segments[21:24], segments[33:36] = 0, 1, 2
    req = ProbeRequest(mask, segments, 3)
    probe = AttentionProbe(req, key_chunk=3)

    def bshd(x):
        return x.reshape(batch, seq, *x.shape[1:]).transpose(0, 1)

    with torch.no_grad(), attach_probe([module], probe):
        module(bshd(q), bshd(k), bshd(k), None)
    expected = dense_mass([(q, k)], module.softmax_scale, layout, req)
    np.testing.assert_allclose(probe.result(), expected, rtol=1e-5, atol=1e-7)
    assert np.isnan(expected[2]) and np.isfinite(expected[:2]).all()
