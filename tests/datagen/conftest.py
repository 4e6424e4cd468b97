"""Fixtures for the Self-Instruct tests: documents made of the words the session
tokenizer (tests/conftest.py) was trained on, and a run configuration for a stub."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron_longalign.datagen.runner import Endpoint, RunConfig
from megatron_longalign.datagen.selection import SelectionRules
from megatron_longalign.datagen.settings import GenerationSettings

WORDS = (  # noqa: SIM905
    "the secret code of amber gate is lives in city famous for weaving copper lanterns "
    "what where who record value key answer question document passage Tomas Verdane"
).split()


def english_text(marker: str, words: int, seed: int) -> str:
    rng = random.Random(seed)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"{marker} {body}."


def write_documents(path: Path, documents: dict[str, str]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for doc_id, text in documents.items():
            handle.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture
def english_docs(tmp_path) -> Path:
    """8 English documents DOC0..DOC7 of 60..200 words, as JSONL with ids d0..d7."""
    docs = {f"d{i}": english_text(f"DOC{i}", 60 + 20 * i, seed=i) for i in range(8)}
    return write_documents(tmp_path / "docs.jsonl", docs)


def run_config(
    inputs, output, tokenizer, base_url, *, seed=0, concurrency=2, max_retries=2, **rules
) -> RunConfig:
    selection = {"min_tokens": 10, "max_tokens": 100_000, **rules}
    return RunConfig(
        inputs=[str(i) for i in inputs],
        output=str(output),
        tokenizer=tokenizer,
        endpoint=Endpoint(
            base_url,
            concurrency=concurrency,
            max_retries=max_retries,
            timeout=30.0,
            price_input=2.0,
            price_output=10.0,
        ),  # fmt: skip
        settings=GenerationSettings(model="stub-generator", seed=seed, max_attempts=3),
        selection=SelectionRules(**selection),
        progress=False,
    )
