"""TP = 2, CP = 2 and PP = 2 (torchrun, 2 processes each): the engine loads the TP = 1
import in that layout and every rank returns transformers' per-token NLL for packed
documents of unequal lengths (one longer than seq_length), in input order. Under CP each
document is split over both ranks (chunks r and 3 - r), so this checks the CP gather;
under PP the NLL is computed on the last stage and broadcast to the first. Some of the
documents are probed: their attention-to-segment masses equal transformers' eager
attention (heads split over TP, queries over CP, layers over PP, then summed)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.helpers.launch import REPO, read_rank_results, run_workers
from tests.scoring.conftest import (
    KEYS,
    PROBED,
    assert_mass_matches,
    assert_matches,
    reference_mass,
    with_segments,
)

pytestmark = pytest.mark.slow

WORKER = REPO / "tests" / "scoring" / "workers" / "score_layout.py"
LAYOUTS = {"tp2": (2, 1, 1), "cp2": (1, 2, 1), "pp2": (1, 1, 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_nll_and_mass_equal_transformers(
    layout, tmp_path, imported, hf_model, documents, references
):
    tp, cp, pp = LAYOUTS[layout]
    probed = with_segments(documents)
    spec = {
        "checkpoint": str(imported.output),
        "model_config": dataclasses.asdict(imported.model_config),
        "documents": [
            {
                "key": d.key,
                "tokens": d.tokens.tolist(),
                "loss_mask": d.loss_mask.tolist(),
                "position_ids": None if d.position_ids is None else d.position_ids.tolist(),
                **_probe_fields(d),
            }
            for d in probed
        ],
        "tp": tp,
        "cp": cp,
        "pp": pp,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "results"
    out.mkdir()
    run_workers(WORKER, 2, ["--out", str(out), "--spec", str(tmp_path / "spec.json")], 300)
    ranks = read_rank_results(out)
    assert len(ranks) == 2
    for rank in ranks:  # the same results on every rank of the replica
        assert [r["key"] for r in rank] == list(KEYS)
        for result, reference in zip(rank, references, strict=True):
            nll = np.array([np.nan if x is None else x for x in result["nll"]])
            assert_matches(nll, reference, (layout, result["key"]))
    for i, doc in enumerate(probed):
        expected = reference_mass(hf_model, doc) if i in PROBED else None
        for rank in ranks:
            mass = rank[i]["mass"]
            if expected is None:
                assert mass is None, (layout, doc.key)
            else:
                assert_mass_matches(np.array(mass), expected, (layout, doc.key))


def _probe_fields(doc) -> dict:
    if doc.probe_query_mask is None:
        return {}
    return {
        "probe_query_mask": doc.probe_query_mask.tolist(),
        "probe_segments": doc.probe_segments.tolist(),
        "num_segments": doc.num_segments,
    }
