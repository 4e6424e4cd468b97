"""End to end: tools/preprocess.py on JSONL files -> megatron-core IndexedDataset files."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longalign.data.conversation import conversation_from_record
from megatron_longalign.data.encoding import SampleEncoder, loss_mask_from_regions
from megatron_longalign.data.indexed import SFTIndexedDataset, megatron_prefix
from megatron_longalign.data.preprocess import (
    Dropped,
    EncodeSpec,
    PreprocessConfig,
    SampleProcessor,
    preprocess,
)
from megatron_longalign.data.templates import get_template
from megatron_longalign.data.tokenizer import load_tokenizer
from megatron_longalign.devdata.synthetic import generate_long_samples, generate_short_chats
from tests.conftest import REPO, chat, write_lines
from tests.data.test_conversation import BAD_LINES

_spec = importlib.util.spec_from_file_location("preprocess_cli", REPO / "tools" / "preprocess.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

GOOD = [
    chat("Long doc here.\n\nWhat is it?", "A doc.", system="Answer briefly."),
    chat("hi", "hello", "how are you?", "fine"),
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args] + ["--no-progress"])


def convert(data, tokenizer, template, prefix, *extra) -> int:
    """tools/preprocess.py on `data`; returns its exit code."""
    args = ("--input", data, "--tokenizer", tokenizer, "--template", template)
    return run_cli(*args, "--output-prefix", prefix, *extra)


def reference(tokenizer_path: str, template: str, records: list[dict]):
    """Token ids and masks computed in-process, one record at a time."""
    encoder = SampleEncoder(load_tokenizer(tokenizer_path), get_template(template))
    samples = [encoder.encode(conversation_from_record(r)) for r in records]
    return [(s.tokens, loss_mask_from_regions(s.regions, len(s))) for s in samples]


def outputs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def published(prefix) -> dict[str, Path]:
    """suffix -> file of the set that PREFIX.json names."""
    meta = json.loads(Path(f"{prefix}.json").read_text())
    return {s: Path(prefix).parent / r["name"] for s, r in meta["files"].items()}


def test_output_is_a_megatron_indexed_dataset_matching_the_reference(tmp_path, sp_model):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = write_lines(tmp_path / "in.jsonl", GOOD)
    prefix = tmp_path / "out" / "ds"
    assert convert(data, sp_model, "llama3", prefix) == 0
    expected = reference(sp_model, "llama3", GOOD)

    megatron = IndexedDataset(megatron_prefix(str(prefix)))
    assert len(megatron) == len(GOOD)
    assert megatron.sequence_lengths.tolist() == [len(t) for t, _ in expected]
    dataset = SFTIndexedDataset(str(prefix))
    for i, (tokens, mask) in enumerate(expected):
        np.testing.assert_array_equal(megatron[i], tokens)
        np.testing.assert_array_equal(dataset[i].loss_mask, mask)

    meta = json.loads((tmp_path / "out" / "ds.json").read_text())
    assert meta["counts"]["samples_written"] == meta["documents"] == 3
    assert meta["counts"]["lines"] == 3 and meta["counts"]["dropped"] == {}
    assert meta["tokens"]["total"] == sum(len(t) for t, _ in expected)
    assert meta["tokens"]["target"] == sum(int(m.sum()) for _, m in expected)
    assert sum(b["count"] for b in meta["length_histogram"]) == 3
    assert meta["tokenizer"]["sha256"] == hashlib.sha256(Path(sp_model).read_bytes()).hexdigest()
    assert meta["template"]["name"] == "llama3"
    assert meta["token_dtype"] == "uint16"  # vocab < 65500
    assert meta["format"] == "megatron-longalign/sft-v2"
    tag = meta["tag"]
    assert set(meta["files"]) == {".bin", ".idx", ".regions.bin", ".regions.idx"}  # no rejects
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["ds.json"] + [f"ds.{tag}{suffix}" for suffix in meta["files"]]
    )
    for record in meta["files"].values():
        data = (tmp_path / "out" / record["name"]).read_bytes()
        assert record["bytes"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()


def _mixed_input(tmp_path: Path) -> Path:
    records = list(generate_long_samples(6, 200, 3000, seed=3))
    records += list(generate_short_chats(60, seed=4))
    lines: list = []
    for i, record in enumerate(records):
        lines.append(record)
        if i % 17 == 5:
            lines.append(BAD_LINES[i % len(BAD_LINES)][1])
        if i % 23 == 7:
            lines.append("")
    return write_lines(tmp_path / "mixed.jsonl", lines)


def test_output_is_byte_identical_for_any_worker_count(tmp_path, sp_model):
    data = _mixed_input(tmp_path)
    results = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        config = PreprocessConfig(
            inputs=(str(data),),
            output_prefix=str(out / "ds"),
            spec=EncodeSpec(sp_model, "chatml", max_length=3000, on_overlength="truncate-left"),
            workers=workers,
            skip_bad=True,
            progress=False,
            chunk_bytes=8192,  # many chunks, so workers really interleave
        )
        stats = preprocess(config)
        results.append(outputs(out))
    assert stats.rejected and stats.truncated and stats.blank_lines
    tag = json.loads(results[0]["ds.json"])["tag"]
    assert set(results[0]) == {
        f"ds.{tag}.bin",
        f"ds.{tag}.idx",
        f"ds.{tag}.regions.bin",
        f"ds.{tag}.regions.idx",
        "ds.json",
        f"ds.{tag}.rejects.jsonl",
    }
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("reason,raw,fragment", BAD_LINES[::2] + [BAD_LINES[-1]])
def test_bad_line_stops_naming_file_and_line_and_writes_nothing(
    tmp_path, sp_model, capsys, reason, raw, fragment
):
    data = write_lines(tmp_path / "in.jsonl", GOOD + [raw] + GOOD)
    out = tmp_path / "out"
    assert convert(data, sp_model, "chatml", out / "ds", "--workers", "2") == 1
    err = capsys.readouterr().err
    assert f"{data}:4:" in err and fragment in err and f"[{reason}]" in err
    assert "--skip-bad" in err
    assert list(out.iterdir()) == [], "no output, not even temporary files"


def test_failed_run_leaves_previous_outputs_untouched(tmp_path, sp_model):
    good = write_lines(tmp_path / "good.jsonl", GOOD)
    bad = write_lines(tmp_path / "bad.jsonl", GOOD + [b"{oops"])
    prefix = tmp_path / "out" / "ds"
    assert convert(good, sp_model, "plain", prefix) == 0
    before = outputs(tmp_path / "out")
    assert convert(bad, sp_model, "plain", prefix, "--overwrite") == 1
    assert outputs(tmp_path / "out") == before


def test_skip_bad_lists_every_rejected_line_with_reason(tmp_path, sp_model, capsys):
    lines = []
    expected_rejects = []
    for index, (reason, raw, _) in enumerate(BAD_LINES):
        lines += [GOOD[index % 3], raw]
        expected_rejects.append((2 * index + 2, reason))
    data = write_lines(tmp_path / "in.jsonl", lines)
    prefix = tmp_path / "ds"
    assert convert(data, sp_model, "llama2", prefix, "--skip-bad") == 0
    assert "rejects.jsonl" in capsys.readouterr().out
    rejects = [
        json.loads(line) for line in published(prefix)[".rejects.jsonl"].read_text().splitlines()
    ]
    assert [(r["line"], r["reason"]) for r in rejects] == expected_rejects
    assert all(r["file"] == str(data) and r["message"] for r in rejects)
    assert rejects[0]["text"] == '{"messages": "\\xff\\xfe"}'  # invalid bytes kept visible
    meta = json.loads((tmp_path / "ds.json").read_text())
    by_reason: dict[str, int] = {}
    for _, reason in expected_rejects:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert meta["counts"]["rejected"] == by_reason
    assert meta["counts"]["samples_written"] == len(BAD_LINES)
    assert meta["counts"]["lines"] == 2 * len(BAD_LINES)


def test_a_clean_rerun_removes_stale_rejects(tmp_path, sp_model):
    prefix = tmp_path / "ds"
    dirty = write_lines(tmp_path / "dirty.jsonl", GOOD + [b"{"])
    clean = write_lines(tmp_path / "clean.jsonl", GOOD)
    args = ("--tokenizer", sp_model, "--template", "plain", "--output-prefix", prefix)
    assert run_cli("--input", dirty, "--skip-bad", *args) == 0
    old_rejects = published(prefix)[".rejects.jsonl"]
    assert old_rejects.exists()
    assert run_cli("--input", clean, *args, "--overwrite") == 0
    assert ".rejects.jsonl" not in published(prefix)
    assert not old_rejects.exists() and not list(tmp_path.glob("*rejects*"))


LONG = chat("word " * 200 + "\n\nWhat?", "The answer is long enough to matter here.")


def _run_overlength(tmp_path, sp_model, policy, max_length, records=(LONG,)):
    data = write_lines(tmp_path / "in.jsonl", list(records))
    prefix = tmp_path / policy / "ds"
    code = convert(
        data, sp_model, "chatml", prefix, "--max-length", max_length, "--on-overlength", policy
    )
    return code, prefix


@pytest.mark.parametrize("policy", ["truncate-left", "truncate-middle"])
def test_truncation_keeps_tokens_and_mask_aligned(tmp_path, sp_model, policy):
    ((tokens, mask),) = reference(sp_model, "chatml", [LONG])
    limit = 64
    assert len(tokens) > limit
    code, prefix = _run_overlength(tmp_path, sp_model, policy, limit)
    assert code == 0
    if policy == "truncate-left":
        keep = np.arange(len(tokens) - limit, len(tokens))
    else:
        keep = np.concatenate(
            [np.arange(limit // 2), np.arange(len(tokens) - (limit - limit // 2), len(tokens))]
        )
    sample = SFTIndexedDataset(str(prefix))[0]
    np.testing.assert_array_equal(sample.tokens, tokens[keep])
    np.testing.assert_array_equal(sample.loss_mask, mask[keep])
    meta = json.loads(Path(str(prefix) + ".json").read_text())
    assert meta["counts"]["truncated"] == 1 and meta["tokens"]["max_length"] == limit


def test_overlength_drop_is_counted_and_listed(tmp_path, sp_model):
    short = chat("q", "a")
    code, prefix = _run_overlength(tmp_path, sp_model, "drop", 64, records=(short, LONG, short))
    assert code == 0
    meta = json.loads(Path(str(prefix) + ".json").read_text())
    assert meta["counts"]["dropped"] == {"overlength": 1}
    assert meta["counts"]["samples_written"] == 2
    (reject,) = [
        json.loads(x) for x in published(prefix)[".rejects.jsonl"].read_text().splitlines()
    ]
    assert reject["line"] == 2 and reject["reason"] == "overlength"


def test_overlength_error_names_file_and_line(tmp_path, sp_model, capsys):
    code, prefix = _run_overlength(tmp_path, sp_model, "error", 64, records=(chat("q", "a"), LONG))
    assert code == 1
    err = capsys.readouterr().err
    assert "in.jsonl:2:" in err and "--max-length 64" in err
    assert not prefix.parent.exists() or list(prefix.parent.iterdir()) == []


def test_truncation_that_removes_every_target_drops_the_sample(tmp_path, sp_model, capsys):
    # chatml ends "...<|im_end|>\n": keeping 1 head + 1 tail token keeps no target token,
    # so the sample is dropped; with nothing left to write the run fails, giving reasons.
    processor = SampleProcessor(EncodeSpec(sp_model, "chatml", 2, "truncate-middle"))
    outcome = processor.process_line(7, json.dumps(LONG).encode())
    assert outcome == Dropped(7, "no_target_after_truncation", 2)
    code, _ = _run_overlength(tmp_path, sp_model, "truncate-middle", 2)
    assert code == 1
    assert "no sample was written" in capsys.readouterr().err


def test_gzip_and_glob_inputs_with_blank_lines(tmp_path, sp_model):
    write_lines(tmp_path / "a.jsonl", [GOOD[0], "", GOOD[1]])
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write((json.dumps(GOOD[2]) + "\n\n").encode())
    prefix = tmp_path / "out" / "ds"
    assert convert(str(tmp_path / "*.jsonl*"), sp_model, "chatglm", prefix) == 0
    meta = json.loads((tmp_path / "out" / "ds.json").read_text())
    assert [Path(i["path"]).name for i in meta["inputs"]] == ["a.jsonl", "b.jsonl.gz"]
    assert [i["lines"] for i in meta["inputs"]] == [3, 2]
    assert meta["counts"]["blank_lines"] == 2 and meta["counts"]["samples_written"] == 3
    expected = reference(sp_model, "chatglm", GOOD)
    dataset = SFTIndexedDataset(str(prefix))
    for i, (tokens, _) in enumerate(expected):
        np.testing.assert_array_equal(dataset[i].tokens, tokens)


def test_utf8_bom_and_crlf_are_tolerated(tmp_path, sp_model):
    data = tmp_path / "win.jsonl"
    data.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(GOOD[0]).encode()
        + b"\r\n"
        + json.dumps(GOOD[1]).encode()
        + b"\r\n"
    )
    assert convert(data, sp_model, "plain", tmp_path / "ds") == 0
    assert len(SFTIndexedDataset(str(tmp_path / "ds"))) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (("--input", "{tmp}/missing.jsonl"), "does not exist"),
        (("--input", "{tmp}/*.nothing"), "matches no file"),
        (("--input", "{data}", "--tokenizer", "{tmp}/no_tokenizer"), "tokenizer path"),
        (("--input", "{data}", "--workers", "0"), "--workers"),
        (("--input", "{data}", "--output-prefix", "{tmp}/"), "is a directory"),
    ],
)
def test_unusable_arguments_fail_clearly(tmp_path, sp_model, capsys, args, message):
    data = write_lines(tmp_path / "in.jsonl", GOOD)
    args = [a.format(tmp=tmp_path, data=data) for a in args]
    if "--tokenizer" not in args:
        args += ["--tokenizer", sp_model]
    if "--output-prefix" not in args:
        args += ["--output-prefix", tmp_path / "out" / "ds"]
    assert run_cli(*args, "--template", "plain") == 1
    assert message in capsys.readouterr().err


def test_inspect_marks_the_trained_spans(tmp_path, sp_model, capsys):
    data = write_lines(tmp_path / "in.jsonl", [b"{bad", *GOOD])
    assert (
        run_cli("--input", data, "--tokenizer", sp_model, "--template", "llama2", "--inspect", 2)
        == 0
    )
    out = capsys.readouterr().out
    assert "in.jsonl:1: rejected [invalid_json]" in out
    # A token that straddles `[/INST] ` and the answer (`▁fine`) is trained with it.
    for answer in ("A doc.", "hello", "fine"):
        assert re.search(rf"⟦ ?{re.escape(answer)}</s>⟧", out), out
    assert not re.search(r"⟦ ?4</s>⟧", out)  # only 2 samples shown
    assert not list(tmp_path.glob("*.bin"))


def test_command_line_exit_codes(tmp_path, sp_model):
    data = write_lines(tmp_path / "in.jsonl", GOOD + [b'{"messages": 1}'])
    base = [
        sys.executable,
        str(REPO / "tools" / "preprocess.py"),
        "--input",
        str(data),
        "--tokenizer",
        sp_model,
        "--template",
        "plain",
        "--output-prefix",
        str(tmp_path / "ds"),
    ]
    failed = subprocess.run(base, capture_output=True, text=True)
    assert failed.returncode == 1
    assert f"{data}:4: " in failed.stderr and "bad_schema" in failed.stderr
    passed = subprocess.run(base + ["--skip-bad", "--no-progress"], capture_output=True, text=True)
    assert passed.returncode == 0, passed.stderr
    assert "rejected: bad_schema" in passed.stdout


def test_samples_and_lengths_outlive_the_dataset_object(tmp_path, sp_model):
    """megatron's IndexedDataset unmaps its files in __del__; what the reader hands out
    must not be views into that memory (this used to segfault)."""
    import gc

    data = write_lines(tmp_path / "in.jsonl", GOOD)
    assert convert(data, sp_model, "plain", tmp_path / "ds") == 0
    dataset = SFTIndexedDataset(str(tmp_path / "ds"))
    sample, lengths = dataset[1], dataset.lengths
    expected_tokens, expected_lengths = sample.tokens.tolist(), lengths.tolist()
    del dataset
    gc.collect()
    assert sample.tokens.tolist() == expected_tokens and lengths.tolist() == expected_lengths
    assert sample.loss_mask.sum() > 0
