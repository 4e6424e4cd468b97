"""Bad preprocessing input: tokenizers, templates and input lines. Each case exits 1
before anything is written, names the file (and line) or the option, and leaves an
existing dataset under the same prefix untouched."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import chat
from tests.reliability.harness import Case, Setup, case_ids, run_case, tool

REPO = Path(__file__).resolve().parents[2]
SP_MODEL = REPO / "data" / "sample" / "tokenizer.model"


def _input(directory: Path, lines: list) -> Path:
    path = directory / "in.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def _good(directory: Path) -> Path:
    return _input(directory, [chat("Doc.\n\nQ?", "A.")] * 3)


def _run(directory: Path, data: Path, tokenizer, template="llama2", *extra) -> Setup:
    return Setup(
        tool(
            "preprocess",
            "--input",
            str(data),
            "--tokenizer",
            str(tokenizer),
            "--template",
            template,
            "--output-prefix",
            str(directory / "out" / "ds"),
            "--no-progress",
            # Even when told to replace it, a failed run must leave the old set alone.
            "--overwrite",
            *extra,
        ),
        protected=[directory / "out"],
    )


def _missing_tokenizer(d: Path) -> Setup:
    return _run(d, _good(d), d / "nowhere.model")


def _garbage_sentencepiece(d: Path) -> Setup:
    (d / "bad.model").write_bytes(b"\x00\x01 not a model" * 10)
    return _run(d, _good(d), d / "bad.model")


def _corrupt_tokenizer_json(d: Path) -> Setup:
    (d / "tok").mkdir()
    (d / "tok" / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    return _run(d, _good(d), d / "tok")


def _template_needs_missing_special(d: Path) -> Setup:
    # A HF tokenizer trained without the chat special tokens.
    from megatron_longalign.devdata.tokenizer_training import train_hf_bpe

    path = train_hf_bpe(["hello world"] * 30, d / "tok", 300, special_tokens=())
    return _run(d, _good(d), path, "chatml")


def _malformed_json_line(d: Path) -> Setup:
    data = _input(d, [chat("q", "a"), '{"messages": [', chat("q", "a")])
    return _run(d, data, SP_MODEL)


def _corrupt_gzip(d: Path) -> Setup:
    path = d / "in.jsonl.gz"
    blob = gzip.compress(json.dumps(chat("q", "a")).encode() * 50 + b"\n")
    path.write_bytes(blob[: len(blob) // 2])
    return _run(d, path, SP_MODEL)


def _missing_input(d: Path) -> Setup:
    return _run(d, d / "absent.jsonl", SP_MODEL)


def _reserved_marker_character(d: Path) -> Setup:
    from megatron_longalign.devdata.tokenizer_training import train_hf_bpe

    path = train_hf_bpe(["hello world"] * 30, d / "tok", 300)
    data = _input(d, [chat("q", "a"), chat("a\U000f0000b", "c")])
    return _run(d, data, path, "chatml")


CASES = [
    Case("tokenizer path missing", _missing_tokenizer, 1, [r"nowhere\.model does not exist"]),
    Case("sentencepiece file garbage", _garbage_sentencepiece, 1, [r"bad\.model"]),
    Case("tokenizer.json corrupt", _corrupt_tokenizer_json, 1, [r"tok/tokenizer\.json"]),
    Case(
        "template needs a missing special token",
        _template_needs_missing_special,
        1,
        [r"chatml", r"<\|im_start\|>", r"pick a template"],
    ),
    Case("malformed JSON line", _malformed_json_line, 1, [r"in\.jsonl:2", r"--skip-bad"]),
    Case("truncated gzip input", _corrupt_gzip, 1, [r"in\.jsonl\.gz"]),
    Case("input file missing", _missing_input, 1, [r"absent\.jsonl does not exist"]),
    Case(
        "text with the reserved marker character",
        _reserved_marker_character,
        1,
        [r"in\.jsonl:2", r"reserved_text", r"U\+F0000"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_bad_preprocessing_input(case, tmp_path):
    # An existing complete dataset under the output prefix must survive every failure.
    out = tmp_path / "out"
    out.mkdir()
    (out / "ds.json").write_text('{"format": "an earlier complete set"}\n')
    run_case(case, tmp_path)
    assert not list(out.glob("*.tmp-*")), "a failed run left temporary files"
