"""Model FLOPs: matmul parameter counts against published model sizes, the training
FLOPs formula on a hand-computed example, and real document lengths from micro-batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.data.indexed import SFTSample
from megatron_longalign.data.microbatch import MicroBatchBuilder
from megatron_longalign.data.planner import GlobalBatch, MicroBatchPlan
from megatron_longalign.training.metrics import (
    attention_flops_coefficient,
    batch_document_lengths,
    batch_packing_efficiency,
    document_lengths_from,
    matmul_params,
    packing_efficiency,
    training_flops,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def load(name: str) -> ModelConfig:
    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml")
    )
    return OmegaConf.to_object(merged)


# Tiny model for hand arithmetic: 2 layers, hidden 8, ffn 16, 2 query heads of dim 4,
# 1 KV group (GQA), vocab 10.
TINY = ModelConfig(
    num_layers=2,
    hidden_size=8,
    ffn_hidden_size=16,
    num_attention_heads=2,
    num_query_groups=1,
    vocab_size=10,
)


def test_matmul_params_by_hand():
    qkv = 8 * (2 * 4 + 2 * 1 * 4)  # 8 x (q 8 + k 4 + v 4) = 128
    out = 8 * 8  # 64
    mlp = 3 * 8 * 16  # gate, up, down = 384
    lm_head = 10 * 8  # 80
    assert qkv + out + mlp == 576
    assert matmul_params(TINY) == 2 * 576 + lm_head == 1232


def test_training_flops_by_hand():
    # Documents of 3 and 5 tokens: sum L = 8, sum L^2 = 9 + 25 = 34.
    # linear: 6 * 1232 * 8 = 59,136; attention: 6 * 2 layers * 8 * 34 = 3,264.
    assert attention_flops_coefficient(TINY) == 6 * 2 * 8 == 96
    assert training_flops(TINY, [3, 5]) == 59_136 + 3_264 == 62_400
    assert training_flops(TINY, np.array([3, 5])) == 62_400
    assert training_flops(TINY, []) == 0.0


def test_attention_counts_sum_of_squares_not_pack_length_squared():
    # One pack of two 4-token documents vs one 8-token document: same tokens, so the
    # same linear FLOPs; attention 4^2 + 4^2 = 32 vs 8^2 = 64, half of it.
    linear = 6 * 1232 * 8
    packed, single = training_flops(TINY, [4, 4]), training_flops(TINY, [8])
    assert packed == linear + 96 * 32
    assert single == linear + 96 * 64
    assert single - linear == 2 * (packed - linear)


def test_tied_embeddings_still_count_the_lm_head():
    tied = ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    assert matmul_params(tied) == matmul_params(TINY)


def test_flops_are_exact_at_scale():
    # 6 * params * tokens overflows int64 for a 7B model on 10^9 tokens; the sum must
    # stay exact (Python ints) until the final float.
    config = load("llama2_7b")
    lengths = np.full(20_000, 65_536)
    expected = (
        6 * matmul_params(config) * 20_000 * 65_536
        + attention_flops_coefficient(config) * 20_000 * 65_536**2
    )
    assert training_flops(config, lengths) == float(expected)


def test_negative_lengths_are_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        training_flops(TINY, [3, -1])


# Published total parameter counts (embedding table included), from the model pages:
# - Llama-2-7B: 6.74B (Hugging Face meta-llama/Llama-2-7b-hf page);
# - Llama-3-8B: 8.03B (Hugging Face meta-llama/Meta-Llama-3-8B page);
# - Mistral-7B-v0.3: 7.25B (Hugging Face mistralai/Mistral-7B-v0.3 page);
# - Qwen2.5-7B: 7.61B total, 6.53B non-embedding (Qwen/Qwen2.5-7B model card).
# Our count leaves out only the norm weights and Qwen's QKV bias (not matmuls),
# about 0.003% of the total.
PUBLISHED = {
    "llama2_7b": 6.74e9,
    "llama3_8b": 8.03e9,
    "mistral_7b": 7.25e9,
    "qwen2_5_7b": 7.61e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_matmul_params_plus_embedding_match_published_totals(name):
    config = load(name)
    embedding = config.vocab_size * config.hidden_size
    total = matmul_params(config) + embedding
    assert total == pytest.approx(PUBLISHED[name], rel=0.005)


def test_llama2_7b_count_by_hand():
    # Per layer: attention 4 x 4096^2 = 67,108,864 (MHA: q, k, v, o all 4096 x 4096);
    # MLP 3 x 4096 x 11008 = 135,266,304; so 202,375,168 x 32 layers = 6,476,005,376;
    # LM head 32000 x 4096 = 131,072,000.
    assert matmul_params(load("llama2_7b")) == 6_476_005_376 + 131_072_000


def test_llama3_8b_gqa_count_by_hand():
    # q and o 4096 x 4096 each, k and v 4096 x (8 x 128) each: 41,943,040; MLP
    # 3 x 4096 x 14336 = 176,160,768; (41,943,040 + 176,160,768) x 32 layers =
    # 6,979,321,856; LM head 128256 x 4096 = 525,336,576.
    assert matmul_params(load("llama3_8b")) == 6_979_321_856 + 525_336_576


def test_qwen2_5_non_embedding_count_matches_model_card():
    # The model card's "non-embedding" count (6.53B) leaves out both the embedding and
    # the (untied) LM head: that is our count minus the LM head.
    config = load("qwen2_5_7b")
    layers_only = matmul_params(config) - config.vocab_size * config.hidden_size
    assert layers_only == pytest.approx(6.53e9, rel=0.005)


# ---- real document lengths ----------------------------------------------------------


def sample(length: int) -> SFTSample:
    # All tokens are assistant targets (region kind 2 is not needed for lengths).
    return SFTSample(tokens=np.arange(1, length + 1), regions=np.zeros((0, 3), np.int64))


LENGTHS = np.array([0, 5, 3, 7, 2])  # global id -> length


def build(plan: MicroBatchPlan, pad_to_multiple_of: int = 1):
    builder = MicroBatchBuilder(lambda i: sample(int(LENGTHS[i])), pad_to_multiple_of)
    return builder.build(plan)


def test_document_lengths_leave_out_the_pad_document():
    mb = build(MicroBatchPlan(np.array([1, 3]), np.ones(2)), pad_to_multiple_of=8)
    assert mb.cu_seqlens.tolist() == [0, 5, 12, 16]  # 4-token pad document at the end
    assert document_lengths_from(mb).tolist() == [5, 7]


def test_document_lengths_of_an_empty_micro_batch():
    mb = build(MicroBatchPlan(np.zeros(0, np.int64), np.zeros(0)), pad_to_multiple_of=8)
    assert mb.num_documents == 1  # one zero-weight pad document
    assert document_lengths_from(mb).tolist() == []


def test_naive_padding_needs_sample_lengths():
    mb = build(MicroBatchPlan(np.array([3, 2]), np.ones(2), pad_to=7))
    assert mb.cu_seqlens.tolist() == [0, 7, 14]  # the 3-token sample padded to 7
    with pytest.raises(ValueError, match="sample_lengths=planner.lengths"):
        document_lengths_from(mb)
    assert document_lengths_from(mb, LENGTHS).tolist() == [7, 3]


def hand_batch() -> GlobalBatch:
    plans = [
        [MicroBatchPlan(np.array([1, 2]), np.ones(2)), MicroBatchPlan(np.array([4]), np.ones(1))],
        [
            MicroBatchPlan(np.array([3]), np.ones(1)),
            MicroBatchPlan(np.zeros(0, np.int64), np.zeros(0)),
        ],
    ]
    return GlobalBatch(
        epoch=0,
        step=0,
        micro_batches=plans,
        rank_costs=np.array([1.0, 1.0]),
        num_samples=4,
        num_sequences=4,
        real_tokens=5 + 3 + 2 + 7,
        target_tokens=0,
    )


def test_batch_document_lengths_cover_all_ranks():
    assert sorted(batch_document_lengths(hand_batch(), LENGTHS).tolist()) == [2, 3, 5, 7]


def test_packing_efficiency_is_fill_of_the_token_budget():
    # 17 real tokens in 4 micro-batches of 1 x 8 tokens: 17 / 32.
    assert packing_efficiency(17, 4, 1, 8) == 17 / 32
    assert batch_packing_efficiency(hand_batch(), micro_batch_size=1, seq_length=8) == 17 / 32
    assert packing_efficiency(0, 0, 1, 8) == 0.0
