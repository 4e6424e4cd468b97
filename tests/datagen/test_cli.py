"""tools/self_instruct.py as a user runs it: killed mid-run (SIGKILL, in a subprocess),
then rerun to completion; and bad input exiting 2 before any request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron_longalign.utils.jsonl_records import read_records
from tests.datagen.fake_model import FakeModel
from tests.helpers.openai_server import OpenAIStub, StubReply

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "self_instruct.py"


def cli_args(docs: Path, out: Path, tokenizer: str, base_url: str, *extra: str) -> list[str]:
    return [
        "--input", str(docs), "--output", str(out), "--base-url", base_url,
        "--model", "stub-generator", "--tokenizer", tokenizer, "--min-tokens", "10",
        "--max-retries", "1", "--no-progress", *extra,
    ]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(CLI), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_mid_run_then_resumed_has_every_document_once(tmp_path, english_docs, sp_model):
    out = tmp_path / "samples.jsonl"
    release, answered = threading.Event(), []

    def hangs_after_three_answers(marker, stage, attempt):
        if len(answered) >= 3:
            release.wait(60)  # the client hangs here until the kill
            return StubReply(status=500, headers={"retry-after-ms": "5"})
        if stage == "answer":
            answered.append(marker)
        return None

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with OpenAIStub(FakeModel(hangs_after_three_answers)) as server:
        args = cli_args(english_docs, out, sp_model, server.base_url, "--concurrency", "1")
        process = subprocess.Popen([sys.executable, str(CLI), *args], cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + 90
            while _lines(out) < 3 and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.05)
            assert _lines(out) == 3, "the run did not write 3 samples"
            process.kill()
            process.wait(30)
        finally:
            release.set()
            if process.poll() is None:
                process.kill()
    # a torn line, as a kill in the middle of a write leaves it
    with open(out, "ab") as handle:
        handle.write(b'{"messages": [{"role": "us')

    with OpenAIStub(FakeModel()) as server:
        result = run_cli(
            *cli_args(english_docs, out, sp_model, server.base_url, "--concurrency", "3")
        )
    assert result.returncode == 0, result.stderr[-2000:]
    samples = read_records(out)
    ids = [s["meta"]["document_id"] for s in samples]
    assert sorted(ids) == [f"d{i}" for i in range(8)]  # none missing, none twice
    assert len(server.requests) == 5 * 2  # the 3 finished documents were skipped
    assert not read_records(tmp_path / "samples.rejects.jsonl")
    assert "8 samples" in result.stdout and "0 jobs missing" in result.stdout


def test_bad_input_exits_2_naming_the_problem(tmp_path, english_docs, sp_model):
    requests = []
    with OpenAIStub(lambda body: requests.append(body) or "x") as server:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "ok"}\n{"text": null}\n')
        result = run_cli(*cli_args(bad, tmp_path / "a.jsonl", sp_model, server.base_url))
        assert result.returncode == 2 and f"{bad}:2" in result.stderr
        result = run_cli(*cli_args(english_docs, tmp_path / "b.jsonl", sp_model, server.base_url,
                                   "--min-tokens", "100", "--max-tokens", "50"))  # fmt: skip
        assert (
            result.returncode == 2 and "--min-tokens must be at most --max-tokens" in result.stderr
        )
        result = run_cli(*cli_args(english_docs, tmp_path / "c.jsonl", str(tmp_path / "nope.model"),
                                   server.base_url))  # fmt: skip
        assert result.returncode == 2 and "nope.model" in result.stderr
    assert requests == []
    assert "Traceback" not in result.stderr


def test_the_endpoint_failing_exits_1_and_keeps_the_summary(tmp_path, english_docs, sp_model):
    with OpenAIStub(lambda body: StubReply(status=503, headers={"retry-after-ms": "5"})) as server:
        result = run_cli(*cli_args(english_docs, tmp_path / "s.jsonl", sp_model, server.base_url))
    assert (
        result.returncode == 1
        and "HTTP 503" in result.stderr
        and "rerun to resume" in result.stderr
    )
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert summary["status"] == "failed" and summary["output"]["missing_jobs"] == 8
