"""tools/pack_stats.py: batching comparison figures against hand-computed values."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from megatron_longalign.config.data import DataConfig, DatasetSource, PackingConfig
from megatron_longalign.data.pack_stats import compare_batching
from tests.conftest import REPO


def test_figures_on_a_hand_checkable_example():
    # Four samples; micro-batches of 2 samples (naive/sorted) or 2 packs (packed).
    lengths = np.array([100, 10, 90, 20])
    config = DataConfig(
        sources=[DatasetSource("x")],
        seq_length=128,
        micro_batch_size=2,
        global_batch_size=2,
        attention_equiv_length=100,
        packing=PackingConfig("first_fit_decreasing"),
    )
    stats = {s.name: s for s in compare_batching(lengths, np.ones(4, int), [4], [1.0], config)}
    needed = float((lengths.astype(float) ** 2).sum())
    packed = stats["packed (first_fit_decreasing)"]
    # FFD: [100, 20], [90, 10] -> 2 packs, one micro-batch of 2 packs.
    assert packed.micro_batches == 1 and packed.fill == pytest.approx(220 / (1 * 2 * 128))
    assert packed.attention_computed == needed and packed.padding_waste == 0
    whole = stats["packed, whole-pack mask"]
    assert whole.attention_computed == 120**2 + 100**2
    naive = stats["naive"]
    # Each micro-batch pads to its longest sample: computed >= real, waste > 0 unless equal.
    assert naive.computed_tokens >= naive.real_tokens == 220
    sorted_ = stats["sorted"]
    assert sorted_.computed_tokens == 220 and sorted_.attention_computed == needed
    # Cost model: sum(L + L^2/100) for packed/sorted; naive pays for its padding.
    assert packed.cost == pytest.approx(220 + needed / 100)
    assert naive.speedup_over_naive == 1.0
    assert packed.speedup_over_naive == pytest.approx(naive.cost / packed.cost)
    assert whole.speedup_over_naive < packed.speedup_over_naive


def test_cli_prints_the_table(sample_prefixes, capsys):
    spec = importlib.util.spec_from_file_location(
        "pack_stats_cli", REPO / "tools" / "pack_stats.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = [
        "--prefix",
        sample_prefixes["long"],
        sample_prefixes["short"] + ":0.5",
        "--seq-length",
        "4096",
    ]
    assert (
        cli.main(args + ["--global-batch-size", "4", "--micro-batch-size", "2", "--dp", "2"]) == 0
    )
    out = capsys.readouterr().out
    for name in (
        "naive",
        "sorted",
        "packed (next_fit)",
        "packed (best_fit_decreasing)",
        "packed, whole-pack mask",
    ):
        assert f"| {name} |" in out
    assert "longer than --seq-length" in out  # a long sample exceeds 4096 and is reported
    assert cli.main(["--prefix", "/nonexistent/prefix"]) == 1
