"""checkpoint_io on CPU: save the tiny GPT at TP=2 in torch_dist format, load it back
at TP=2 and, resharded, at TP=1 (workers/checkpoint.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.launch import run_and_read

pytestmark = pytest.mark.slow


def test_save_tp2_load_tp2_and_tp1(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved_run = run_and_read(
        "checkpoint.py", 2, tmp_path / "tp2", ["--tp", "2", "--action", "save", "--ckpt", str(ckpt)]
    )
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in ckpt.glob("*.distcp"))  # DCP shard files
    assert (ckpt / ".metadata").is_file() and (ckpt / "common.pt").is_file()

    saved = saved_run[0]["saved"]
    assert len(saved) == 15
    assert saved_run[0]["loaded"] == saved  # exact: the same fp32 bytes came back

    resharded = run_and_read(
        "checkpoint.py", 1, tmp_path / "tp1", ["--action", "load", "--ckpt", str(ckpt)]
    )
    assert resharded[0]["loaded"] == saved


def test_load_refuses_incomplete_directory(tmp_path):
    from megatron_longalign.training.checkpoint_io import load_sharded

    with pytest.raises(FileNotFoundError, match="metadata.json"):
        load_sharded({}, tmp_path)
