"""CheckpointManager end to end under torchrun on CPU (workers/checkpoint_manager_run.py): exact resume
with DDP + distributed Adam + LR scheduler + RNG, a save killed before its rename, and
resharding (DP2 -> DP1 -> DP2 with the default dp_reshardable optimizer format, TP2 ->
TP1 with fully_reshardable)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_longalign.training.checkpoint import CheckpointManager, read_marker
from tests.helpers.launch import read_rank_results, run_workers

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "workers" / "checkpoint_manager_run.py"
STEP2, STEP4 = "step_00000002", "step_00000004"


def launch(nproc: int, out: Path, *args: str) -> list[dict]:
    run_workers(WORKER, nproc, ["--out", str(out), *args])
    return read_rank_results(out)


def assert_weights_close(actual: dict, expected: dict, rel: float = 1e-4) -> None:
    """Per tensor ||a - b|| <= rel * ||b||. Changing TP or DP changes float reduction
    order, which Adam amplifies where gradients are ~0; a lost or wrong Adam state
    would be off by ~lr per element (relative error ~0.1 here)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        a, b = torch.tensor(actual[name]), torch.tensor(expected[name])
        assert (a - b).norm() <= rel * b.norm(), name


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory) -> dict:
    """DP=2: train steps 1-2 saving each (keep_last=1), record steps 3-4, then save step
    4 with rank 0 SIGKILLed after the temp dir is complete, before its rename."""
    base = tmp_path_factory.mktemp("dp2")
    root = base / "ckpt"
    args = ["--action", "first", "--root", str(root), "--keep-last", "1", "--crash-save"]
    with pytest.raises(RuntimeError, match="exited with"):
        run_workers(WORKER, 2, ["--out", str(base / "first"), *args])
    return {
        "base": base,
        "root": root,
        "results": read_rank_results(base / "first"),
        # what the crash left, before later tests add to the directory
        "entries": sorted(p.name for p in root.iterdir()),
        "latest": CheckpointManager(root).latest(),
    }


def test_killed_save_leaves_latest_on_previous_checkpoint(dp2_run):
    entries, root = dp2_run["entries"], dp2_run["root"]
    temps = [name for name in entries if name.startswith(f"{STEP4}.tmp-")]
    # step 1 was pruned (keep_last=1); step 4 never got its name; `latest` still step 2
    assert entries == sorted(["latest", STEP2, *temps]) and len(temps) == 1
    assert dp2_run["latest"] == root / STEP2
    marker = read_marker(root / STEP2)
    assert marker["step"] == 2 and marker["consumed_samples"] == 8
    assert marker["plan_position"] == {"epoch": 0, "step": 2}
    assert marker["layout"]["data_parallel_size"] == 2
    assert marker["sharding_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"


def test_exact_resume_restores_training_and_rng(dp2_run):
    """A fresh process group resumes from `latest` (the checkpoint before the killed
    save): same RNG draws, bit-identical losses and weights; then its own save at step
    4 commits and cleans up the dead save's temp dir."""
    root, first = dp2_run["root"], dp2_run["results"]
    args = ["--action", "resume", "--root", str(root), "--keep-last", "2", "--save-at-end"]
    resumed = launch(2, dp2_run["base"] / "resume", *args)

    for before, after in zip(first, resumed, strict=True):
        assert after["loaded_path"] == str(root / STEP2)
        assert after["state"] == {
            "step": 2,
            "consumed_samples": 8,
            "plan_position": {"epoch": 0, "step": 2},
            "extra": {"run_id": "run-abc", "config_hash": "c0ffee"},
        }
        assert after["draws"] == before["draws"]  # python, numpy, torch, megatron tracker
        assert after["losses"] == before["losses"]  # exact
    assert first[0]["draws"]["python"] != first[1]["draws"]["python"]  # per-rank streams
    assert resumed[0]["loaded_params"] == first[0]["saved_params"]
    assert resumed[0]["params"] == first[0]["params"]

    assert sorted(p.name for p in root.iterdir()) == ["latest", STEP2, STEP4]
    assert CheckpointManager(root).latest() == root / STEP4


def test_resume_resharded_dp2_to_dp1_and_back(dp2_run):
    """dp_reshardable: the DP=2 checkpoint loads at DP=1 (and is re-saved there), and
    that one loads at DP=2; both continue the uninterrupted run."""
    base, first = dp2_run["base"], dp2_run["results"][0]
    dp1_root = base / "ckpt_dp1"
    dp1 = launch(
        1,
        base / "dp1",
        *("--action", "resume", "--root", str(base / "unused")),
        *("--load-path", str(dp2_run["root"] / STEP2), "--resave-root", str(dp1_root)),
    )[0]
    assert dp1["loaded_params"] == first["saved_params"]
    assert dp1["losses"] == pytest.approx(first["losses"], rel=1e-6)
    assert_weights_close(dp1["params"], first["params"])
    assert dp1["draws"] != first["draws"]  # layout changed: RNG not restored

    assert read_marker(dp1_root / STEP2)["layout"]["data_parallel_size"] == 1
    dp2 = launch(2, base / "dp1_to_dp2", "--action", "resume", "--root", str(dp1_root))
    assert dp2[0]["loaded_params"] == first["saved_params"]
    for result in dp2:
        assert result["losses"] == pytest.approx(first["losses"], rel=1e-6)
    assert_weights_close(dp2[0]["params"], first["params"])


def test_resume_resharded_tp2_to_tp1(tmp_path):
    """fully_reshardable: model and distributed-optimizer state saved at TP=2 load at
    TP=1; the weights come back exactly and training continues as at TP=2."""
    root = tmp_path / "ckpt"
    common = ("--root", str(root), "--format", "fully_reshardable")
    tp2 = launch(2, tmp_path / "tp2", "--tp", "2", "--action", "first", *common)[0]
    tp1 = launch(
        1, tmp_path / "tp1", "--action", "resume", "--load-path", str(root / STEP2), *common
    )[0]
    assert read_marker(root / STEP2)["layout"]["tensor_model_parallel_size"] == 2
    assert tp1["loaded_params"] == tp2["saved_params"]
    assert tp1["losses"] == pytest.approx(tp2["losses"], rel=1e-5)
    assert_weights_close(tp1["params"], tp2["params"])
