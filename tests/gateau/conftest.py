"""A small mixed preprocessed set: long samples with a context region, short chats
without one, and one rejected line (so source lines are not just index + 1)."""

from __future__ import annotations

import random

import pytest

from megatron_longalign.gateau.documents import DocumentConfig
from megatron_longalign.gateau.runner import RunOptions
from tests.conftest import write_lines
from tests.gateau.fake_engine import FakeEngine


@pytest.fixture(scope="session")
def mixed_prefix(tmp_path_factory, sp_model) -> str:
    from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
    from megatron_longalign.devdata.synthetic import generate_long_samples, generate_short_chats

    root = tmp_path_factory.mktemp("gateau_data")
    records = list(generate_long_samples(7, 60, 400, seed=3)) + list(
        generate_short_chats(5, seed=4)
    )
    random.Random(0).shuffle(records)
    lines = records[:4] + ["{not json"] + records[4:]
    write_lines(root / "mixed.jsonl", lines)
    prefix = str(root / "mixed")
    preprocess(
        PreprocessConfig(
            inputs=(str(root / "mixed.jsonl"),),
            output_prefix=prefix,
            spec=EncodeSpec(sp_model, "llama3"),
            skip_bad=True,
            progress=False,
        )
    )
    return prefix


def engines(prefix: str, fail_after: int | None = None) -> tuple[FakeEngine, FakeEngine]:
    from megatron_longalign.data.indexed import read_metadata

    fingerprint = read_metadata(prefix)["tokenizer"]["sha256"]
    return (
        FakeEngine(2.0, fingerprint),
        FakeEngine(0.5, fingerprint, fail_after_documents=fail_after),
    )


# Small batches: many engine calls and flushes, so a kill lands mid-run.
OPTIONS = RunOptions(documents=DocumentConfig(segment_tokens=32), batch_tokens=600, progress=False)
