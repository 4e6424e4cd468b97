"""Shared fixtures: tiny tokenizers of every supported kind, trained once per session."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from megatron_longalign.data.tokenizer import load_tokenizer
from megatron_longalign.devdata.tokenizer_training import train_hf_bpe, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_wandb_after_each_test():
    """wandb keeps settings read from the environment (WANDB_DIR, WANDB_MODE) in a
    process-wide singleton; without a teardown one test's run directory leaks into the
    next test's."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


_WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "the secret code of amber gate is lives in city famous for weaving copper lanterns "
    "what where who record value key answer question document passage Tomas Verdane"
).split()


def _training_lines(count: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    lines += ["café naïve 東京 問 答 🙂 12345 67890", "\tindented\r\nwindows line", "a  b   c"]
    return lines


@pytest.fixture(scope="session")
def tokenizer_paths(tmp_path_factory) -> dict[str, str]:
    """name -> path for a sentencepiece model and two HF tokenizer styles."""
    root = tmp_path_factory.mktemp("tokenizers")
    lines = _training_lines()
    return {
        "sentencepiece": str(train_sentencepiece(lines, root / "sp.model", vocab_size=600)),
        "hf_byte_level": str(train_hf_bpe(lines, root / "hf_bl", 600, "byte_level")),
        "hf_metaspace": str(train_hf_bpe(lines, root / "hf_ms", 600, "metaspace")),
    }


@pytest.fixture(scope="session", params=["sentencepiece", "hf_byte_level", "hf_metaspace"])
def any_tokenizer(request, tokenizer_paths):
    return load_tokenizer(tokenizer_paths[request.param])


@pytest.fixture(scope="session")
def sp_model(tokenizer_paths) -> str:
    return tokenizer_paths["sentencepiece"]


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL: dicts are serialised, str/bytes written verbatim."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            if isinstance(line, str):
                line = line.encode("utf-8")
            f.write(line + b"\n")
    return path


def chat(*contents: str, system: str | None = None) -> dict:
    """{"messages": ...} from alternating user/assistant contents."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, content in enumerate(contents):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return {"messages": messages}


@pytest.fixture(scope="session")
def sample_prefixes(tmp_path_factory, sp_model) -> dict[str, str]:
    """Two small preprocessed datasets (long-ish retrieval samples, short chats) built
    with the session's sentencepiece tokenizer: name -> output prefix."""
    from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
    from megatron_longalign.devdata.synthetic import (
        generate_long_samples,
        generate_short_chats,
        write_jsonl,
    )

    root = tmp_path_factory.mktemp("datasets")
    records = {
        "long": list(generate_long_samples(12, 100, 900, seed=11)),
        "short": list(generate_short_chats(60, seed=12)),
    }
    prefixes = {}
    for name, recs in records.items():
        write_jsonl(recs, root / f"{name}.jsonl")
        prefixes[name] = str(root / name)
        config = PreprocessConfig(
            inputs=(str(root / f"{name}.jsonl"),),
            output_prefix=prefixes[name],
            spec=EncodeSpec(sp_model, "llama3"),
            progress=False,
        )
        preprocess(config)
    return prefixes
