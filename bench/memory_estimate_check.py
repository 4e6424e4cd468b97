#!/usr/bin/env python
"""Check the memory planner (megatron_longalign/planning) against real CPU training runs.

Each case trains 2 steps of a small Llama-style model through the real Trainer
(megatron-core GPTModel, DDP with the fp32 grad buffer, distributed optimizer, sdpa
attention, fp32, one process) on a synthetic preprocessed dataset whose documents all
have `doc` tokens, packed into rows of `seq` tokens (global batch 1 row). The second
step is the measured one: Adam's state only exists after the first update.

Measurement: peak resident set size (VmHWM, utils/memory.py) minus the RSS just before the Trainer
is built (after imports and data writing), in a fresh process per case, so an earlier
case's peak cannot hide a later one. glibc is told to return freed blocks of 64 KiB and
more to the OS at once (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), so RSS tracks
live tensors instead of the allocator's cache. Why RSS: torch has no CPU allocator
statistics (torch.cuda.max_memory_allocated has no CPU twin), and the profiler's memory
timeline is private API. What RSS also counts (and the estimate does not): megatron's and
oneDNN's workspaces, the process-group and data structures built by the Trainer.

Estimate: `planning.memory.estimate_memory` with the CPU_FP32 profile (fp32 weights and
grads, Adam m and v without a master copy, torch's RMSNorm, sdpa math path keeping the
per-document heads x L^2 probabilities), overhead 0.

    python bench/memory_estimate_check.py                 # 5 cases, ~3 minutes
    python bench/memory_estimate_check.py --all           # 7 cases, ~5 minutes
    python bench/memory_estimate_check.py --quick         # the two smallest cases
    python bench/memory_estimate_check.py --output-json memory_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MALLOC_ENV = {
    # Fixed thresholds (setting them disables glibc's dynamic mmap threshold): blocks of
    # 64 KiB and more are mmapped and unmapped on free, and the heap top is trimmed.
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "OMP_NUM_THREADS": "2",
}


@dataclass(frozen=True)
class Case:
    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    seq: int
    doc: int
    recompute: str  # none | selective | full

    def model_config(self):
        from megatron_longalign.config.model import ModelConfig

        return ModelConfig(
            name=self.name,
            num_layers=self.layers,
            hidden_size=self.hidden,
            ffn_hidden_size=self.ffn,
            num_attention_heads=self.heads,
            num_query_groups=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=max(4096, self.seq),
            attention_backend="sdpa",
        )


def _case(name, hidden, heads, seq, doc, recompute, layers=4, vocab=4096) -> Case:
    # SwiGLU width ~8/3 hidden rounded to 8, GQA 2:1, as in the Llama family.
    ffn = (8 * hidden // 3 + 7) // 8 * 8
    return Case(name, hidden, ffn, heads, heads // 2, layers, vocab, seq, doc, recompute)


CASES = [
    _case("h256-s2k-none", 256, 4, 2048, 2048, "none"),
    _case("h256-s2k-full", 256, 4, 2048, 2048, "full"),
    _case("h512-s4k-none", 512, 8, 4096, 1024, "none"),
    _case("h512-s4k-sel", 512, 8, 4096, 1024, "selective"),
    _case("h512-s4k-full", 512, 8, 4096, 1024, "full"),
    _case("h512-s8k-none", 512, 8, 8192, 1024, "none"),
    _case("h512-s8k-full", 512, 8, 8192, 1024, "full"),
]
QUICK = ["h256-s2k-none", "h256-s2k-full"]
# The default run (~3 minutes on 2 cores); --all adds h512-s4k-none and h512-s4k-full.
DEFAULT = ["h256-s2k-none", "h256-s2k-full", "h512-s4k-sel", "h512-s8k-none", "h512-s8k-full"]


# ---- the estimate --------------------------------------------------------------------


def estimate_case(case: Case) -> dict[str, float]:
    from megatron_longalign.planning.memory import CPU_FP32, Layout, Workload, estimate_memory

    layout = Layout(recompute=case.recompute)
    workload = Workload(case.seq, global_batch_size=1, document_length=case.doc)
    return estimate_memory(case.model_config(), layout, workload, CPU_FP32).as_gb()


# ---- the measurement (runs in a fresh process) -----------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _write_dataset(prefix: str, case: Case, rows: int) -> None:
    """`rows` packs' worth of documents of exactly `case.doc` random tokens; the last
    eighth of each is the assistant answer (the loss path is the real one)."""
    import numpy as np

    from megatron_longalign.devdata.random_dataset import write_random_dataset

    lengths = np.full(rows * (case.seq // case.doc), case.doc)
    write_random_dataset(prefix, lengths, case.vocab, seed=0, origin="memory_estimate_check")


def _training_config(case: Case, prefix: str, steps: int):
    from megatron_longalign.config.data import DataConfig, DatasetSource
    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.config.training import (
        LoggingConfig,
        LongAlignConfig,
        OptimConfig,
        RecomputeConfig,
        TrainConfig,
    )

    recompute = {
        "none": RecomputeConfig(),
        "selective": RecomputeConfig(granularity="selective", modules=["core_attn"]),
        "full": RecomputeConfig(granularity="full", method="uniform", num_layers=1),
    }[case.recompute]
    return LongAlignConfig(
        name="memory-check",
        model=case.model_config(),
        data=DataConfig(
            sources=[DatasetSource(prefix, 1.0)],
            seq_length=case.seq,
            micro_batch_size=1,
            global_batch_size=1,
            on_overlength="drop",
            seed=1,
        ),
        parallel=ParallelConfig(use_distributed_optimizer=True),
        optim=OptimConfig(lr=1e-5, min_lr=1e-5, lr_decay_style="constant"),
        train=TrainConfig(max_steps=steps, precision="fp32", recompute=recompute, seed=1),
        logging=LoggingConfig(progress_bar=False),
    )


def run_case(case: Case, steps: int = 2) -> dict[str, Any]:
    """Train `steps` steps of `case` in THIS process and return its peak RSS growth.
    Only meaningful in a fresh process (see `measure_case`)."""
    import torch

    from megatron_longalign.parallel.distributed import destroy_distributed
    from megatron_longalign.training.trainer import Trainer
    from megatron_longalign.utils.memory import peak_rss_bytes

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "docs")
        _write_dataset(prefix, case, rows=steps + 1)
        config = _training_config(case, prefix, steps)
        baseline = _rss_bytes()
        start = time.perf_counter()
        trainer = Trainer(config, check_files=False)
        after_build = _rss_bytes()
        batches = trainer.batches()
        tokens = []
        for _ in range(steps):
            batch = next(batches)
            trainer.train_step(batch)
            tokens.append(batch.real_tokens)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
        destroy_distributed()
    return {
        "baseline_gb": baseline / 1e9,
        "build_gb": (after_build - baseline) / 1e9,
        "measured_gb": (peak - baseline) / 1e9,
        "tokens_per_step": tokens,
        "seconds": seconds,
    }


def measure_case(case: Case, timeout: float = 300.0) -> dict[str, Any]:
    """`run_case` in a fresh Python process with the allocator settings above."""
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {case.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(case: Case) -> dict[str, Any]:
    estimate = estimate_case(case)
    measured = measure_case(case)
    error = (estimate["total"] - measured["measured_gb"]) / measured["measured_gb"]
    return {
        "case": asdict(case),
        "estimate_gb": estimate,
        **measured,
        "relative_error": error,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | hidden | layers | seq | doc | recompute | estimated GB | measured GB | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        case = row["case"]
        lines.append(
            f"| {case['name']} | {case['hidden']} | {case['layers']} | {case['seq']} | "
            f"{case['doc']} | {case['recompute']} | {row['estimate_gb']['total']:.3f} | "
            f"{row['measured_gb']:.3f} | {row['relative_error']:+.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the smallest cases")
    parser.add_argument("--all", action="store_true", help="every case (~5 minutes)")
    parser.add_argument("--cases", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--output-json", help="write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(Case(**json.loads(args.worker)))))
        return 0
    names = args.cases or (
        QUICK if args.quick else [c.name for c in CASES] if args.all else DEFAULT
    )
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {[c.name for c in CASES]}")
    rows = []
    for case in (c for c in CASES if c.name in names):
        row = compare(case)
        rows.append(row)
        print(
            f"{case.name}: estimated {row['estimate_gb']['total']:.3f} GB, measured "
            f"{row['measured_gb']:.3f} GB ({row['relative_error']:+.1%}), "
            f"{row['seconds']:.1f} s",
            flush=True,
        )
    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}")
    print(_table(rows))
    errors = [abs(r["relative_error"]) for r in rows]
    print(f"max |error| {max(errors):.1%}, mean |error| {sum(errors) / len(errors):.1%}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
