"""GATEAU with the real scoring engine (the tiny imported HF Llama and its real tokenizer):

- the engine's tokenizer fingerprint is the one preprocessed data records, so data
  made with the model's own tokenizer passes gateau's input check and other data does not;
- packed segment-importance scoring (many [segment; question; response] documents per
  micro-batch, one score() call) equals scoring each document alone, and transformers;
- score_prefix with two engines (A and B: the same architecture and tokenizer, other
  weights) then select --top-k: every sample scored, the raw NLL and attention masses
  equal transformers', CAM exactly for the samples with context, and the selection opens.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from megatron_longalign.data.encoding import loss_mask_from_regions
from megatron_longalign.data.indexed import SFTIndexedDataset
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.gateau.documents import DocumentConfig, sample_documents
from megatron_longalign.gateau.runner import GateauError, RunOptions, check_inputs, score_prefix
from megatron_longalign.gateau.select import select
from megatron_longalign.gateau.shards import SCORES_FILE, read_records
from megatron_longalign.scoring import ScoringDocument, ScoringEngine
from megatron_longalign.scoring.documents import plan_microbatches
from tests.conftest import write_lines
from tests.convert.conftest import make_hf_model
from tests.scoring.conftest import (
    CASE,
    SEED,
    assert_mass_matches,
    assert_matches,
    import_with_tokenizer,
    reference_mass,
    reference_nll,
    scoring_config,
)

SEGMENT_TOKENS = 16
PACKED_LENGTH = 256  # B's micro-batches: several segment documents each
OPTIONS = RunOptions(
    documents=DocumentConfig(segment_tokens=SEGMENT_TOKENS), batch_tokens=300, progress=False
)
_FACTS = (
    "Tomas lives in Verdane.",
    "The amber gate is in the city.",
    "The secret code is 4417.",
    "Lanterns are made of copper.",
    "The record holds one key.",
    "Weaving is what the city is famous for.",
)


def _records() -> list[dict]:
    """Four samples with a context (one of two turns, the second without one) and two
    short chats without; byte-level tokens, 60-200 per sample."""

    def chat(*turns):
        return {
            "messages": [
                {"role": role, "content": text}
                for pair in turns
                for role, text in zip(("user", "assistant"), pair, strict=True)
            ]
        }

    records = [
        chat((" ".join(_FACTS[i : i + 3]) + "\n\nWhat is the secret code?", "It is 4417."))
        for i in range(3)
    ]
    records.insert(1, chat(("Hello there.", "Hi.")))
    records.append(
        chat(
            (" ".join(_FACTS[:2]) + "\n\nWhere is the gate?", "In the city."),
            ("And Tomas?", "Verdane."),
        )
    )
    records.append(chat(("What is 2 plus 3?", "5.")))
    return records


def _preprocess(root, tokenizer, name: str) -> str:
    from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess

    write_lines(root / f"{name}.jsonl", _records())
    prefix = str(root / name)
    spec = EncodeSpec(str(tokenizer), "llama3")
    preprocess(PreprocessConfig((str(root / f"{name}.jsonl"),), prefix, spec, progress=False))
    return prefix


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, tokenizer_dir) -> str:
    """Preprocessed with the tokenizer the HF model is published with."""
    return _preprocess(tmp_path_factory.mktemp("gateau_data"), tokenizer_dir, "own")


@pytest.fixture(scope="module")
def engine_a(imported) -> ScoringEngine:
    return ScoringEngine(scoring_config(imported.model_config), imported.output)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory, tokenizer_dir):
    """B: the same architecture and tokenizer, other weights (another seed)."""
    hf = make_hf_model(CASE, seed=SEED + 1)
    return hf, import_with_tokenizer(hf, tmp_path_factory.mktemp("model_b"), tokenizer_dir)


@pytest.fixture(scope="module")
def engine_b(model_b) -> ScoringEngine:
    _, imported = model_b
    config = scoring_config(imported.model_config)
    return ScoringEngine(config, imported.output, seq_length=PACKED_LENGTH)


# ---- tokenizer fingerprint -----------------------------------------------------------------


def test_data_of_the_models_tokenizer_passes_the_input_check(
    engine_a, prefix, tmp_path, tokenizer_dir
):
    from megatron_longalign.devdata.tokenizer_training import train_hf_bpe
    from tests.conftest import _training_lines

    dataset = SFTIndexedDataset(prefix)
    assert engine_a.tokenizer_fingerprint == dataset.metadata["tokenizer"]["sha256"]
    check_inputs(dataset, engine_a, engine_a)
    # Another tokenizer of the same size (trained on other text): refused by name.
    other = train_hf_bpe(_training_lines(seed=1), tmp_path / "other_tokenizer", 300)
    other_data = SFTIndexedDataset(_preprocess(tmp_path, other, "other"))
    assert other_data.metadata["tokenizer"]["vocab_size"] == 300
    with pytest.raises(GateauError, match="re-preprocess the data with the models' tokenizer"):
        check_inputs(other_data, engine_a, engine_a)


# ---- packed segment importance -------------------------------------------------------------


def _segment_documents(prefix: str) -> list:
    dataset = SFTIndexedDataset(prefix)
    docs = []
    for index in range(len(dataset)):
        sample = dataset[index]
        out = sample_documents(index, sample.tokens, sample.regions, OPTIONS.documents)
        for (start, end), doc in zip(out.segments, out.segment_docs, strict=True):
            # [segment; question; response]: the sample without the other context tokens.
            context = sum(e - s for s, e in out.segments)
            assert doc.tokens.size == out.length - context + (end - start)
            docs.append(replace(doc, key=len(docs)))
    return docs


def test_packed_segment_scoring_equals_scoring_each_alone(engine_b, model_b, prefix):
    hf_b, _ = model_b
    docs = _segment_documents(prefix)
    groups = plan_microbatches(
        [d.tokens.size for d in docs], PACKED_LENGTH, 1, "best_fit_decreasing"
    )
    assert len(docs) >= 12 and max(len(g) for g in groups) >= 3  # really packed
    packed = engine_b.score(docs)
    for doc, result in zip(docs, packed, strict=True):
        (alone,) = engine_b.score([doc])
        assert np.array_equal(np.isnan(result.token_nll), np.isnan(alone.token_nll))
        np.testing.assert_allclose(result.token_nll, alone.token_nll, atol=1e-4, equal_nan=True)
        assert_matches(result.token_nll, reference_nll(hf_b, doc), doc.key)


# ---- end to end ----------------------------------------------------------------------------


def _whole_sample(dataset: SFTIndexedDataset, index: int) -> ScoringDocument:
    """Sample `index` as the reference sees it, from its regions (not documents.py):
    queries = the response, segments = each CONTEXT region cut every SEGMENT_TOKENS."""
    sample = dataset[index]
    length = sample.tokens.size
    mask = loss_mask_from_regions(sample.regions, length)
    segments = np.full(length, -1, dtype=np.int32)
    count = 0
    for start, end, kind in np.asarray(sample.regions).reshape(-1, 3).tolist():
        for first in range(start, end, SEGMENT_TOKENS) if kind == RegionKind.CONTEXT else ():
            segments[first : min(first + SEGMENT_TOKENS, end)] = count
            count += 1
    tokens = np.asarray(sample.tokens, dtype=np.int64)
    return ScoringDocument(index, tokens, mask, None, mask, segments, count)


def test_score_and_select_end_to_end(engine_a, engine_b, model_b, hf_model, prefix, tmp_path):
    hf_b, _ = model_b
    dataset = SFTIndexedDataset(prefix)
    summary = score_prefix(prefix, engine_a, engine_b, tmp_path / "scores", options=OPTIONS)
    records = [json.loads(line) for line in summary.path.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(dataset))) == list(range(6))
    context = [r["segments"] > 0 for r in records]
    assert context == [True, False, True, True, True, False]
    assert summary.without_context == 2 and summary.scored == 6
    for r, has_context in zip(records, context, strict=True):
        assert all(r[k] is not None for k in ("ppl_a", "ppl_b", "hmg", "score")), r
        assert (r["cam"] is not None) == (r["cas"] is not None) == has_context, r
    # The raw records are the engines' numbers for the right documents: response NLL of
    # the whole sample under A and B, and B's attention masses, as transformers gives them.
    raw = read_records(tmp_path / "scores")
    for index in (0, 1, 4):
        doc = _whole_sample(dataset, index)
        for model, key in ((hf_model, "nll_a"), (hf_b, "nll_b")):
            expected = np.nanmean(reference_nll(model, doc))
            assert raw[index][key] == pytest.approx(expected, abs=2e-4), (index, key)
        if doc.num_segments:
            mass = np.array(raw[index]["attention"])
            assert_mass_matches(mass, reference_mass(hf_b, doc), index)
        # Segment j's importance: B's response NLL given [segment j; question; response].
        assert len(raw[index]["segment_nll"]) == doc.num_segments
        context = np.zeros(doc.tokens.size, dtype=bool)
        for start, end, kind in np.asarray(dataset[index].regions).reshape(-1, 3).tolist():
            context[start:end] |= kind == RegionKind.CONTEXT
        assert context.any() == bool(doc.num_segments)
        for j, value in enumerate(raw[index]["segment_nll"]):
            keep = ~context | (doc.probe_segments == j)
            short = ScoringDocument(j, doc.tokens[keep], doc.loss_mask[keep])
            assert value == pytest.approx(np.nanmean(reference_nll(hf_b, short)), abs=2e-4)
    assert len({r["hmg"] for r in records}) > 1  # A and B really differ
    selection = select(prefix, tmp_path / "scores" / SCORES_FILE, str(tmp_path / "top"), top_k=3)
    order = sorted(range(6), key=lambda i: (-records[i]["score"], i))
    assert selection.indices.tolist() == sorted(order[:3])
    chosen = SFTIndexedDataset(str(tmp_path / "top"))
    assert len(chosen) == 3
    assert chosen.metadata["tokenizer"]["sha256"] == engine_b.tokenizer_fingerprint
    for position, index in enumerate(selection.indices.tolist()):
        assert np.array_equal(chosen[position].tokens, dataset[index].tokens)


# ---- the command line, distributed and killed -----------------------------------------------


def _score_command(prefix: str, model_a: str, model_b: str, output) -> list[str]:
    from tests.helpers.launch import REPO

    return [
        str(REPO / "tools" / "gateau.py"), "score", "--prefix", prefix, "--model-a", model_a,
        "--model-b", model_b, "--output", str(output), "--seq-length", str(PACKED_LENGTH),
        "--segment-tokens", str(SEGMENT_TOKENS), "--batch-tokens", "150", "--precision", "fp32",
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_scores_are_identical_at_dp2_and_after_a_kill(imported, model_b, prefix, tmp_path):
    """tools/gateau.py score as one process, as two data-parallel processes (torchrun),
    and killed once its first shard line is flushed then rerun: the same scores file."""
    import subprocess
    import sys
    import time

    from tests.helpers.launch import REPO, run_workers, worker_env

    args = (prefix, str(imported.output), str(model_b[1].output))
    single = subprocess.run(
        [sys.executable, *_score_command(*args, tmp_path / "dp1")],
        env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    expected = (tmp_path / "dp1" / SCORES_FILE).read_bytes()
    assert len(expected.splitlines()) == 6

    command = _score_command(*args, tmp_path / "dp2")
    run_workers(REPO / command[0], 2, command[1:])
    assert (tmp_path / "dp2" / SCORES_FILE).read_bytes() == expected
    assert len(list((tmp_path / "dp2").glob("shard-*-of-00002.jsonl"))) == 2

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *_score_command(*args, killed_dir)],
        env=worker_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    shard = killed_dir / "shard-00000-of-00001.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 1:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert not (killed_dir / SCORES_FILE).exists()
    resumed = subprocess.run(
        [sys.executable, *_score_command(*args, killed_dir)],
        env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed_dir / SCORES_FILE).read_bytes() == expected
