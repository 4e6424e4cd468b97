"""Layout enumeration, constraints, ranking and the no-fit error."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_longalign.planning.layouts import (
    Cluster,
    NoLayoutFits,
    candidate_layouts,
    estimate_step_time,
    layout_problems,
    rank_layouts,
    recommend,
)
from megatron_longalign.planning.memory import Layout, Workload
from tests.planning.test_memory import load


@pytest.mark.parametrize("gpus", [1, 4, 8, 16])
def test_candidates_satisfy_every_constraint(gpus):
    model, work = load("llama3_8b"), Workload(65536, 16)
    layouts = list(candidate_layouts(model, work, gpus, gpus_per_node=8))
    assert layouts
    for layout in layouts:
        assert layout.tp * layout.pp * layout.cp * layout.dp == gpus
        assert model.num_attention_heads % layout.tp == 0
        assert model.query_groups % layout.tp == 0
        assert model.num_layers % layout.pp == 0
        assert 65536 % (2 * layout.cp) == 0 and (65536 // layout.cp) % layout.tp == 0
        assert 16 % layout.dp == 0
        assert layout.tp <= 8
        assert layout.sequence_parallel == (layout.tp > 1)
        assert not layout_problems(model, work, layout, gpus, 8)
    # Every recompute option of a valid parallel layout is offered.
    assert {layout.recompute for layout in layouts} == {"none", "selective", "full"}


def test_constraint_messages():
    model, work = load("llama3_8b"), Workload(65536, 16)
    problems = " | ".join(layout_problems(model, work, Layout(tp=16, dp=1), 16, 8))
    assert "num_query_groups" in problems and "cross a node" in problems
    assert layout_problems(model, work, Layout(pp=3), 3, 8)  # 32 layers
    assert layout_problems(model, Workload(65536, 6), Layout(dp=4), 4, 8)  # batch 6


def test_ranking_puts_fitting_layouts_first_by_step_time():
    model, work = load("llama3_8b"), Workload(65536, 16)
    plans = rank_layouts(model, work, Cluster(gpus=8, gpu_memory_gb=80))
    fitting = [p for p in plans if p.fits]
    assert fitting and plans[: len(fitting)] == fitting
    times = [p.step_time_s for p in fitting]
    assert times == sorted(times)
    # Fitting keeps the default 10% headroom free.
    assert all(p.memory.total <= 72e9 for p in fitting)
    assert all(p.memory.total > 72e9 for p in plans[len(fitting) :])
    no_headroom = rank_layouts(model, work, Cluster(gpus=8, gpu_memory_gb=80, headroom=0.0))
    assert sum(p.fits for p in no_headroom) > len(fitting)


def test_step_time_penalises_recompute_bubble_and_slow_links():
    model, work = load("llama2_7b"), Workload(32768, 8)
    cluster = Cluster(gpus=8)

    def time(layout: Layout, c: Cluster = cluster) -> float:
        return estimate_step_time(model, layout, work, c)[0]

    base = Layout(tp=2, cp=2, dp=2, sequence_parallel=True)
    full = dataclasses.replace(base, recompute="full")
    selective = dataclasses.replace(base, recompute="selective")
    assert time(base) < time(selective) < time(full)
    assert time(Layout(pp=2, dp=4)) > time(Layout(dp=8))  # pipeline bubble
    # The same TP over slower links costs more.
    slow = dataclasses.replace(cluster, intra_node_gb_s=30.0)
    assert time(base, slow) > time(base)


def test_impossible_request_says_what_would_fit():
    model = load("llama2_7b")
    with pytest.raises(NoLayoutFits, match=r"smallest needs .* GB.*GPUs would fit"):
        recommend(model, Workload(131072, 16), Cluster(gpus=1, gpu_memory_gb=80))


def test_no_valid_layout_is_a_clear_error():
    # 3 GPUs: TP 3 does not divide 32 heads, PP 3 not 32 layers, DP 3 not a batch of 16,
    # CP 3 not 2*3 | 65536.
    with pytest.raises(ValueError, match="no TP/PP/CP/DP layout of 3 GPUs"):
        rank_layouts(load("llama3_8b"), Workload(65536, 16), Cluster(gpus=3))


def test_small_model_short_sequence_prefers_data_parallel():
    plan, _ = recommend(load("tiny"), Workload(4096, 16), Cluster(gpus=8))
    assert (plan.layout.tp, plan.layout.pp, plan.layout.cp, plan.layout.dp) == (1, 1, 1, 8)
    assert plan.layout.recompute == "none"
