"""Position ids: segment boundaries from regions, SkipAlign skips, per-document restart."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longalign.config.data import BOUNDARY_KINDS, SkipAlignConfig
from megatron_longalign.config.errors import raise_if_problems
from megatron_longalign.data.conversation import conversation_from_record
from megatron_longalign.data.encoding import SampleEncoder
from megatron_longalign.data.positions import (
    document_position_ids,
    sample_rng,
    segment_starts,
    skipalign_position_ids,
    skipalign_problems,
)
from megatron_longalign.data.templates import TEMPLATES, RegionKind, get_template
from tests.conftest import chat

T, S, U, A, C = (
    RegionKind.TEMPLATE,
    RegionKind.SYSTEM,
    RegionKind.USER,
    RegionKind.ASSISTANT,
    RegionKind.CONTEXT,
)


def regions_of(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int32)


# llama2-like: [INST] <<SYS>>, system, <</SYS>>, context, question, [/INST], answer, ...
LLAMA2_LIKE = regions_of(
    (0, 3, T), (3, 5, S), (5, 7, T), (7, 20, C), (20, 24, U), (24, 26, T),
    (26, 30, A), (30, 32, T), (32, 35, U), (35, 37, T), (37, 40, A),
)  # fmt: skip


# ---------------------------------------------------------------- segment_starts by hand


def test_turn_and_context_boundaries():
    assert segment_starts(LLAMA2_LIKE, ("turn", "context")).tolist() == [5, 20, 24, 30, 35]


def test_context_only():
    assert segment_starts(LLAMA2_LIKE, ("context",)).tolist() == [20]


def test_turn_only():
    # The system region's template row starts at 0: the first turn is never a boundary.
    assert segment_starts(LLAMA2_LIKE, ["turn"]).tolist() == [5, 24, 30, 35]


def test_no_boundary_kinds_gives_no_starts():
    assert segment_starts(LLAMA2_LIKE, ()).tolist() == []


def test_min_segment_tokens_drops_greedily_left_to_right():
    both = ("turn", "context")
    # Candidates 5, 20, 24, 30, 35 in a 40-token sample.
    assert segment_starts(LLAMA2_LIKE, both, min_segment_tokens=5).tolist() == [5, 20, 30, 35]
    # 5 is too close to 0, 24 to 20, and 35 to the end (40).
    assert segment_starts(LLAMA2_LIKE, both, min_segment_tokens=6).tolist() == [20, 30]
    assert segment_starts(LLAMA2_LIKE, both, min_segment_tokens=21).tolist() == []


def test_content_after_content_of_another_turn_is_a_turn_boundary():
    # plain template: "...A1</s>" is directly followed by "Q2" with no scaffolding.
    plain_like = regions_of(
        (0, 1, T), (1, 4, S), (4, 5, T), (5, 9, U), (9, 10, T),
        (10, 14, A), (14, 16, U), (16, 17, T), (17, 20, A),
    )  # fmt: skip
    assert segment_starts(plain_like, ["turn"]).tolist() == [4, 9, 14, 16]


def test_content_at_row_zero():
    # chatglm with a system prompt: the sample starts with content, not scaffolding.
    chatglm_like = regions_of(
        (0, 3, S), (3, 6, T), (6, 10, C), (10, 12, U), (12, 14, T), (14, 18, A)
    )
    assert segment_starts(chatglm_like, BOUNDARY_KINDS).tolist() == [3, 10, 12]


def test_context_without_following_question_is_not_a_context_boundary():
    regions = regions_of((0, 2, T), (2, 9, C), (9, 11, T), (11, 14, A))
    assert segment_starts(regions, ["context"]).tolist() == []


@pytest.mark.parametrize("regions", [np.zeros((0, 3), np.int32), regions_of((0, 7, U))])
def test_trivial_regions_have_no_starts(regions):
    assert segment_starts(regions, BOUNDARY_KINDS).tolist() == []


@pytest.mark.parametrize(
    ("regions", "boundaries", "match"),
    [
        (np.zeros((2, 2), np.int32), ["turn"], "shape"),
        (regions_of((0, 3, T), (4, 6, U)), ["turn"], "tile"),
        (regions_of((1, 3, T), (3, 6, U)), ["turn"], "tile"),
        (regions_of((0, 3, T), (3, 3, U)), ["turn"], "tile"),
        (LLAMA2_LIKE, ["turns"], "unknown boundary"),
        (LLAMA2_LIKE, "turn", "not a string"),
    ],
)
def test_segment_starts_rejects_bad_input(regions, boundaries, match):
    with pytest.raises(ValueError, match=match):
        segment_starts(regions, boundaries)


# ------------------------------------------------------------------- real encoded samples

CONVERSATION = conversation_from_record(chat("Doc.\n\nQ1?", "A1", "Q2", "A2", system="SYS"))

# Written by hand from the boundary rules in docs/SKIPALIGN.md. Closing scaffolding of a
# system/user turn (e.g. "<|im_end|>\n") is template, so it travels with the next turn.
EXPECTED_SEGMENTS = {
    "llama2": [
        "<s>[INST] <<SYS>>\nSYS",
        "\n<</SYS>>\n\nDoc.\n\n",
        "Q1?",
        " [/INST] A1</s>",
        "<s>[INST] Q2",
        " [/INST] A2</s>",
    ],
    "llama3": [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nDoc.\n\n",
        "Q1?<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
    ],
    "chatml": [
        "<|im_start|>system\nSYS<|im_end|>",
        "\n<|im_start|>user\nDoc.\n\n",
        "Q1?<|im_end|>",
        "\n<|im_start|>assistant\nA1<|im_end|>",
        "\n<|im_start|>user\nQ2<|im_end|>",
        "\n<|im_start|>assistant\nA2<|im_end|>\n",
    ],
    "chatglm": [
        "SYS",
        "\n\n[Round 1]\n\n问：Doc.\n\n",
        "Q1?",
        "\n\n答：A1</s>",
        "\n\n[Round 2]\n\n问：Q2",
        "\n\n答：A2</s>",
    ],
    "plain": ["<s>SYS", "\n\nDoc.\n\n", "Q1?", "\n\nA1</s>", "Q2", "\n\nA2</s>"],
}


def segment_texts(tokenizer, tokens: np.ndarray, starts: np.ndarray) -> list[str]:
    # Decode prefixes and take differences, so no tokenizer ever decodes a slice that
    # starts mid-sample (where a leading-space piece could be rendered differently).
    cuts = [0, *starts.tolist(), len(tokens)]
    prefixes = [tokenizer.decode(tokens[:cut].tolist()) for cut in cuts]
    return [b[len(a) :] for a, b in zip(prefixes, prefixes[1:], strict=False)]


def test_every_template_has_expected_segments():
    assert set(EXPECTED_SEGMENTS) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_segments_of_encoded_samples(name, any_tokenizer):
    sample = SampleEncoder(any_tokenizer, get_template(name)).encode(CONVERSATION)
    starts = segment_starts(sample.regions, BOUNDARY_KINDS)
    assert segment_texts(any_tokenizer, sample.tokens, starts) == EXPECTED_SEGMENTS[name]

    (question,) = segment_starts(sample.regions, ["context"]).tolist()
    user_starts = sample.regions[sample.regions[:, 2] == U, 0].tolist()
    assert question == user_starts[0], "the context boundary is the question's first token"
    assert any_tokenizer.decode(sample.tokens[:question].tolist()).endswith("Doc.\n\n")
    assert any_tokenizer.decode(sample.tokens[question:].tolist()).startswith("Q1?")

    # Skips land exactly there: positions are contiguous except at those starts.
    config = SkipAlignConfig(enabled=True, target_context_length=100_000)
    positions = skipalign_position_ids(len(sample), sample.regions, config, sample_rng(0, 0, 7))
    jumps = np.flatnonzero(np.diff(positions) != 1) + 1
    assert set(jumps.tolist()) <= set(starts.tolist())
    assert positions[-1] < 100_000


# ------------------------------------------------------------------------ properties


@st.composite
def random_regions(draw) -> np.ndarray:
    """Valid region arrays: tiling [0, T), non-empty rows, adjacent kinds different."""
    rows = draw(
        st.lists(st.tuples(st.integers(1, 30), st.sampled_from(list(RegionKind))), max_size=14)
    )
    out: list[list[int]] = []
    end = 0
    for size, kind in rows:
        if out and out[-1][2] == kind:
            out[-1][1] += size  # the encoder merges adjacent pieces of one kind
        else:
            out.append([end, end + size, int(kind)])
        end += size
    return np.asarray(out, dtype=np.int32).reshape(-1, 3)


def random_config(draw, enabled: bool = True) -> SkipAlignConfig:
    return SkipAlignConfig(
        enabled=enabled,
        target_context_length=draw(st.integers(2, 2_000)),
        boundaries=tuple(draw(st.sets(st.sampled_from(BOUNDARY_KINDS), min_size=1))),
        min_segment_tokens=draw(st.integers(1, 40)),
    )


def length_of(regions: np.ndarray) -> int:
    return int(regions[-1, 1]) if len(regions) else 0


@settings(max_examples=300, deadline=None)
@given(regions=random_regions(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_skipalign_invariants(regions, data, seed):
    config = random_config(data.draw)
    length = length_of(regions)
    positions = skipalign_position_ids(length, regions, config, np.random.default_rng(seed))
    assert positions.dtype == np.int64 and positions.shape == (length,)
    if length >= config.target_context_length:
        assert positions.tolist() == list(range(length))
        return
    if length:
        assert positions[0] == 0
        assert positions[-1] < config.target_context_length
    starts = segment_starts(regions, config.boundaries, config.min_segment_tokens)
    diffs = np.diff(positions)
    at_boundary = np.zeros(len(diffs), dtype=bool)
    at_boundary[starts - 1] = True
    assert (diffs[~at_boundary] == 1).all(), "contiguous inside a segment"
    assert (diffs[at_boundary] >= 1).all(), "never backwards at a boundary"


@settings(max_examples=200, deadline=None)
@given(regions=random_regions(), min_tokens=st.integers(1, 40))
def test_segment_starts_invariants(regions, min_tokens):
    starts = segment_starts(regions, BOUNDARY_KINDS, min_tokens)
    length = length_of(regions)
    assert starts.dtype == np.int64
    assert (np.diff(starts) > 0).all() and (starts > 0).all()
    assert set(starts.tolist()) <= set(regions[:, 0].tolist())
    segment_sizes = np.diff([0, *starts.tolist(), length])
    if len(starts):
        assert segment_sizes.min() >= min_tokens
    # Dropping boundaries only ever removes candidates.
    assert set(starts.tolist()) <= set(segment_starts(regions, BOUNDARY_KINDS).tolist())


@settings(max_examples=100, deadline=None)
@given(regions=random_regions(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_disabled_or_never_selected_is_arange(regions, data, seed):
    length = length_of(regions)
    disabled = random_config(data.draw, enabled=False)
    never = SkipAlignConfig(enabled=True, probability=0.0, target_context_length=10**6)
    for config in (disabled, never):
        positions = skipalign_position_ids(length, regions, config, np.random.default_rng(seed))
        assert positions.tolist() == list(range(length))


@settings(max_examples=100, deadline=None)
@given(regions=random_regions(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_positions(regions, data, seed):
    config = random_config(data.draw)
    length = length_of(regions)
    first = skipalign_position_ids(length, regions, config, sample_rng(seed, 1, 2))
    again = skipalign_position_ids(length, regions, config, sample_rng(seed, 1, 2))
    np.testing.assert_array_equal(first, again)


@settings(max_examples=100, deadline=None)
@given(regions=random_regions(), seed=st.integers(0, 2**32 - 1))
def test_raising_probability_keeps_selected_samples_unchanged(regions, seed):
    length = length_of(regions)
    low = SkipAlignConfig(enabled=True, probability=0.3, target_context_length=5_000)
    high = SkipAlignConfig(enabled=True, probability=0.8, target_context_length=5_000)
    at_low = skipalign_position_ids(length, regions, low, np.random.default_rng(seed))
    at_high = skipalign_position_ids(length, regions, high, np.random.default_rng(seed))
    if not np.array_equal(at_low, np.arange(length)):
        np.testing.assert_array_equal(at_low, at_high)


# ------------------------------------------------------------- determinism and distribution

# 10 turns of 10 tokens (5 scaffolding + 5 user): turn boundaries at 10, 20, ..., 90.
TEN_SEGMENTS = np.asarray([[i * 5, i * 5 + 5, (T, U)[i % 2]] for i in range(20)], dtype=np.int32)


def shifts_at_boundaries(positions: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return positions[starts] - starts


def test_different_samples_get_different_skips():
    config = SkipAlignConfig(enabled=True, target_context_length=65_536)
    draws = {
        skipalign_position_ids(100, TEN_SEGMENTS, config, sample_rng(3, 0, i)).tobytes()
        for i in range(50)
    }
    assert len(draws) == 50
    by_epoch = {
        skipalign_position_ids(100, TEN_SEGMENTS, config, sample_rng(3, e, 0)).tobytes()
        for e in range(10)
    }
    assert len(by_epoch) == 10


def test_sample_rng_is_deterministic_and_validated():
    assert sample_rng(1, 2, 3).integers(0, 2**62) == sample_rng(1, 2, 3).integers(0, 2**62)
    assert sample_rng(1, 2, 3).integers(0, 2**62) != sample_rng(1, 3, 2).integers(0, 2**62)
    for bad in ((-1, 0, 0), (0, -1, 0), (0, 0, 1.5)):
        with pytest.raises(ValueError, match="non-negative integer"):
            sample_rng(*bad)


def test_one_boundary_offset_is_uniform():
    regions = regions_of((0, 60, C), (60, 100, U))  # one context boundary at 60
    slack = 1_000
    config = SkipAlignConfig(enabled=True, target_context_length=100 + slack)
    offsets = np.asarray(
        [
            skipalign_position_ids(100, regions, config, sample_rng(11, 0, i))[60] - 60
            for i in range(4_000)
        ]
    )
    assert offsets.min() >= 0 and offsets.max() <= slack
    assert abs(offsets.mean() - slack / 2) < 0.05 * slack / 2
    # Uniform on {0..S} has variance ((S+1)^2 - 1) / 12.
    assert abs(offsets.var() / (((slack + 1) ** 2 - 1) / 12) - 1) < 0.1


def test_offset_support_includes_both_ends():
    regions = regions_of((0, 6, C), (6, 10, U))
    config = SkipAlignConfig(enabled=True, target_context_length=13)  # slack 3
    rng = np.random.default_rng(5)
    positions = [skipalign_position_ids(10, regions, config, rng) for _ in range(4_000)]
    counts = np.bincount([p[6] - 6 for p in positions], minlength=4)
    assert len(counts) == 4
    assert np.all(np.abs(counts / 4_000 - 0.25) < 0.03)
    assert max(p[-1] for p in positions) == 12  # target_context_length - 1 is reachable


def test_sorted_offsets_have_order_statistic_means():
    # k uniform draws on {0..S}, sorted: the j-th has mean about j*S/(k+1).
    config = SkipAlignConfig(enabled=True, target_context_length=2_100)
    starts = segment_starts(TEN_SEGMENTS[:8], ["turn"])  # 40 tokens, boundaries 10, 20, 30
    assert starts.tolist() == [10, 20, 30]
    slack = 2_100 - 40
    shifts = np.asarray(
        [
            shifts_at_boundaries(
                skipalign_position_ids(40, TEN_SEGMENTS[:8], config, sample_rng(2, 0, i)), starts
            )
            for i in range(3_000)
        ]
    )
    expected = np.arange(1, 4) * slack / 4
    np.testing.assert_allclose(shifts.mean(axis=0), expected, rtol=0.05)


def test_probability_selects_that_fraction():
    config = SkipAlignConfig(enabled=True, probability=0.25, target_context_length=1_000)
    selected = [
        not np.array_equal(
            skipalign_position_ids(100, TEN_SEGMENTS, config, sample_rng(0, 0, i)), np.arange(100)
        )
        for i in range(2_000)
    ]
    assert abs(np.mean(selected) - 0.25) < 0.03


def test_worked_example_from_docs():
    # docs/SKIPALIGN.md: 900-token document, 100-token question, 200-token answer.
    regions = regions_of((0, 900, C), (900, 995, U), (995, 1000, T), (1000, 1200, A))
    config = SkipAlignConfig(enabled=True, target_context_length=65_536)
    starts = segment_starts(regions, config.boundaries)
    assert starts.tolist() == [900, 995]
    positions = skipalign_position_ids(1_200, regions, config, sample_rng(0, 0, 0))
    o1, o2 = shifts_at_boundaries(positions, starts).tolist()
    assert 0 <= o1 <= o2 <= 65_536 - 1_200
    assert positions[:900].tolist() == list(range(900))
    assert positions[900:995].tolist() == list(range(900 + o1, 995 + o1))
    assert positions[995:].tolist() == list(range(995 + o2, 1_200 + o2))


def test_regions_must_match_length():
    config = SkipAlignConfig(enabled=True)
    with pytest.raises(ValueError, match="regions end at 40"):
        skipalign_position_ids(41, LLAMA2_LIKE, config, sample_rng(0, 0, 0))


def test_long_sample_is_left_alone():
    config = SkipAlignConfig(enabled=True, target_context_length=40)
    positions = skipalign_position_ids(40, LLAMA2_LIKE, config, sample_rng(0, 0, 0))
    assert positions.tolist() == list(range(40))


# ------------------------------------------------------------------ document positions


def test_document_position_ids():
    assert document_position_ids([3, 2]).tolist() == [0, 1, 2, 0, 1]
    assert document_position_ids([1, 0, 4]).tolist() == [0, 0, 1, 2, 3]
    assert document_position_ids([]).tolist() == []
    assert document_position_ids([3, 2]).dtype == np.int64
    with pytest.raises(ValueError, match=">= 0"):
        document_position_ids([2, -1])


# -------------------------------------------------------------------------- config


def test_default_config_is_valid_and_disabled():
    config = SkipAlignConfig()
    raise_if_problems(skipalign_problems(config))
    assert not config.enabled and config.boundaries == BOUNDARY_KINDS


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"target_context_length": 1}, "target_context_length must be an integer >= 2"),
        ({"target_context_length": 4096.0}, "target_context_length"),
        ({"target_context_length": True}, "target_context_length"),
        ({"probability": 1.5}, r"probability must be a number in \[0, 1\]"),
        ({"probability": -0.1}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"min_segment_tokens": 0}, "min_segment_tokens must be an integer >= 1"),
        ({"boundaries": ("turn", "paragraph")}, r"unknown boundary kind\(s\) \['paragraph'\]"),
        ({"boundaries": "turn"}, "not a string"),
        ({"enabled": True, "boundaries": ()}, "no sample would ever get a skip"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        raise_if_problems(skipalign_problems(SkipAlignConfig(**changes)))


def test_empty_boundaries_allowed_when_disabled():
    raise_if_problems(skipalign_problems(SkipAlignConfig(enabled=False, boundaries=())))
