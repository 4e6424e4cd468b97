"""The full Trainer on several layouts (torchrun, gloo, CPU) reproduces the single-rank
run on the same global batches: DP=2 with the distributed optimizer in `sequence` and
`token` loss modes with gradient accumulation (global batch 4, micro-batch 1), and TP=2
and PP=2, and TP2xPP2 on 4 processes, and context parallelism: CP=2 and DP2xCP2
against the single rank with the same document padding (workers/train_run.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launch import WORKERS, run_and_read

pytestmark = pytest.mark.slow

TRAIN_RUN = WORKERS.parents[1] / "training" / "workers" / "train_run.py"
MODES = ("sequence", "token")
# fp32 sums in a different order (micro-batches, DP all-reduce, TP partial sums) differ
# by ~1e-7 relative; a wrong scale (x DP, x micro-batches, / tokens) is >= 2x off.
RTOL = 1e-5


@pytest.fixture(scope="module")
def data_file(sample_prefixes, tmp_path_factory):
    path = tmp_path_factory.mktemp("trainer_data") / "prefixes.json"
    path.write_text(json.dumps(sample_prefixes))
    return path


def launch(tmp_path_factory, data_file, name: str, nproc: int, *args: str) -> list[dict]:
    return run_and_read(
        str(TRAIN_RUN),
        nproc,
        tmp_path_factory.mktemp(name),
        ["--data", str(data_file), *args],
        timeout=400,
    )


@pytest.fixture(scope="module")
def dp1(tmp_path_factory, data_file):
    return launch(tmp_path_factory, data_file, "dp1", 1)


def assert_same_trajectory(got: dict, want: dict) -> None:
    assert not any(got["skipped"])
    for key in ("losses", "token_mean_losses", "grad_norms", "lrs"):
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(want[key]), rtol=RTOL, atol=0.0, msg=key
        )


def test_dp2_distributed_optimizer_matches_dp1(tmp_path_factory, data_file, dp1):
    dp2 = launch(tmp_path_factory, data_file, "dp2", 2)
    (single,) = dp1
    assert single["dp_size"] == 1 and [r["dp_size"] for r in dp2] == [2, 2]
    for mode in MODES:
        assert single[mode]["micro_batches"] == 4  # gradient accumulation over 4
        losses = single[mode]["losses"]
        assert losses[-1] < losses[0], (mode, losses)  # the steps do train
        for rank in dp2:
            assert rank[mode]["micro_batches"] == 2
            assert_same_trajectory(rank[mode], single[mode])
    # The two modes are different objectives on the same batches.
    assert single["sequence"]["losses"][0] != pytest.approx(single["token"]["losses"][0])


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2")], ids=["tp2", "pp2"])
def test_model_parallel_trainer_matches_single_rank(tmp_path_factory, data_file, dp1, layout):
    results = launch(tmp_path_factory, data_file, layout[0][2:] + "2", 2, *layout)
    (single,) = dp1
    for rank in results:
        assert rank["dp_size"] == 1
        for mode in MODES:
            # Every rank (also the first pipeline stage) sees the job-wide loss.
            assert_same_trajectory(rank[mode], single[mode])


def test_tp2_pp2_on_four_processes_matches_single_rank(tmp_path_factory, data_file, dp1):
    results = launch(tmp_path_factory, data_file, "tp2pp2", 4, "--tp", "2", "--pp", "2")
    (single,) = dp1
    assert len(results) == 4
    for rank in results:
        assert rank["dp_size"] == 1
        for mode in MODES:
            assert_same_trajectory(rank[mode], single[mode])


@pytest.fixture(scope="module")
def dp1_padded(tmp_path_factory, data_file):
    """The single-rank run with documents padded to 4 as CP=2 pads them: the same packs
    (the planner packs padded lengths). That padding itself changes no loss (tests/
    parallel/test_context_parallel.py compares CP against unpadded documents)."""
    return launch(tmp_path_factory, data_file, "dp1_pad4", 1, "--pad-documents", "4")


@pytest.mark.parametrize("nproc", [2, 4], ids=["cp2", "dp2cp2"])
def test_context_parallel_trainer_matches_single_rank(
    tmp_path_factory, data_file, dp1_padded, nproc
):
    results = launch(tmp_path_factory, data_file, f"cp2_{nproc}", nproc, "--cp", "2")
    (single,) = dp1_padded
    assert len(results) == nproc
    for rank in results:
        assert rank["cp_size"] == 2 and rank["dp_size"] == nproc // 2
        for mode in MODES:
            assert_same_trajectory(rank[mode], single[mode])
            assert rank[mode]["target_tokens"] == single[mode]["target_tokens"]
            # Loss by length sums each document's shares over the CP group first.
            got, want = rank[mode]["loss_by_len"], single[mode]["loss_by_len"]
            assert got.keys() == want.keys() and want
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=RTOL), key
