"""From raw documents to a trained model: a directory of text files -> tools/
self_instruct.py (against a local OpenAI-compatible stub) -> tools/preprocess.py ->
two training steps of the tiny test model (CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from megatron_longalign.data.indexed import open_dataset_files
from megatron_longalign.training.trainer import Trainer
from tests.datagen.conftest import english_text
from tests.datagen.fake_model import FakeModel
from tests.helpers.openai_server import OpenAIStub
from tests.helpers.tiny_training import tiny_training_config

REPO = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def teardown_distributed():
    yield
    from megatron_longalign.parallel.distributed import destroy_distributed

    destroy_distributed()


def test_documents_to_samples_to_preprocessed_set_to_two_training_steps(
    tmp_path, sp_model, teardown_distributed, capsys
):
    docs = tmp_path / "documents"
    docs.mkdir()
    for i in range(6):
        (docs / f"doc{i}.txt").write_text(english_text(f"DOC{i}", 120 + 40 * i, seed=i) + "\n")
    samples = tmp_path / "gen" / "samples.jsonl"
    with OpenAIStub(FakeModel()) as server:
        code = load_tool("self_instruct").main([
            "--input", str(docs), "--output", str(samples), "--base-url", server.base_url,
            "--model", "stub-generator", "--tokenizer", sp_model, "--min-tokens", "50",
            "--max-tokens", "900", "--seed", "3", "--no-progress",
        ])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["meta"]["document_id"] for r in records) == [f"doc{i}.txt" for i in range(6)]

    prefix = tmp_path / "data" / "generated"
    code = load_tool("preprocess").main([
        "--input", str(samples), "--tokenizer", sp_model, "--template", "llama3",
        "--output-prefix", str(prefix), "--max-length", "1024", "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    files = open_dataset_files(str(prefix), verify=True)
    assert files.lengths.size == 6  # every generated sample became a training sample

    history = Trainer(tiny_training_config({"generated": str(prefix)}, max_steps=2)).train()
    assert [r.step for r in history] == [1, 2] and not any(r.skipped for r in history)
    assert all(math.isfinite(r.loss) and r.loss > 0 and r.target_tokens > 0 for r in history)
