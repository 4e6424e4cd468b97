"""Scoring a prefix with fake engines: values, no-CAM samples, source lines, DP2 == DP1,
kill-and-resume == uninterrupted, and the input checks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_longalign.data.indexed import SFTIndexedDataset
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.gateau.merge import merge_scores
from megatron_longalign.gateau.runner import GateauError, score_prefix, score_shard
from megatron_longalign.gateau.shards import ScoresFileError, assign_samples, shard_path
from megatron_longalign.gateau.sources import sample_sources
from tests.gateau.conftest import OPTIONS, engines
from tests.gateau.fake_engine import FakeEngine


def run_dp1(prefix, directory, **kwargs):
    return score_prefix(prefix, *engines(prefix), directory, options=OPTIONS, **kwargs)


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scores_file_values_no_cam_samples_and_sources(mixed_prefix, tmp_path):
    summary = run_dp1(mixed_prefix, tmp_path / "run")
    dataset = SFTIndexedDataset(mixed_prefix)
    records = read(tmp_path / "run" / "scores.jsonl")
    assert [r["index"] for r in records] == list(range(len(dataset))) == list(range(12))
    no_context = [
        i for i in range(12) if not (dataset[i].regions[:, 2] == RegionKind.CONTEXT).any()
    ]
    assert 1 <= len(no_context) < 12  # short chats (one of them quotes a paragraph)
    assert summary.without_cam == summary.without_context == len(no_context)
    assert summary.scored == 12
    for r in records:
        assert (r["cas"] is None) == (r["index"] in no_context) == (r["segments"] == 0)
        assert 0.0 <= r["score"] <= 1.0
    # PPL_B of a sample is exp(mean NLL over its response), as the fake engine defines it.
    _, engine_b = engines(mixed_prefix)
    sample = dataset[3]
    from megatron_longalign.gateau.engine_api import ScoringDocument

    doc = ScoringDocument(0, sample.tokens, sample.loss_mask)
    nll = engine_b.score([doc])[0].token_nll
    assert records[3]["ppl_b"] == pytest.approx(math.exp(np.nanmean(nll.astype(np.float64))))
    # A sample without CAM is scored by norm(HMG) alone; recompute one by hand.
    hmg = np.array([r["hmg"] for r in records])
    norm = (hmg - hmg.min()) / (hmg.max() - hmg.min())
    for i in no_context:
        assert records[i]["score"] == pytest.approx(norm[i], abs=1e-9)
    # Source lines skip the rejected line 5 of the input.
    lines = [r["source_line"] for r in records]
    assert lines == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13]
    assert sample_sources(dataset.files) is not None


def test_dp2_equals_dp1_and_shards_are_balanced(mixed_prefix, tmp_path):
    run_dp1(mixed_prefix, tmp_path / "dp1")
    dataset = SFTIndexedDataset(mixed_prefix)
    ranks = assign_samples(dataset.lengths, 2)
    assert sorted(np.concatenate(ranks).tolist()) == list(range(12))
    costs = [float((dataset.lengths[r].astype(float) ** 2).sum()) for r in ranks]
    assert min(costs) > 0.5 * max(costs)
    directory = tmp_path / "dp2"
    for rank in (1, 0):  # order does not matter
        engine_a, engine_b = engines(mixed_prefix)
        score_shard(dataset, engine_a, engine_b, directory, rank=rank, dp_size=2, options=OPTIONS)
    assert len(read(shard_path(directory, 0, 2))) == ranks[0].size
    merge_scores(directory, 12, OPTIONS.scores, sample_sources(dataset.files))
    dp1 = (tmp_path / "dp1" / "scores.jsonl").read_bytes()
    assert (directory / "scores.jsonl").read_bytes() == dp1


@pytest.mark.parametrize(("fail_after", "resume_dp"), [(1, 1), (60, 2), (150, 1), (250, 2)])
def test_kill_and_resume_gives_the_same_file(mixed_prefix, tmp_path, fail_after, resume_dp):
    run_dp1(mixed_prefix, tmp_path / "clean")
    directory = tmp_path / "killed"
    engine_a, engine_b = engines(mixed_prefix, fail_after=fail_after)
    with pytest.raises(RuntimeError, match="killed"):
        score_prefix(mixed_prefix, engine_a, engine_b, directory, options=OPTIONS)
    shard = shard_path(directory, 0, 1)
    done = len(read(shard)) if shard.exists() else 0
    assert done < 12
    with open(shard, "a") as f:  # a record cut by the kill
        f.write('{"index": 11, "tokens": 5, "nll_a": 0.')
    # Resume, also at another DP size: every rank skips what is done.
    dataset = SFTIndexedDataset(mixed_prefix)
    scored = 0
    for rank in range(resume_dp):
        a, b = engines(mixed_prefix)
        scored += score_shard(
            dataset, a, b, directory, rank=rank, dp_size=resume_dp, options=OPTIONS
        )
    assert scored == 12 - done
    merge_scores(directory, 12, OPTIONS.scores, sample_sources(dataset.files))
    clean = (tmp_path / "clean" / "scores.jsonl").read_bytes()
    assert (directory / "scores.jsonl").read_bytes() == clean
    # The cut line is ignored, and removed before the same shard is appended to.
    if resume_dp == 1:
        assert all(line.endswith("}") for line in shard.read_text().splitlines())


def test_resume_skips_finished_samples(mixed_prefix, tmp_path):
    run_dp1(mixed_prefix, tmp_path / "run")
    a, b = engines(mixed_prefix)
    assert (
        score_shard(SFTIndexedDataset(mixed_prefix), a, b, tmp_path / "run", options=OPTIONS) == 0
    )
    assert a.documents == b.documents == 0


def test_merge_refuses_missing_samples(mixed_prefix, tmp_path):
    dataset = SFTIndexedDataset(mixed_prefix)
    a, b = engines(mixed_prefix)
    score_shard(dataset, a, b, tmp_path, rank=0, dp_size=2, options=OPTIONS)
    with pytest.raises(ScoresFileError, match="have no score yet"):
        merge_scores(tmp_path, 12, OPTIONS.scores)


def test_input_errors(mixed_prefix, tmp_path):
    a, b = engines(mixed_prefix)
    other = FakeEngine(0.5, "f" * 64)
    with pytest.raises(GateauError, match="not homologous"):
        score_prefix(mixed_prefix, a, other, tmp_path / "x", options=OPTIONS)
    with pytest.raises(GateauError, match="vocabulary 640 vs 1280"):
        score_prefix(mixed_prefix, a, FakeEngine(0.5, a.tokenizer_fingerprint, 1280), tmp_path)
    with pytest.raises(GateauError, match="re-preprocess the data with the models' tokenizer"):
        score_prefix(mixed_prefix, FakeEngine(1, "e" * 64), FakeEngine(1, "e" * 64), tmp_path)
    with pytest.raises(GateauError, match="more than the models' vocabulary"):
        score_prefix(mixed_prefix, FakeEngine(1, None, 100), FakeEngine(1, None, 100), tmp_path)
    # A rerun with other settings in the same directory is refused.
    run_dp1(mixed_prefix, tmp_path / "run")
    changed = OPTIONS.__class__(documents=OPTIONS.documents.__class__(segment_tokens=64))
    with pytest.raises(ScoresFileError, match="segment_tokens"):
        score_prefix(mixed_prefix, *engines(mixed_prefix), tmp_path / "run", options=changed)


def test_prefix_with_other_region_kinds_is_refused(mixed_prefix, tmp_path):
    copy = tmp_path / "copy"
    for path in SFTIndexedDataset(mixed_prefix).files.paths.values():
        shutil.copy(path, tmp_path / path.name)
    metadata = json.loads(Path(mixed_prefix + ".json").read_text())
    del metadata["region_kinds"]
    (tmp_path / "copy.json").write_text(json.dumps(metadata))
    with pytest.raises(GateauError, match="records region kinds none"):
        score_prefix(str(copy), *engines(mixed_prefix), tmp_path / "run", options=OPTIONS)
