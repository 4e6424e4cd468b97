"""The attention probe under context parallelism (torchrun, gloo, sdpa): each CP rank
measures its local query rows against the gathered keys, and `result(groups)` sums over
the CP (and TP) groups. Every rank must hold the CP = 1 result of the same micro-batch
(unpadded there, padded to 2 * CP under CP). workers/attention_probe.py runs the model;
the dense-reference checks are in tests/model/test_attention_probe.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.launch import run_and_read

pytestmark = pytest.mark.slow

LAYOUTS = {"cp2": (2, ["--cp", "2"]), "tp2cp2": (4, ["--tp", "2", "--cp", "2"])}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    (result,) = run_and_read("attention_probe.py", 1, tmp_path_factory.mktemp("cp1"), ["--cp", "1"])
    return result


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_probe_under_context_parallelism_equals_cp1(name, reference, tmp_path_factory):
    nproc, args = LAYOUTS[name]
    results = run_and_read("attention_probe.py", nproc, tmp_path_factory.mktemp(name), args)
    assert sorted(r["cp_rank"] for r in results) == sorted([0, 1] * (nproc // 2))
    # CP padded the documents, so the layouts differ but the real tokens do not.
    assert results[0]["layout"] != reference["layout"]
    for key in ("all", "layer2"):
        expected = np.array(reference[key], dtype=np.float64)
        # Sample 3 has no answer: its two segments are NaN; the others are real masses.
        assert np.isnan(expected[-2:]).all() and (expected[:-2] > 1e-3).all()
        for rank in results:
            np.testing.assert_allclose(np.array(rank[key]), expected, rtol=1e-6, atol=1e-9)
            # all-reduced: bitwise the same answer on every rank
            np.testing.assert_array_equal(np.array(rank[key]), np.array(results[0][key]))
    assert not np.allclose(reference["all"], reference["layer2"], equal_nan=True)
