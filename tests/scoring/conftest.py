"""Scoring engine tests: a tiny random Llama (GQA, vocab 300: padded to 384 / 512 at
TP 1 / 2) saved by transformers with a real 300-token tokenizer, imported with the
project's converter at TP = 1, and documents of unequal lengths scored against transformers' own forward pass.

`reference_nll` is the independent computation: each document run alone through the HF
model, log-softmax in float64, -log p(token t | tokens < t) at index t."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longalign.scoring import ScoringDocument
from tests.convert.conftest import CASES, make_hf_model, save_hf
from tests.helpers.megatron_session import megatron_on_cpu

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

SEED = 1234
CASE = CASES["llama_gqa"]
TOL = 2e-4  # fp32: max |NLL difference| per token (NLL values are ~5-30 nats here)
SEQ_LENGTH = 48  # micro-batch budget: several micro-batches, one document longer than it
LENGTHS = (23, 7, 41, 12, 30, 5, 64, 18)
KEYS = (17, 3, 99, 4, 250, 8, 61, 0)  # not sorted: results must come back in input order


def make_documents(vocab: int, seed: int = 7) -> list[ScoringDocument]:
    """Documents of unequal lengths whose targets are a tail "response" (the first
    third is context); document 2 has explicit, non-default position ids."""
    rng = np.random.default_rng(seed)
    docs = []
    for i, (key, length) in enumerate(zip(KEYS, LENGTHS, strict=True)):
        tokens = rng.integers(0, vocab, length).astype(np.int64)
        mask = np.zeros(length, dtype=bool)
        mask[length // 3 :] = True
        positions = np.arange(length, dtype=np.int64) + 5 if i == 2 else None
        docs.append(ScoringDocument(key, tokens, mask, position_ids=positions))
    return docs


def reference_nll(model, doc: ScoringDocument) -> np.ndarray:
    tokens = torch.as_tensor(doc.tokens)[None]
    positions = None if doc.position_ids is None else torch.as_tensor(doc.position_ids)[None]
    with torch.no_grad():
        logits = model(tokens, position_ids=positions).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    nll = np.full(tokens.shape[1], np.nan)
    nll[1:] = -logp[:-1].gather(1, tokens[0, 1:, None])[:, 0].numpy()
    nll[~doc.loss_mask] = np.nan
    return nll


@pytest.fixture(scope="package", autouse=True)
def megatron_cpu() -> Iterator[None]:
    with megatron_on_cpu(SEED):
        yield


@pytest.fixture(scope="package")
def hf_model():
    return make_hf_model(CASE)


@pytest.fixture(scope="package")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE tokenizer of exactly the tiny model's 300 tokens (with the
    templates' special tokens), so data preprocessed with it fits the model."""
    from megatron_longalign.devdata.tokenizer_training import train_hf_bpe
    from tests.conftest import _training_lines

    return train_hf_bpe(_training_lines(), tmp_path_factory.mktemp("tokenizer"), 300)


def import_with_tokenizer(hf_model, root: Path, tokenizer: Path):
    """Save `hf_model` with `tokenizer`'s files beside it, as a published model is, and
    import it at TP = 1 (fp32)."""
    from megatron_longalign.convert.hf_import import import_hf_checkpoint

    hf_dir = save_hf(hf_model, root / "hf", CASE.layout)
    for file in tokenizer.iterdir():
        shutil.copy(file, hf_dir / file.name)
    return import_hf_checkpoint(hf_dir, root / "imported", dtype="fp32", progress=False)


@pytest.fixture(scope="package")
def imported(tmp_path_factory, hf_model, tokenizer_dir):
    return import_with_tokenizer(hf_model, tmp_path_factory.mktemp("llama"), tokenizer_dir)


@pytest.fixture(scope="package")
def documents(imported) -> list[ScoringDocument]:
    return make_documents(imported.model_config.vocab_size)


@pytest.fixture(scope="package")
def references(hf_model, documents) -> list[np.ndarray]:
    return [reference_nll(hf_model, doc) for doc in documents]


def scoring_config(model_config, tp: int = 1, cp: int = 1, pp: int = 1):
    from megatron_longalign.config.data import DataConfig
    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.config.training import LongAlignConfig, TrainConfig

    return LongAlignConfig(
        model=model_config,
        data=DataConfig(seq_length=SEQ_LENGTH),
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            context_parallel_size=cp,
            pipeline_model_parallel_size=pp,
        ),
        train=TrainConfig(precision="fp32"),
    )


def assert_matches(token_nll: np.ndarray, reference: np.ndarray, key: int) -> None:
    """Same NaN pattern, per-token NLL and response mean within fp32 tolerance."""
    token_nll = np.asarray(token_nll, dtype=np.float64)
    assert np.array_equal(np.isnan(token_nll), np.isnan(reference)), key
    diff = np.nanmax(np.abs(token_nll - reference))
    assert diff <= TOL, (key, diff)
    assert abs(np.nanmean(token_nll) - np.nanmean(reference)) <= TOL, key


# ---- the attention probe: segments on some documents, and transformers' dense reference --

PROBED = (0, 3, 4, 6)  # 0 and 3 share a micro-batch at CP1; 6 is longer than seq_length
MASS_TOL = 1e-6  # masses are in [0, 1], computed in float64 from fp32 q and k


def with_segments(documents: list[ScoringDocument]) -> list[ScoringDocument]:
    """PROBED documents get the response rows as queries and 2 context segments (3 on the
    longest, whose last segment overlaps its response: keys after a query are masked);
    the others stay unprobed, so micro-batches without a probe run too."""
    out = list(documents)
    for i in PROBED:
        doc = documents[i]
        length = doc.tokens.size
        segments = np.full(length, -1, dtype=np.int32)
        segments[1 : length // 3], segments[length // 3 : length // 2] = 0, 1
        count = 2
        if length > SEQ_LENGTH:
            segments[length - 20 : length - 8], count = 2, 3
        out[i] = ScoringDocument(
            doc.key, doc.tokens, doc.loss_mask, doc.position_ids, doc.loss_mask.copy(),
            segments, count,
        )  # fmt: skip
    return out


def reference_mass(model, doc: ScoringDocument, layers: tuple[int, ...] | None = None):
    """The attention mass of doc's query rows on each segment, from transformers' eager
    attention probabilities (the full L x L matrices, which is fine at these lengths):
    mean over the layers (1-based; None = all), every query head and the query rows of
    the summed probability on the segment's keys."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        tokens = torch.as_tensor(doc.tokens)[None]
        positions = None if doc.position_ids is None else torch.as_tensor(doc.position_ids)[None]
        with torch.no_grad():
            attentions = model(tokens, position_ids=positions, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    chosen = range(1, len(attentions) + 1) if layers is None else layers
    probs = torch.stack([attentions[n - 1][0] for n in chosen]).double()  # [layer, head, q, k]
    rows = probs[:, :, np.flatnonzero(doc.probe_query_mask)]
    return np.array(
        [rows[..., doc.probe_segments == s].sum(-1).mean().item() for s in range(doc.num_segments)]
    )


def assert_mass_matches(mass, reference: np.ndarray, key) -> None:
    assert mass is not None and mass.shape == reference.shape, (key, mass)
    assert np.abs(mass - reference).max() <= MASS_TOL, (key, mass, reference)
