"""`python -m megatron_longalign.train +experiment=smoke` (Hydra) in a subprocess, on
the test datasets laid out as `make demo` writes them (DEMO_OUT/long, DEMO_OUT/short_chat)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longalign.training.metrics_file import read_metrics
from tests.helpers.launch import REPO, worker_env


@pytest.fixture(scope="module")
def demo_dir(sample_prefixes, tmp_path_factory) -> Path:
    """The session's test datasets under the demo's names."""
    root = tmp_path_factory.mktemp("demo")
    for name, prefix in (
        ("long", sample_prefixes["long"]),
        ("short_chat", sample_prefixes["short"]),
    ):
        # P.json names its files relative to its real directory: the link is enough.
        os.symlink(prefix + ".json", root / (name + ".json"))
    return root


def run_train(demo_dir: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = worker_env()
    env["DEMO_OUT"] = str(demo_dir)
    # wandb (mode auto) stays offline and writes under the run directory.
    env.pop("WANDB_API_KEY", None)
    env["WANDB_MODE"] = "offline"
    env["WANDB_SILENT"] = "true"
    command = [
        sys.executable,
        "-m",
        "megatron_longalign.train",
        "+experiment=smoke",
        # Checkpoints and wandb go under train.output_dir (Hydra's run dir too).
        f"train.output_dir={run_dir}",
        "logging.progress_bar=false",
        *overrides,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_smoke_experiment_trains_a_few_steps(demo_dir, tmp_path):
    result = run_train(
        demo_dir,
        tmp_path / "run",
        "train.max_steps=3",
        "optim.lr_warmup_steps=1",
        "data.seq_length=1024",
        "logging.log_interval=1",
        "data.valid_fraction=0.2",
        "train.eval_interval=2",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for step in (1, 2, 3):
        assert f"step {step} | loss " in output, output
    # Validation after step 2 and at the end, on the console and in metrics.jsonl.
    assert "validation: " in output and "of the training sources (held out)" in output
    for step in (2, 3):
        assert f"step {step} | valid loss " in output, output
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in lines] == [
        (1, "train"),
        (2, "train"),
        (2, "valid"),
        (3, "train"),
        (3, "valid"),
    ]
    assert "done: 3 steps (0 skipped)" in output
    # The end of the run is checkpointed, and wandb wrote an offline run.
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert f"{demo_dir}/long (weight 1)" in output  # DEMO_OUT picked the datasets
    # Hydra's record of the config, in the run directory we asked for.
    assert "name: smoke" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


def test_invalid_config_exits_with_the_problem(demo_dir, tmp_path):
    # 3 steps but the smoke experiment warms up for 4: said before anything is built.
    result = run_train(demo_dir, tmp_path / "run", "train.max_steps=3")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "optim.lr_warmup_steps (4) must be smaller" in output
    assert "Traceback" not in output
