"""ParallelConfig validation (in process) and single-process initialize_distributed
(in a subprocess, since CPU mode cannot be turned off again)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_longalign.config.errors import raise_if_problems
from megatron_longalign.config.parallel import ParallelConfig
from megatron_longalign.parallel.distributed import parallel_problems
from tests.helpers.launch import REPO, WORKERS, worker_env


def test_valid_layouts_give_data_parallel_size():
    assert ParallelConfig().data_parallel_size_for(1) == 1
    assert ParallelConfig(tensor_model_parallel_size=2).data_parallel_size_for(8) == 4
    layout = ParallelConfig(
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        context_parallel_size=2,
        sequence_parallel=True,
    )
    assert layout.data_parallel_size_for(16) == 2


def test_world_size_must_divide():
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"world size 8 is not divisible .* = 6"):
        raise_if_problems(parallel_problems(layout, 8))


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(
        ValueError, match="sequence_parallel=true needs tensor_model_parallel_size > 1"
    ):
        raise_if_problems(parallel_problems(ParallelConfig(sequence_parallel=True), 4))


@pytest.mark.parametrize("field", ["tensor_model_parallel_size", "context_parallel_size"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=f"parallel.{field} must be an integer >= 1"):
        raise_if_problems(parallel_problems(ParallelConfig(**{field: value}), 4))


def test_initialize_single_process_on_cpu(tmp_path):
    out = tmp_path / "init.json"
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "init_single.py"), str(out)],
        env=worker_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "gloo"
    assert result["world_size"] == result["dp_size"] == 1
    assert result["dp_rank"] == 0 and result["last_stage"]
    assert result["reseeded_same_stream"]
    assert "already initialized with (tp, pp, cp) = (1, 1, 1)" in result["layout_change_error"]
    assert result["destroyed"] and result["reinitialized"]


def test_rank0_then_broadcast_gives_every_rank_the_result_or_the_error(tmp_path):
    from tests.helpers.launch import run_and_read

    results = run_and_read("rank0_broadcast.py", 2, tmp_path)
    for rank, result in enumerate(results):
        assert result["value"] == {"value": {"from": 0, "path": "a/b"}}
        assert result["calls"] == ([0] if rank == 0 else [])  # run on rank 0 only
        assert result["error"] == {
            "error": "FileExistsError",
            "message": "step_00000002 exists (raised on rank 0)",
        }
        assert result["after"] == 2.0
    assert results[0]["unpicklable"] == {"error": "Unpicklable", "message": "cannot travel"}
    assert results[1]["unpicklable"] == {
        "error": "RuntimeError",
        "message": "Unpicklable on rank 0: cannot travel",
    }
