"""bench/gateau_bench.py --quick end to end, in a subprocess: the demo data preprocessed, a
tiny model trained for one step, CAM importance scored packed and one forward per
segment, and the attention probe's memory against dense attention. Checks that the two
scoring methods agree, that packing runs fewer forwards and tokens, and that the probe
and dense attention give the same masses (timings are not asserted: shared machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gateau_bench_quick(tmp_path):
    out = tmp_path / "gateau.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gateau_bench.py"), "--quick",
         "--output-json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    scoring = data["scoring"]
    assert scoring["samples"] >= 2 and scoring["segment_documents"] > scoring["samples"]
    # Same model, same documents: the per-segment NLLs must agree (fp32).
    assert scoring["max_token_nll_diff"] < 1e-4, scoring
    assert scoring["max_mean_nll_diff"] < 1e-5, scoring
    assert scoring["nan_pattern_mismatches"] == 0, scoring
    passes, tokens = scoring["forward_passes"], scoring["forward_tokens"]
    assert passes["per_segment"] == scoring["segment_documents"]
    assert passes["packed"] < passes["per_segment"] / 4
    # Packed runs exactly the documents' tokens; per-segment adds its padding.
    assert tokens["packed"] == scoring["segment_document_tokens"]
    assert tokens["per_segment"] == scoring["segment_documents"] * scoring["pad_to"]
    assert tokens["per_segment"] > tokens["packed"]
    # The window emulation: per-segment's forwards plus one per padding chunk (the chunks
    # of window / segment_tokens past a sample's real segments); each padded to pad_to.
    assert scoring["padding_chunks"] > 0
    assert passes["window"] == passes["per_segment"] + scoring["padding_chunks"]
    assert tokens["window"] == passes["window"] * scoring["pad_to"]
    # 500 chunks per sample (a 64,000-token window) against ~15 real segments each.
    assert scoring["original_window_tokens"] > 10 * tokens["packed"]
    assert all(s > 0 for s in scoring["seconds"].values())
    rows = data["memory"]
    assert [r["length"] for r in rows] == [1024, 2048]
    for row in rows:
        assert "failed" not in row["probe"] and "failed" not in row["dense"], row
        assert row["mass_max_diff"] < 1e-6, row  # the probe equals dense softmax
    # Dense holds [H, L, L] fp32 twice: at L = 2048, H = 8 that is 256 MiB.
    longest = rows[-1]
    assert longest["dense"]["peak_above_baseline"] > 0.8 * 2 * 8 * 2048**2 * 4
    assert longest["dense"]["peak_above_baseline"] > 2 * longest["probe"]["peak_above_baseline"]
    assert "ratio per-segment / packed" in result.stdout
