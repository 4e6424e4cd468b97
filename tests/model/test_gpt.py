"""The GPT model on packed THD micro-batches: packing changes nothing, RoPE follows
position_ids, and the sdpa backend is megatron's own attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_longalign.config.model import RopeScalingConfig
from megatron_longalign.model.attention import packed_seq_params_from
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.model.gpt import (
    _place_for_context_parallel,
    gpt_layer_spec,
    llama3_scaled_inv_freq,
    model_inputs,
    rope_freqs,
)
from tests.helpers.fake_group import FakeGroup
from tests.model.conftest import build, doc_slices, pack, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LENGTHS = [1, 6, 9, 4]  # a 1-token document, odd and even lengths


@pytest.fixture(scope="module")
def sdpa_model():
    return build(tiny_config(), backend="sdpa")


def _packed_params(batch):
    cu = batch["cu_seqlens"]
    return packed_seq_params_from(cu, int((cu[1:] - cu[:-1]).max()))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_unpacked_losses_and_gradients_sdpa(sdpa_model):
    """One packed micro-batch gives the same per-token losses and the same gradients of
    sum(w * nll) as running every document alone (non-packed bshd path)."""
    model = sdpa_model
    batch = pack(LENGTHS)
    weights = torch.rand(batch["tokens"].shape, generator=torch.Generator().manual_seed(1))

    model.zero_grad(set_to_none=True)
    packed_loss = model(
        batch["tokens"],
        batch["position_ids"],
        labels=batch["labels"],
        packed_seq_params=_packed_params(batch),
    )
    (weights * packed_loss).sum().backward()
    packed_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    for part in doc_slices(batch["cu_seqlens"]):
        alone = model(
            batch["tokens"][:, part],
            batch["position_ids"][:, part],
            labels=batch["labels"][:, part],
        )
        torch.testing.assert_close(alone, packed_loss[:, part].detach(), atol=1e-5, rtol=1e-5)
        (weights[:, part] * alone).sum().backward()  # gradients accumulate over documents
    alone_grads = _grads(model)

    assert packed_loss.shape == batch["tokens"].shape
    assert set(packed_grads) == set(alone_grads) and len(packed_grads) > 10
    for name, grad in packed_grads.items():
        scale = grad.abs().max().item()  # up to ~15 here: fp32 sums differ by ~1e-6 of that
        assert scale > 0, name
        torch.testing.assert_close(
            grad,
            alone_grads[name],
            atol=1e-5 * max(1.0, scale),
            rtol=1e-4,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_packed_flex_forward_equals_unpacked_sdpa(sdpa_model):
    """flex on CPU: forward only (torch has no CPU flex backward)."""
    flex_model = build(tiny_config(), backend="flex")
    flex_model.load_state_dict(sdpa_model.state_dict())
    batch = pack(LENGTHS, seed=3)
    with torch.no_grad():
        packed = flex_model(
            batch["tokens"],
            batch["position_ids"],
            labels=batch["labels"],
            packed_seq_params=_packed_params(batch),
        )
        for part in doc_slices(batch["cu_seqlens"]):
            alone = sdpa_model(
                batch["tokens"][:, part],
                batch["position_ids"][:, part],
                labels=batch["labels"][:, part],
            )
            torch.testing.assert_close(packed[:, part], alone, atol=1e-5, rtol=1e-5)


def test_sdpa_backend_equals_megatrons_dot_product_attention(sdpa_model):
    """Same weights in megatron's own local spec (DotProductAttention with an explicit
    causal mask, megatron's default RoPE): identical logits, so head grouping (GQA),
    softmax scale and the rotary layout all agree."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = tiny_config()
    reference = GPTModel(
        to_transformer_config(config, use_cpu_initialization=True),
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=config.padded_vocab_size(),
        max_sequence_length=config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=config.rope_theta,
    )
    reference.load_state_dict(sdpa_model.state_dict())
    seq = 11
    tokens = torch.randint(
        0, config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(5)
    )
    positions = torch.arange(seq).expand(2, seq)
    causal_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        expected = reference(tokens, positions, causal_mask)
        got = sdpa_model(tokens, positions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _logits(model, batch, positions=None):
    with torch.no_grad():
        return model(batch["tokens"], positions, packed_seq_params=_packed_params(batch))


def test_default_positions_equal_megatrons_thd_rope(sdpa_model):
    """position_ids = arange per document through our path == megatron's own THD RoPE
    (a plain GPTModel with the same layer spec and weights, which restarts positions
    at 0 per document from cu_seqlens)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = tiny_config()
    plain = GPTModel(
        to_transformer_config(config, use_cpu_initialization=True),
        gpt_layer_spec("sdpa"),
        vocab_size=config.padded_vocab_size(),
        max_sequence_length=config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=config.rope_theta,
    )
    plain.load_state_dict(sdpa_model.state_dict())
    batch = pack(LENGTHS, seed=7)
    ours = _logits(sdpa_model, batch, batch["position_ids"])
    with torch.no_grad():
        megatron_default = plain(
            batch["tokens"], batch["position_ids"], None, packed_seq_params=_packed_params(batch)
        )
    torch.testing.assert_close(ours, megatron_default, atol=1e-6, rtol=0)


def test_position_ids_are_required(sdpa_model):
    batch = pack(LENGTHS)
    with pytest.raises(ValueError, match="position_ids are required"):
        _logits(sdpa_model, batch, None)


def _skipalign_positions(lengths: list[int]) -> torch.Tensor:
    """Contiguous segments with skips between them (SkipAlign-like), per document."""
    rows = []
    for n in lengths:
        pos = torch.arange(n)
        pos[n // 3 :] += 50  # a skip after the first third
        pos[2 * n // 3 :] += 300  # and another after the second
        rows.append(pos + 7)
    return torch.cat(rows)[None]


def test_skipalign_positions_change_output_and_equal_each_document_alone(sdpa_model):
    batch = pack(LENGTHS, seed=9)
    skip = _skipalign_positions(LENGTHS)
    packed = _logits(sdpa_model, batch, skip)
    default = _logits(sdpa_model, batch, batch["position_ids"])
    for part, n in zip(doc_slices(batch["cu_seqlens"]), LENGTHS, strict=True):
        with torch.no_grad():
            alone = sdpa_model(batch["tokens"][:, part], skip[:, part])  # bshd path
        torch.testing.assert_close(packed[:, part], alone, atol=1e-5, rtol=1e-5)
        if n >= 3:  # documents that actually contain a skip
            assert (packed[:, part] - default[:, part]).abs().max() > 1e-2


def test_rope_is_relative_shifting_a_whole_document_changes_nothing(sdpa_model):
    """RoPE sees only position differences: a constant offset per document (e.g. a
    PoSE-style offset with no skip inside) leaves the output unchanged. Together with the
    test above this shows positions reach attention as intended."""
    batch = pack(LENGTHS, seed=11)
    offsets = torch.repeat_interleave(torch.tensor([3, 1000, 17, 250]), torch.tensor(LENGTHS))
    shifted = _logits(sdpa_model, batch, batch["position_ids"] + offsets[None])
    default = _logits(sdpa_model, batch, batch["position_ids"])
    torch.testing.assert_close(shifted, default, atol=2e-4, rtol=1e-4)


def test_thd_position_ids_must_cover_the_pack(sdpa_model):
    batch = pack(LENGTHS)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sdpa_model._rotary_from_positions(batch["position_ids"][:, :-1], _packed_params(batch))


# ---------------------------------------------------------------------------------------
# RoPE details
# ---------------------------------------------------------------------------------------


def _meta_llama3_scaling(freq: float, scaling: RopeScalingConfig) -> float:
    """Meta's reference `apply_scaling` (llama-models, Llama 3.1) for one frequency."""
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
        return freq
    if wavelen > low_wavelen:
        return freq / scaling.factor
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    return (1 - smooth) * freq / scaling.factor + smooth * freq


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScalingConfig(),
        RopeScalingConfig(32.0, 1.0, 4.0, 8192),
        RopeScalingConfig(4.0, 2.0, 8.0, 4096),
    ],
)
def test_llama3_rope_scaling_matches_the_published_formula(scaling):
    dim, theta = 128, 500000.0
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    got = llama3_scaled_inv_freq(inv_freq, scaling)
    expected = torch.tensor(
        [_meta_llama3_scaling(f, scaling) for f in inv_freq.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-12)
    kept, divided = got == inv_freq, torch.isclose(got, inv_freq / scaling.factor, rtol=1e-12)
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three bands


def test_llama3_rope_scaling_hand_values():
    scaling = RopeScalingConfig()  # factor 8, low 1, high 4, original 8192
    inv_freq = torch.tensor([1.0, 2 * math.pi / 3000.0, 2 * math.pi / 5000.0, 2 * math.pi / 9000.0])
    got = llama3_scaled_inv_freq(inv_freq.double(), scaling).tolist()
    # wavelength 2*pi < 2048: kept; 9000 > 8192: divided by 8; 3000 and 5000 lie in the
    # band, smooth = (8192 / w - 1) / 3, f' = (1 - smooth) f / 8 + smooth f.
    smooth_3000, smooth_5000 = (8192 / 3000 - 1) / 3, (8192 / 5000 - 1) / 3
    f3000, f5000 = 2 * math.pi / 3000.0, 2 * math.pi / 5000.0
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx((1 - smooth_3000) * f3000 / 8 + smooth_3000 * f3000)
    assert got[2] == pytest.approx((1 - smooth_5000) * f5000 / 8 + smooth_5000 * f5000)
    assert got[3] == pytest.approx(2 * math.pi / 9000.0 / 8)


def test_model_with_rope_scaling_uses_scaled_frequencies():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    config = tiny_config(rope_theta=500000.0, rope_scaling=RopeScalingConfig())
    model = build(config)
    # megatron's own llama-3 path (rope_scaling=True, factor 8, its fixed 1/4/8192)
    reference = RotaryEmbedding(
        16, 1.0, rotary_base=500000.0, rope_scaling=True, use_cpu_initialization=True
    )
    unscaled = RotaryEmbedding(16, 1.0, rotary_base=500000.0, use_cpu_initialization=True)
    assert torch.equal(model.rotary_pos_emb.inv_freq.cpu(), reference.inv_freq)
    assert not torch.equal(reference.inv_freq, unscaled.inv_freq)


@pytest.mark.parametrize("cp_size", [2, 4])
def test_context_parallel_rope_table_gives_each_local_token_its_position(cp_size):
    """Under CP, megatron's THD RoPE reads this rank's chunks (r and 2*CP-1-r of every
    document) from a full-length table; the table we build must make every local token
    rotate by its own (explicit) position."""
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
        _apply_rotary_pos_emb_thd,
    )

    lengths = [2 * cp_size, 6 * cp_size, 4 * cp_size]
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    global_positions = _skipalign_positions(lengths)[0]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    for rank in range(cp_size):
        local_idx = []
        for start, n in zip(cu[:-1].tolist(), lengths, strict=True):
            chunk = n // (2 * cp_size)
            for c in (rank, 2 * cp_size - 1 - rank):
                local_idx += range(start + c * chunk, start + (c + 1) * chunk)
        local_positions = global_positions[local_idx]
        local_freqs = rope_freqs(inv_freq, local_positions)[:, None, None, :]
        table = _place_for_context_parallel(local_freqs, cu, cp_size, rank)
        t = torch.randn(len(local_idx), 2, 8)
        got = _apply_rotary_pos_emb_thd(t, cu, table, cp_group=FakeGroup(cp_size, rank))
        expected = _apply_rotary_pos_emb_bshd(t[:, None], local_freqs)[:, 0]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------


def test_tied_embeddings_and_qkv_bias_build_as_configured():
    tied = build(tiny_config(tie_word_embeddings=True, qkv_bias=True))
    assert tied.share_embeddings_and_output_weights
    assert tied.output_layer.weight is None  # megatron uses the embedding's weight
    assert tied.decoder.layers[0].self_attention.linear_qkv.bias is not None
    untied = build(tiny_config())
    assert untied.output_layer.weight is not None
    assert untied.decoder.layers[0].self_attention.linear_qkv.bias is None


def test_model_inputs_from_a_data_pipeline_microbatch(sdpa_model):
    from megatron_longalign.data.microbatch import MicroBatch

    batch = pack(LENGTHS, seed=13)
    microbatch = MicroBatch(
        tokens=batch["tokens"][0].numpy(),
        labels=batch["labels"][0].numpy(),
        loss_weights=np.ones(sum(LENGTHS), np.float32),
        position_ids=batch["position_ids"][0].numpy(),
        cu_seqlens=batch["cu_seqlens"].numpy(),
        max_seqlen=max(LENGTHS),
        sample_ids=np.arange(len(LENGTHS)),
        num_real_tokens=sum(LENGTHS),
    )
    inputs = model_inputs(microbatch)
    assert inputs["packed_seq_params"].qkv_format == "thd"
    assert inputs["packed_seq_params"].cu_seqlens_q.dtype == torch.int32
    with torch.no_grad():
        loss = sdpa_model(**inputs)
        expected = sdpa_model(
            batch["tokens"],
            batch["position_ids"],
            labels=batch["labels"],
            packed_seq_params=_packed_params(batch),
        )
    assert torch.equal(loss, expected)


def test_padded_vocabulary_does_not_enter_the_loss():
    """vocab 300 is padded to 384 (multiple of 128): the loss is the cross entropy over
    the 300 real columns only, so it is the same for every TP padding and equals the
    unpadded (Hugging Face) model's."""
    import torch.nn.functional as F

    model = build(tiny_config(vocab_size=300, make_vocab_size_divisible_by=128))
    assert model.vocab_size == 384 and model.real_vocab_size == 300
    batch = pack([7, 5], vocab=300)
    kwargs = dict(
        position_ids=batch["position_ids"],
        packed_seq_params=packed_seq_params_from(batch["cu_seqlens"], 7),
    )
    logits = model(batch["tokens"], **kwargs)  # [1, T, 384]
    assert logits.size(-1) == 384 and logits[..., 300:].abs().sum() > 0
    losses = model(batch["tokens"], labels=batch["labels"], **kwargs)
    expected = F.cross_entropy(logits[0, :, :300], batch["labels"][0], reduction="none")
    torch.testing.assert_close(losses[0], expected, atol=1e-5, rtol=1e-5)
    with_padding = F.cross_entropy(logits[0], batch["labels"][0], reduction="none")
    assert (with_padding - expected).abs().min() > 1e-3  # the padding would have counted
