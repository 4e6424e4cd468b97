"""The bundled demo data: reproducible from the repo's tools, and shaped as documented."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from megatron_longalign.data.indexed import SFTIndexedDataset
from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
from tests.conftest import REPO

SAMPLE = REPO / "data" / "sample"


def test_bundled_files_are_regenerated_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--output-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_tokenizer.py"),
            "--output",
            str(tmp_path / "tokenizer.model"),
        ],
        check=True,
        capture_output=True,
    )
    for name in ("long.jsonl.gz", "short_chat.jsonl.gz", "tokenizer.model"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_bundled_long_samples_span_1k_to_64k_tokens(tmp_path):
    lengths = {}
    for name in ("long", "short_chat"):
        config = PreprocessConfig(
            inputs=(str(SAMPLE / f"{name}.jsonl.gz"),),
            output_prefix=str(tmp_path / name),
            spec=EncodeSpec(str(SAMPLE / "tokenizer.model"), "llama2"),
            progress=False,
        )
        stats = preprocess(config)
        assert not stats.rejected and not stats.dropped
        lengths[name] = np.asarray(SFTIndexedDataset(str(tmp_path / name)).lengths)
    long, short = lengths["long"], lengths["short_chat"]
    assert len(long) == 48 and len(short) == 400
    assert 1000 <= long.min() < 2000, long.min()
    assert 32768 < long.max() <= 70000, long.max()
    assert short.max() < 1000
    # Spread over the range, not bunched: every power-of-two bucket 1k..32k is used.
    buckets = set(np.floor(np.log2(long)).astype(int).tolist())
    assert set(range(10, 16)) <= buckets
