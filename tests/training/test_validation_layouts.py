"""Validation at TP2, PP2, CP2 and DP2 (torchrun, gloo, CPU; one launch of two processes,
workers/valid_run.py) gives the single-process values of the same weights on the same
validation set: the loss (the set's own weights make it independent of the batching,
so CP's padded packs and DP's split agree too), the token mean and loss by length."""

from __future__ import annotations

import json

import pytest

from tests.helpers.launch import WORKERS, run_and_read
from tests.training.test_validation import validation_trainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("distributed_teardown")]

VALID_RUN = WORKERS.parents[1] / "training" / "workers" / "valid_run.py"
# fp32 sums in another order (micro-batches, ranks, TP partial sums) differ by ~1e-7
# relative; a lost or doubled reduction is off by far more.
RTOL = 1e-5


def test_validation_at_every_layout_matches_one_process(sample_prefixes, tmp_path):
    data_file = tmp_path / "prefixes.json"
    data_file.write_text(json.dumps(sample_prefixes))
    ranks = run_and_read(
        str(VALID_RUN), 2, tmp_path / "out", ["--data", str(data_file)], timeout=400
    )
    want = validation_trainer(sample_prefixes).validate()
    assert want["valid/sequences"] > 8 and any("loss_by_len" in k for k in want)
    expected_layouts = {"tp2": [2, 1, 1], "pp2": [1, 2, 1], "cp2": [1, 1, 2], "dp2": [1, 1, 1]}
    for rank in ranks:
        for name, layout in expected_layouts.items():
            result = rank[name]
            assert result["layout"] == layout
            assert result["dp_size"] == (2 if name == "dp2" else 1)
            got = result["metrics"]
            assert got.keys() == want.keys(), name
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=RTOL), (name, key)
    # DP2 really split the set: two micro-batches per rank instead of four.
    assert ranks[0]["dp2"]["micro_batches"] == 2 and ranks[0]["tp2"]["micro_batches"] == 4
