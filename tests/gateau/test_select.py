"""`select`: the top-k by score (ties by index), written as a preprocessed set that
opens and trains."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_longalign.data.indexed import SFTIndexedDataset
from megatron_longalign.gateau.runner import score_prefix
from megatron_longalign.gateau.select import SelectError, select, selection_size, top_indices
from megatron_longalign.utils.atomic_files import file_digest
from tests.gateau.conftest import OPTIONS, engines

pytestmark = pytest.mark.usefixtures("distributed_teardown")


@pytest.fixture(scope="module")
def distributed_teardown():
    yield
    from megatron_longalign.parallel.distributed import destroy_distributed

    destroy_distributed()


def test_top_indices_ties_by_index_and_nan_never_chosen():
    scores = np.array([0.5, 0.9, np.nan, 0.9, 0.1, 0.5])
    assert top_indices(scores, 1).tolist() == [1]
    assert top_indices(scores, 3).tolist() == [0, 1, 3]  # 0.5 tie: index 0 before 5
    assert top_indices(scores, 10).tolist() == [0, 1, 3, 4, 5]
    assert selection_size(10, ratio=0.3) == 3 and selection_size(12, ratio=0.1) == 1
    assert selection_size(3, ratio=0.01) == 1 and selection_size(10, top_k=4) == 4
    with pytest.raises(SelectError, match="exactly one"):
        selection_size(10, top_k=2, ratio=0.5)


def test_select_writes_the_top_k_that_trains(mixed_prefix, tmp_path):
    score_prefix(mixed_prefix, *engines(mixed_prefix), tmp_path / "run", options=OPTIONS)
    scores_path = tmp_path / "run" / "scores.jsonl"
    records = [json.loads(line) for line in scores_path.read_text().splitlines()]
    by_score = sorted(records, key=lambda r: (-r["score"], r["index"]))
    expected = sorted(r["index"] for r in by_score[:4])
    out = str(tmp_path / "selected")
    selection = select(mixed_prefix, scores_path, out, top_k=4)
    assert selection.indices.tolist() == expected
    source, chosen = SFTIndexedDataset(mixed_prefix), SFTIndexedDataset(out, verify=True)
    assert len(chosen) == 4
    for k, index in enumerate(expected):  # original order, same tokens and regions
        assert chosen[k].tokens.tolist() == source[index].tokens.tolist()
        assert chosen[k].regions.tolist() == source[index].regions.tolist()
    meta = chosen.metadata
    assert meta["tokenizer"] == source.metadata["tokenizer"]
    assert meta["selection"]["scores_sha256"] == file_digest(scores_path)[1]
    assert meta["selection"]["alpha"] == 0.8 and meta["selection"]["top_k"] == 4
    assert meta["selection"]["source_tag"] == source.metadata["tag"]
    with pytest.raises(SelectError, match="exists"):
        select(mixed_prefix, scores_path, out, ratio=0.5)
    ratio = select(mixed_prefix, scores_path, out, ratio=0.5, overwrite=True)
    assert ratio.indices.size == 6 and ratio.metadata["selection"]["ratio"] == 0.5

    from megatron_longalign.training.trainer import Trainer
    from tests.helpers.tiny_training import tiny_training_config

    config = tiny_training_config({"selected": out}, max_steps=2, seq_length=2048)
    history = Trainer(config).train()
    assert [r.step for r in history] == [1, 2]
    assert all(np.isfinite(r.loss) and r.target_tokens > 0 for r in history)


def test_scores_of_another_set_are_refused(mixed_prefix, sample_prefixes, tmp_path):
    score_prefix(mixed_prefix, *engines(mixed_prefix), tmp_path / "run", options=OPTIONS)
    with pytest.raises(SelectError, match="scores 12 of the set's"):
        select(
            sample_prefixes["short"],
            tmp_path / "run" / "scores.jsonl",
            str(tmp_path / "s"),
            top_k=1,
        )
