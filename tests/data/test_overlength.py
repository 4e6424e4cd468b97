"""Truncation keeps every surviving token's region kind (so its loss mask) unchanged."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from megatron_longalign.data.encoding import EncodedSample
from megatron_longalign.data.overlength import kept_ranges, truncate


@st.composite
def samples(draw):
    sizes = draw(st.lists(st.integers(1, 20), min_size=1, max_size=12))
    kinds = draw(st.lists(st.integers(0, 4), min_size=len(sizes), max_size=len(sizes)))
    ends = np.cumsum(sizes)
    regions = np.stack([ends - np.asarray(sizes), ends, kinds], axis=1).astype(np.int32)
    tokens = np.arange(int(ends[-1]), dtype=np.int32) + 100
    return EncodedSample(tokens, regions)


def per_token_kind(sample: EncodedSample) -> np.ndarray:
    kinds = np.full(len(sample), -1)
    for start, end, kind in sample.regions.tolist():
        kinds[start:end] = kind
    return kinds


@given(
    sample=samples(), data=st.data(), policy=st.sampled_from(["truncate-left", "truncate-middle"])
)
def test_truncation_preserves_token_kinds(sample, data, policy):
    limit = data.draw(st.integers(2, max(2, len(sample) - 1)))
    if len(sample) <= limit:
        return
    out = truncate(sample, limit, policy)
    assert len(out) == limit
    keep = np.concatenate([np.arange(a, b) for a, b in kept_ranges(len(sample), limit, policy)])
    np.testing.assert_array_equal(out.tokens, sample.tokens[keep])
    np.testing.assert_array_equal(per_token_kind(out), per_token_kind(sample)[keep])
    regions = out.regions
    assert regions[0, 0] == 0 and regions[-1, 1] == limit
    assert (regions[1:, 0] == regions[:-1, 1]).all()
