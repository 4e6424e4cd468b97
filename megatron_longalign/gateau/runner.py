"""Score a preprocessed prefix with two homologous engines (A: short window, B: long):
documents (documents.py) -> engines -> raw shard records (shards.py) -> merged file
(merge.py).

Every rank of one model replica calls `score_shard` with the same arguments (the
engines are collective over the replica); only the replica's writer (`write=True`,
typically its model-parallel rank 0) appends to the shard file, and only global rank 0
shows the progress bar. Samples go to the engines in batches of about `batch_tokens`
tokens so the engine can pack many documents per micro-batch; a batch's records are
flushed together, so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longalign.data.indexed import SFTIndexedDataset
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.gateau.documents import DocumentConfig, SampleDocuments, sample_documents
from megatron_longalign.gateau.engine_api import DocumentResult, Engine, ScoringDocument
from megatron_longalign.gateau.merge import MergeSummary, merge_scores
from megatron_longalign.gateau.scores import ScoreConfig
from megatron_longalign.gateau.shards import (
    ShardWriter,
    assign_samples,
    check_run_settings,
    read_records,
    shard_path,
)
from megatron_longalign.gateau.sources import sample_sources


class GateauError(ValueError):
    """Inputs GATEAU cannot score; the message names what is wrong and the fix."""


@dataclass(frozen=True)
class RunOptions:
    documents: DocumentConfig = DocumentConfig()
    scores: ScoreConfig = ScoreConfig()
    batch_tokens: int = 65536  # tokens of model B's documents per engine call (>= 1 sample)
    progress: bool = True


def _engine_identity(engine: Engine) -> tuple[Any, Any]:
    return getattr(engine, "tokenizer_fingerprint", None), getattr(engine, "vocab_size", None)


def check_inputs(dataset: SFTIndexedDataset, engine_a: Engine, engine_b: Engine) -> None:
    """Refuse engines whose tokenizers or vocabularies differ (from each other or from
    the prefix's tokenizer), and prefixes whose region kinds are not ours."""
    metadata, prefix = dataset.metadata, dataset.prefix
    kinds = {int(k): v for k, v in (metadata.get("region_kinds") or {}).items()}
    if kinds != {int(kind): kind.name.lower() for kind in RegionKind}:
        raise GateauError(
            f"{prefix}.json records region kinds {kinds or 'none'}, not this version's "
            f"{[k.name.lower() for k in RegionKind]}: GATEAU needs the context/user/assistant "
            "regions; re-preprocess the data with tools/preprocess.py"
        )
    (fp_a, vocab_a), (fp_b, vocab_b) = _engine_identity(engine_a), _engine_identity(engine_b)
    if fp_a != fp_b or vocab_a != vocab_b:
        raise GateauError(
            f"models A and B are not homologous: tokenizer {fp_a!s:.16} vs {fp_b!s:.16}, "
            f"vocabulary {vocab_a} vs {vocab_b}; HMG compares perplexities of the same tokens, "
            "so both models need the same tokenizer and vocabulary"
        )
    tokenizer = metadata.get("tokenizer") or {}
    if isinstance(fp_b, str) and tokenizer.get("sha256") not in (None, fp_b):
        raise GateauError(
            f"{prefix} was tokenized with tokenizer {tokenizer.get('sha256')!s:.16}... but the "
            f"models use {fp_b:.16}...: re-preprocess the data with the models' tokenizer"
        )
    data_vocab = tokenizer.get("vocab_size")
    if isinstance(vocab_b, int) and isinstance(data_vocab, int) and data_vocab > vocab_b:
        raise GateauError(
            f"{prefix}'s tokenizer has {data_vocab} tokens, more than the models' vocabulary "
            f"of {vocab_b}: the data was made with another tokenizer"
        )


def _batches(
    dataset: SFTIndexedDataset, indices: np.ndarray, config: DocumentConfig, batch_tokens: int
) -> Iterator[list[SampleDocuments]]:
    batch: list[SampleDocuments] = []
    tokens = 0
    for index in indices.tolist():
        sample = dataset[index]
        docs = sample_documents(index, sample.tokens, sample.regions, config)
        batch.append(docs)
        tokens += docs.length + sum(d.tokens.size for d in docs.segment_docs)
        if tokens >= batch_tokens:
            yield batch
            batch, tokens = [], 0
    if batch:
        yield batch


def _run_engine(engine: Engine, name: str, documents: list[ScoringDocument]) -> list:
    """Renumber keys 0..n-1 for one call, and check the engine's answer."""
    if not documents:
        return []
    renumbered = [replace(d, key=k) for k, d in enumerate(documents)]
    results = engine.score(renumbered)
    if len(results) != len(renumbered) or any(r.key != k for k, r in enumerate(results)):
        raise GateauError(
            f"engine {name} returned {len(results)} results with keys "
            f"{[r.key for r in results][:8]}... for {len(renumbered)} documents: it must "
            "return one result per document in input order"
        )
    return results


def response_nll(doc: ScoringDocument, result: DocumentResult, what: str) -> float:
    """Mean NLL over the response tokens at t >= 1 (not over all positions)."""
    targets = np.asarray(doc.loss_mask, dtype=bool).copy()
    targets[0] = False
    values = np.asarray(result.token_nll, dtype=np.float64)[targets]
    if values.size == 0 or not np.isfinite(values).all():
        raise GateauError(f"{what}: the engine returned non-finite NLL on response tokens")
    return float(values.mean())


def _records(batch: list[SampleDocuments], engine_a: Engine, engine_b: Engine) -> list[dict]:
    docs_a = [s.full_a for s in batch if s.scorable]
    docs_b = [d for s in batch if s.scorable for d in (s.full_b, *s.segment_docs)]
    results_a = iter(zip(docs_a, _run_engine(engine_a, "A", docs_a), strict=True))
    results_b = iter(zip(docs_b, _run_engine(engine_b, "B", docs_b), strict=True))
    records = []
    for s in batch:
        record = {"index": s.index, "tokens": s.length, "nll_a": None, "nll_b": None,
                  "segment_nll": [], "attention": []}  # fmt: skip
        if s.scorable:
            doc_a, res_a = next(results_a)
            doc_b, res_b = next(results_b)
            record["nll_a"] = response_nll(doc_a, res_a, f"sample {s.index} under model A")
            record["nll_b"] = response_nll(doc_b, res_b, f"sample {s.index} under model B")
            record["segment_nll"] = [
                response_nll(*next(results_b), f"sample {s.index} segment {j} under model B")
                for j in range(len(s.segments))
            ]
            record["attention"] = _attention(res_b, s)
        records.append(record)
    return records


def _attention(result: DocumentResult, sample: SampleDocuments) -> list[float]:
    if not sample.segments:
        return []
    mass = result.attention_mass
    if mass is None or len(mass) != len(sample.segments) or not np.isfinite(mass).all():
        raise GateauError(
            f"sample {sample.index}: model B returned attention {mass!r:.80} for "
            f"{len(sample.segments)} segments (an engine without the attention probe?)"
        )
    return [float(m) for m in mass]


def run_settings(dataset: SFTIndexedDataset, engines: Sequence[Engine], config: DocumentConfig):
    """What D/run.json records: a resumed run must match it."""
    return {
        "prefix": os.path.abspath(dataset.prefix),
        "tag": dataset.metadata.get("tag"),
        "samples": len(dataset),
        "segment_tokens": config.segment_tokens,
        "window_a": config.window_a,
        "tokenizer": [_engine_identity(e)[0] for e in engines],
    }


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="gateau", disable=not enabled, delay=1)


def score_shard(
    dataset: SFTIndexedDataset,
    engine_a: Engine,
    engine_b: Engine,
    directory: str | os.PathLike,
    *,
    rank: int = 0,
    dp_size: int = 1,
    options: RunOptions = RunOptions(),
    write: bool = True,
    show_progress: bool | None = None,
) -> int:
    """Score the samples of DP rank `rank` that no shard file of `directory` holds yet;
    returns how many were scored. See the module docstring for who calls it."""
    if not 0 <= rank < dp_size:
        raise ValueError(f"rank {rank} is not in [0, {dp_size})")
    options.documents.validate()
    check_inputs(dataset, engine_a, engine_b)
    check_run_settings(directory, run_settings(dataset, (engine_a, engine_b), options.documents))
    mine = assign_samples(dataset.lengths, dp_size)[rank]
    done = read_records(directory).keys()
    todo = np.array([i for i in mine.tolist() if i not in done], dtype=np.int64)
    enabled = options.progress if show_progress is None else show_progress
    writer = ShardWriter(shard_path(directory, rank, dp_size)) if write else None
    started, tokens = time.perf_counter(), 0
    try:
        with _progress_bar(todo.size, enabled and rank == 0) as bar:
            for batch in _batches(dataset, todo, options.documents, options.batch_tokens):
                records = _records(batch, engine_a, engine_b)
                if writer is not None:
                    writer.write(records)
                tokens += sum(s.length for s in batch)
                bar.update(len(batch))
                bar.set_postfix(
                    tok_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}"
                )
    finally:
        if writer is not None:
            writer.close()
    return int(todo.size)


def score_prefix(
    prefix: str,
    engine_a: Engine,
    engine_b: Engine,
    directory: str | os.PathLike,
    *,
    rank: int = 0,
    dp_size: int = 1,
    options: RunOptions = RunOptions(),
    write: bool = True,
    barrier: Callable[[], None] | None = None,
) -> MergeSummary | None:
    """Score this rank's shard, wait for every rank (`barrier`, needed when dp_size > 1),
    and merge on rank 0 (returns its summary; other ranks get None)."""
    dataset = SFTIndexedDataset(prefix)
    score_shard(
        dataset, engine_a, engine_b, directory, rank=rank, dp_size=dp_size, options=options,
        write=write,
    )  # fmt: skip
    if dp_size > 1:
        if barrier is None:
            raise ValueError("dp_size > 1 needs a barrier so rank 0 merges complete shards")
        barrier()
    if rank != 0 or not write:
        return None
    return merge_scores(
        Path(directory), len(dataset), options.scores, sample_sources(dataset.files)
    )
