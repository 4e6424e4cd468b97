"""Preprocessed data (issue 10): no silent loss, and every failure a one-paragraph
message naming the file and the fix, with no traceback, before any expensive work.

Preprocessing cases run tools/preprocess.py; start-up cases run the training entry point
(`+experiment=smoke` on DEMO_OUT) on broken sets and must stop in the validation, before
the model is built. Read-only and full disks are simulated by tests/reliability/
faulty_fs.py (fault injection: works unprivileged and as root, where file modes mean
nothing).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
from tests.conftest import chat, write_lines
from tests.helpers.launch import REPO
from tests.reliability.harness import Case, Setup, case_ids, run_case, tool

TOKENIZER = str(REPO / "data" / "sample" / "tokenizer.model")
FAULTY_FS = str(Path(__file__).resolve().parent / "faulty_fs.py")
MODEL_BUILT = "parameters on this rank"  # the trainer's first log line after the model
_SESSION: dict[str, str] = {}  # session fixtures for the cases (see `_session`)


@pytest.fixture(autouse=True)
def _session(sp_model):
    _SESSION["other_tokenizer"] = sp_model


def chats(n: int, words: int = 8) -> list[dict]:
    return [
        chat(f"question {i}: " + "lorem ipsum " * words + "?", f"answer {i} " + "dolor " * words)
        for i in range(n)
    ]


def make_set(prefix: Path, records: list[dict], tokenizer: str = TOKENIZER) -> Path:
    """A preprocessed set at `prefix` (in this process: fast)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    data = write_lines(prefix.parent / f"{prefix.name}.input.jsonl", records)
    preprocess(
        PreprocessConfig(
            inputs=(str(data),), output_prefix=str(prefix), spec=EncodeSpec(tokenizer, "llama2")
        )
    )
    return prefix


def set_paths(prefix: Path) -> list[Path]:
    """P.json and every file it names (sft-v1 named none: P<suffix>, so that the cases
    also run, and fail, on the code before issue 10)."""
    meta = json.loads(Path(f"{prefix}.json").read_text())
    if "files" not in meta:
        return sorted(prefix.parent.glob(f"{prefix.name}.*"))
    return [Path(f"{prefix}.json"), *(prefix.parent / r["name"] for r in meta["files"].values())]


def member(prefix: Path, suffix: str) -> Path:
    meta = json.loads(Path(f"{prefix}.json").read_text())
    if "files" not in meta:
        return Path(f"{prefix}{suffix}")
    return prefix.parent / meta["files"][suffix]["name"]


def preprocess_args(data: Path, prefix: Path, *extra: str) -> list[str]:
    return [
        "--input",
        str(data),
        "--tokenizer",
        TOKENIZER,
        "--template",
        "llama2",
        "--output-prefix",
        str(prefix),
        "--no-progress",
        *extra,
    ]


def faulty(fault: str, value: str, *args: str) -> list[str]:
    return [
        sys.executable,
        FAULTY_FS,
        fault,
        value,
        "--",
        str(REPO / "tools" / "preprocess.py"),
        *args,
    ]


# ---- preprocessing -----------------------------------------------------------------------


def overwrite_without_flag(d: Path) -> Setup:
    prefix = make_set(d / "out" / "long", chats(20))
    data = write_lines(d / "small.jsonl", chats(2))
    return Setup(
        tool("preprocess", *preprocess_args(data, prefix)),
        protected=[d / "out"],
        expect=[f"{prefix}.json already exists"],
    )


def read_only_output(d: Path) -> Setup:
    out = d / "out"
    prefix = make_set(out / "long", chats(20))
    data = write_lines(d / "new.jsonl", chats(30))
    return Setup(
        faulty("--read-only", str(out), *preprocess_args(data, prefix, "--overwrite")),
        protected=[out],
        expect=[str(out)],
    )


def full_disk_at_start(d: Path) -> Setup:
    out = d / "out"
    out.mkdir()
    data = write_lines(d / "in.jsonl", chats(30))
    return Setup(
        faulty("--full-disk", f"{out}:0", *preprocess_args(data, out / "long")),
        protected=[out],
        expect=[f"cannot write {out}/long.json.tmp-"],
    )


def disk_fills_during_the_run(d: Path) -> Setup:
    out = d / "out"
    prefix = make_set(out / "long", chats(20))
    data = write_lines(d / "big.jsonl", chats(400, words=40))
    # 64 KiB go to the up-front probe; the token file then fills the rest.
    return Setup(
        faulty("--full-disk", f"{out}:100000", *preprocess_args(data, prefix, "--overwrite")),
        protected=set_paths(prefix),
        expect=[f"cannot write {out}/long.bin.tmp-", f"{prefix}.json and the files it names"],
    )


def killed_at_the_third_rename(d: Path) -> Setup:
    out = d / "out"
    prefix = make_set(out / "long", chats(20))
    data = write_lines(d / "new.jsonl", chats(3))
    return Setup(
        faulty("--kill-at-replace", f"{out}:3", *preprocess_args(data, prefix, "--overwrite")),
        protected=set_paths(prefix),  # the old set: still complete and named by P.json
    )


def leftovers_of_a_dead_run(d: Path) -> Setup:
    out = d / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid
    for name in (f"long.bin.tmp-{dead}", f"long.json.tmp-{dead}", "long.0123456789ab.idx"):
        (out / name).write_bytes(b"partial")
    live = out / f"long.regions.bin.tmp-{os.getpid()}"  # the test process: alive
    live.write_bytes(b"partial")
    data = write_lines(d / "in.jsonl", chats(3))
    return Setup(
        tool("preprocess", *preprocess_args(data, out / "long")),
        protected=[live],
        expect=[
            f"removed 2 file(s) that an interrupted run for {out}/long left",
            f"long.bin.tmp-{dead}, long.json.tmp-{dead}",
            f"{live} belongs to process {os.getpid()}, which is still running",
            # While another run may be publishing, its renamed files are not touched.
            "(long.0123456789ab.idx); left alone because another run is active",
        ],
    )


# ---- start-up of a training run ----------------------------------------------------------


def _demo(d: Path) -> tuple[Path, Path]:
    demo = d / "demo"
    return make_set(demo / "long", chats(6, words=30)), make_set(demo / "short_chat", chats(8))


def _train(d: Path, *overrides: str, protected=(), expect=()) -> Setup:
    command = [
        sys.executable,
        "-m",
        "megatron_longalign.train",
        "+experiment=smoke",
        f"train.output_dir={d / 'run'}",
        "logging.progress_bar=false",
        *overrides,
    ]
    return Setup(
        command,
        protected=[d / "demo", *protected],
        env={"DEMO_OUT": str(d / "demo")},
        expect=list(expect),
    )


def truncated_index(d: Path) -> Setup:
    long, _ = _demo(d)
    idx = member(long, ".idx")
    idx.write_bytes(idx.read_bytes()[:-5])
    return _train(d, expect=[str(idx), "truncated"])


def truncated_data_file(d: Path) -> Setup:
    _, short = _demo(d)
    data = member(short, ".bin")
    data.write_bytes(data.read_bytes()[:-2])
    return _train(d, expect=[str(data), "truncated"])


def missing_data_file(d: Path) -> Setup:
    long, _ = _demo(d)
    regions = member(long, ".regions.bin")
    regions.unlink()
    return _train(d, expect=[f"{regions} (named by {long}.json) is missing"])


def old_format(d: Path) -> Setup:
    long, _ = _demo(d)
    meta = json.loads(Path(f"{long}.json").read_text())
    meta["format"] = "megatron-longalign/sft-v1"
    Path(f"{long}.json").write_text(json.dumps(meta))
    return _train(d, expect=[f"{long}.json is in the old data format 'megatron-longalign/sft-v1'"])


def different_tokenizers(d: Path) -> Setup:
    demo = d / "demo"
    long = make_set(demo / "long", chats(6))
    short = make_set(demo / "short_chat", chats(8), tokenizer=_SESSION["other_tokenizer"])
    return _train(d, expect=[f"{long}.json", f"{short}.json"])


def every_sample_too_long(d: Path) -> Setup:
    _demo(d)  # every sample has more than 16 tokens
    return _train(d, "data.seq_length=16")


def garbage_metadata(d: Path) -> Setup:
    _, short = _demo(d)
    Path(f"{short}.json").write_bytes(b'{"format": "megatron-longalign/sft-v2", "files": {\x00')
    return _train(d, expect=[f"{short}.json is not valid JSON"])


FIX = "tools/preprocess.py"
CASES = [
    Case("overwrite_without_flag", overwrite_without_flag, 1, ["--overwrite", "error: "]),
    Case(
        "read_only_output_dir",
        read_only_output,
        1,
        ["Read-only file system", "choose a writable location", "nothing was written"],
    ),
    Case(
        "full_disk_at_start",
        full_disk_at_start,
        1,
        ["No space left on device", "free space on that file system", "nothing was written"],
    ),
    Case(
        "disk_fills_during_the_run",
        disk_fills_during_the_run,
        1,
        ["No space left on device", "Nothing was published"],
    ),
    Case("killed_at_the_third_rename", killed_at_the_third_rename, -9),
    Case("leftovers_of_a_dead_run", leftovers_of_a_dead_run, 0, ["samples written"]),
    Case("truncated_idx", truncated_index, 2, [FIX, "--overwrite"]),
    Case("truncated_bin", truncated_data_file, 2, [FIX]),
    Case("missing_data_file", missing_data_file, 2, [FIX]),
    Case("old_format_sft_v1", old_format, 2, [f"rerun {FIX} --output-prefix"]),
    Case(
        "different_tokenizers",
        different_tokenizers,
        2,
        ["preprocessed with different tokenizers", f"{FIX} --tokenizer"],
    ),
    Case(
        "every_sample_longer_than_seq_length",
        every_sample_too_long,
        2,
        [
            r"every sample is longer than data.seq_length=16: all 14 would be dropped",
            r"data.sources\[0\] \(.*/long\): 6 of 6",
            "Set data.seq_length >= ",
            "--max-length 16",
        ],
    ),
    Case("metadata_not_json", garbage_metadata, 2, [FIX]),
]
TRAINER_CASES = {c.name for c in CASES[6:]}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c.name in TRAINER_CASES else c for c in CASES],
    ids=case_ids(CASES),
)
def test_data_case(case: Case, tmp_path):
    result = run_case(case, tmp_path)
    output = result.stdout + result.stderr
    out = tmp_path / "out"
    if case.name in TRAINER_CASES:
        # Stopped by the start-up checks: no model was built, one error paragraph.
        assert MODEL_BUILT not in output, output
        assert "invalid configuration" in output
    elif case.exit_code not in (0, -9):
        # Nothing half-written stays behind.
        assert not [p for p in out.iterdir() if ".tmp-" in p.name], list(out.iterdir())
    if case.name == "killed_at_the_third_rename":
        # The old set still reads completely (the new files are orphans); the next run
        # removes what the killed one left and reports it.
        from megatron_longalign.data.indexed import SFTIndexedDataset

        assert len(SFTIndexedDataset(str(out / "long"), verify=True)) == 20
        leftovers = sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)
        assert leftovers, list(out.iterdir())
        data = write_lines(tmp_path / "again.jsonl", chats(3))
        rerun = subprocess.run(
            tool("preprocess", *preprocess_args(data, out / "long", "--overwrite")),
            capture_output=True,
            text=True,
        )
        assert rerun.returncode == 0, rerun.stderr
        assert re.search(r"removed \d+ file\(s\) that an interrupted run", rerun.stderr)
        assert all(name in rerun.stderr for name in leftovers)
        assert len(SFTIndexedDataset(str(out / "long"), verify=True)) == 3
        assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    if case.name == "leftovers_of_a_dead_run":
        assert sorted(p.name for p in out.iterdir() if "tmp" in p.name or "0123" in p.name) == [
            "long.0123456789ab.idx",
            f"long.regions.bin.tmp-{os.getpid()}",
        ]
