"""Streaming: peak memory does not grow with the input size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_longalign.devdata.synthetic import generate_long_samples
from tests.conftest import REPO

# Runs one preprocessing job in a fresh interpreter and prints its peak RSS in MB.
# Its own peak (VmHWM): ru_maxrss would report pytest's peak when that is larger, and
# the comparison below would then pass whatever preprocessing holds.
_JOB = """
import sys
from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
from megatron_longalign.utils.memory import peak_rss_bytes
data, prefix, tokenizer = sys.argv[1:4]
spec = EncodeSpec(tokenizer, "llama2")
preprocess(PreprocessConfig((data,), prefix, spec, workers=1, progress=False))
print(peak_rss_bytes() / 2**20)
"""


def _peak_rss_mb(data, prefix, tokenizer) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _JOB, str(data), str(prefix), str(tokenizer)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_flat_in_input_size(tmp_path, sp_model):
    lines = [json.dumps(r) for r in generate_long_samples(8, 3000, 6000, seed=5)]
    block = ("\n".join(lines) + "\n").encode()
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_bytes(block * 4)
    large.write_bytes(block * 160)
    assert large.stat().st_size > 40e6
    rss_small = _peak_rss_mb(small, tmp_path / "s" / "ds", sp_model)
    rss_large = _peak_rss_mb(large, tmp_path / "l" / "ds", sp_model)
    grown_input_mb = (large.stat().st_size - small.stat().st_size) / 1e6
    # A non-streaming pipeline would hold the extra input (and its tokens) at once.
    print(
        f"peak RSS {rss_small:.0f} MB -> {rss_large:.0f} MB for +{grown_input_mb:.0f} MB of input"
    )
    assert rss_large - rss_small < 0.25 * grown_input_mb, (rss_small, rss_large, grown_input_mb)
