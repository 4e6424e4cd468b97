"""The documents built for one sample: segments, short documents, probe fields, model A's
left truncation, and samples without context or response."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_longalign.data.templates import RegionKind as K
from megatron_longalign.gateau.documents import (
    DocumentConfig,
    context_segments,
    left_truncate,
    sample_documents,
)

# 0-1 template, 2-9 context, 10-12 question, 13-14 template, 15-19 response.
TOKENS = np.arange(100, 120)
REGIONS = np.array(
    [[0, 2, K.TEMPLATE], [2, 10, K.CONTEXT], [10, 13, K.USER], [13, 15, K.TEMPLATE],
     [15, 20, K.ASSISTANT]]
)  # fmt: skip


def test_segments_split_each_context_region_and_never_span_two():
    regions = np.array([[0, 5, K.CONTEXT], [5, 7, K.USER], [7, 10, K.CONTEXT]])
    assert context_segments(regions, 2) == [(0, 2), (2, 4), (4, 5), (7, 9), (9, 10)]
    assert context_segments(regions, 128) == [(0, 5), (7, 10)]
    assert context_segments(np.array([[0, 5, K.USER]]), 2) == []


def test_short_documents_are_segment_plus_question_plus_response():
    docs = sample_documents(7, TOKENS, REGIONS, DocumentConfig(segment_tokens=3))
    assert docs.index == 7 and docs.segments == [(2, 5), (5, 8), (8, 10)]
    expected = [
        [100, 101, 102, 103, 104, *range(110, 120)],
        [100, 101, 105, 106, 107, *range(110, 120)],
        [100, 101, 108, 109, *range(110, 120)],
    ]
    assert [d.tokens.tolist() for d in docs.segment_docs] == expected
    for doc in docs.segment_docs:
        assert doc.loss_mask.tolist() == [False] * (doc.tokens.size - 5) + [True] * 5
        assert doc.probe_query_mask is None
    # B's full document carries the probe: response rows, segment ids on context keys.
    full = docs.full_b
    assert full.tokens.tolist() == TOKENS.tolist()
    assert full.probe_query_mask.tolist() == [False] * 15 + [True] * 5
    assert full.probe_segments.tolist() == [-1, -1, 0, 0, 0, 1, 1, 1, 2, 2] + [-1] * 10
    assert full.num_segments == 3
    assert docs.full_a.tokens.tolist() == TOKENS.tolist() and docs.full_a.probe_query_mask is None


def test_model_a_is_left_truncated_to_its_window_but_keeps_the_response():
    mask = np.zeros(20, dtype=bool)
    mask[15:] = True
    assert left_truncate(TOKENS, mask, None) == 0
    assert left_truncate(TOKENS, mask, 20) == 0
    assert left_truncate(TOKENS, mask, 12) == 8
    assert left_truncate(TOKENS, mask, 3) == 15  # the response (5 tokens) is never cut
    docs = sample_documents(0, TOKENS, REGIONS, DocumentConfig(window_a=12))
    assert docs.full_a.tokens.tolist() == list(range(108, 120))
    assert docs.full_a.loss_mask.sum() == 5
    assert docs.full_b.tokens.size == 20  # B always sees everything


def test_no_context_means_no_segments_and_no_probe():
    regions = np.array([[0, 15, K.USER], [15, 20, K.ASSISTANT]])
    docs = sample_documents(1, TOKENS, regions, DocumentConfig())
    assert docs.scorable and not docs.has_context and docs.segment_docs == []
    assert docs.full_b.probe_query_mask is None and docs.full_b.num_segments == 0


def test_no_response_is_not_scorable_and_no_regions_is_an_error():
    regions = np.array([[0, 10, K.CONTEXT], [10, 20, K.USER]])
    assert not sample_documents(2, TOKENS, regions, DocumentConfig()).scorable
    with pytest.raises(ValueError, match="sample 3 has no regions"):
        sample_documents(3, TOKENS, np.zeros((0, 3), dtype=np.int32), DocumentConfig())
