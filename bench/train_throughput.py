#!/usr/bin/env python
"""Training throughput of the real Trainer (megatron-core GPTModel, schedules, distributed
optimizer; world size 1): tokens/s and MFU per (packed sequence length, attention
backend), and naive vs sorted vs packed batching on the same samples in one run.

Profiles (`--device-profile`, `auto` picks `gpu` when CUDA is available):

- `gpu`: a TinyLlama-1.1B-shaped model (22 layers, hidden 2048, 32 heads, GQA 4 KV groups,
  SwiGLU 5632, vocab 32000), bf16, full activation recomputation (a 64k pack does not fit
  otherwise), packs of 8k/16k/32k/64k tokens, every importable backend of te/flash/flex/sdpa.
- `cpu-smoke`: conf/model/tiny.yaml's shape, fp32, packs of a few hundred tokens, sdpa,
  2-3 steps per case. It only exercises the code path end to end: CPU absolute numbers
  are NOT meaningful throughput, and MFU is not reported (no known peak for a CPU). The
  naive/sorted/packed ratio is still measured side by side and reported as a ratio.

Data: synthetic preprocessed datasets written into a temporary directory in the
megatron-longalign/sft-v1 format (IndexedDataset tokens + regions + P.json), with sample
lengths in LongAlign's mix (70% short chats, log-uniform 100..8k tokens, 30% long samples,
log-uniform 8k..64k, scaled to the profile's pack length). Token ids are drawn uniformly
at random, so any vocabulary size works: throughput does not depend on token values.
Each sample is a prompt region followed by an assistant region (the last 1/8, at least
one token), so the loss path is the real one.

MFU uses `metrics.training_flops` over the real documents of each step (per-document
causal attention, no padding, no recomputation) and `metrics.peak_flops` of the detected
device.

    python bench/train_throughput.py                          # auto profile
    python bench/train_throughput.py --device-profile gpu --output-json gpu.json
    python bench/train_throughput.py --device-profile cpu-smoke --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

# Runnable as `python bench/train_throughput.py` from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHING_MODES = ("naive", "sorted", "packed")
ALL_BACKENDS = ("te", "flash", "flex", "sdpa")
CPU_NOTE = (
    "CPU smoke run: absolute tokens/s on this CPU are NOT meaningful training throughput "
    "(tiny model, fp32, no GPU); MFU is not reported. Only the naive/sorted/packed ratio, "
    "measured side by side in this run, says something, and only about this machine."
)


# ---- profiles --------------------------------------------------------------------------


@dataclass
class Profile:
    name: str
    model: dict[str, Any]  # ModelConfig fields
    seq_lengths: list[int]
    backends: list[str]
    steps: int
    warmup: int
    packs_per_step: int  # global batch size of the sweep, in packs
    recompute: str | None  # TrainConfig.recompute.granularity
    # naive vs sorted vs packed
    ab_seq_length: int
    ab_samples: int
    ab_micro_batch_size: int  # samples per micro-batch in naive and sorted batching
    ab_packs_per_step: int
    min_length: int  # shortest sample, after scaling the LongAlign mix down


def _tiny_model() -> dict[str, Any]:
    """conf/model/tiny.yaml itself, so the CPU profile follows the shipped config."""
    from omegaconf import OmegaConf

    tiny = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"
    return dict(OmegaConf.to_container(OmegaConf.load(tiny)))


# TinyLlama-1.1B's shape: a ~1B Llama-style model with GQA and a 32k vocabulary.
LLAMA_1B: dict[str, Any] = dict(
    name="llama-1.1b",
    num_layers=22,
    hidden_size=2048,
    ffn_hidden_size=5632,
    num_attention_heads=32,
    num_query_groups=4,
    vocab_size=32000,
    max_position_embeddings=65536,
    rope_theta=10000.0,
)

PROFILES: dict[str, Profile] = {
    "cpu-smoke": Profile(
        name="cpu-smoke",
        model=_tiny_model(),
        seq_lengths=[256, 512],
        backends=["sdpa"],
        steps=3,
        warmup=1,
        packs_per_step=2,
        recompute=None,
        ab_seq_length=512,
        ab_samples=96,
        ab_micro_batch_size=2,
        ab_packs_per_step=2,
        min_length=8,
    ),
    "gpu": Profile(
        name="gpu",
        model=LLAMA_1B,
        seq_lengths=[8192, 16384, 32768, 65536],
        backends=list(ALL_BACKENDS),
        steps=5,
        warmup=2,
        packs_per_step=1,
        recompute="full",
        ab_seq_length=32768,
        ab_samples=128,
        ab_micro_batch_size=2,
        ab_packs_per_step=1,
        min_length=100,
    ),
}


# ---- synthetic data ---------------------------------------------------------------------


def longalign_lengths(n: int, capacity: int, min_length: int, seed: int) -> np.ndarray:
    """LongAlign's mix, scaled so that 65,536 tokens maps to `capacity`: 70% short
    (log-uniform 100..8192), 30% long (log-uniform 8192..65536); clipped to
    [min_length, capacity]."""
    rng = np.random.default_rng(seed)
    scale = capacity / 65536
    short = rng.random(n) < 0.7
    low = np.where(short, 100, 8192) * scale
    high = np.where(short, 8192, 65536) * scale
    lengths = np.exp(rng.uniform(np.log(np.maximum(low, 1)), np.log(high)))
    return np.clip(np.rint(lengths), min_length, capacity).astype(np.int64)


def write_random_dataset(prefix: str, lengths: np.ndarray, vocab_size: int, seed: int) -> None:
    from megatron_longalign.devdata.random_dataset import write_random_dataset as write

    write(prefix, lengths, vocab_size, seed, origin="bench/train_throughput.py")


def samples_for(tokens: int, capacity: int, min_length: int) -> int:
    """Samples whose expected total length is about `tokens` in the scaled mix."""
    mean = float(longalign_lengths(20000, capacity, min_length, seed=0).mean())
    return max(8, math.ceil(tokens / mean))


# ---- trainer setup ------------------------------------------------------------------------


def make_config(
    profile: Profile,
    prefix: str,
    seq_length: int,
    backend: str,
    batching: str = "packed",
    micro_batch_size: int = 1,
    global_batch_size: int = 1,
    max_steps: int = 10,
):
    from megatron_longalign.config.data import DataConfig, DatasetSource
    from megatron_longalign.config.model import ModelConfig
    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.config.training import (
        LoggingConfig,
        LongAlignConfig,
        OptimConfig,
        RecomputeConfig,
        TrainConfig,
    )

    model = ModelConfig(
        **{
            **profile.model,
            "attention_backend": backend,
            "max_position_embeddings": max(profile.model["max_position_embeddings"], seq_length),
        }
    )
    recompute = (
        RecomputeConfig(granularity="full", method="uniform", num_layers=1)
        if profile.recompute == "full"
        else RecomputeConfig()
    )
    return LongAlignConfig(
        name=f"bench-{profile.name}",
        model=model,
        data=DataConfig(
            sources=[DatasetSource(prefix, 1.0)],
            seq_length=seq_length,
            batching=batching,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            on_overlength="drop",
            seed=7,
        ),
        parallel=ParallelConfig(use_distributed_optimizer=True),
        # A constant small lr: the updates are real, their values irrelevant here.
        optim=OptimConfig(lr=1e-5, min_lr=1e-5, lr_decay_style="constant"),
        train=TrainConfig(max_steps=max_steps, precision="auto", recompute=recompute, seed=3),
        logging=LoggingConfig(progress_bar=False),
    )


def free_trainer(trainer: Any) -> None:
    """Drop one case's model and optimizer before the next is built (GPU memory)."""
    del trainer
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Measured:
    steps: int = 0
    seconds: float = 0.0
    real_tokens: int = 0
    computed_tokens: int = 0  # tokens the model ran on, naive padding included
    flops: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, peak: float | None) -> dict[str, Any]:
        tflops = self.flops / self.seconds / 1e12 if self.seconds > 0 else 0.0
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "real_tokens": self.real_tokens,
            "computed_tokens": self.computed_tokens,
            "tokens_per_sec": self.real_tokens / self.seconds if self.seconds > 0 else 0.0,
            "tflops_per_gpu": tflops,
            # None, not 0 or a guess, when the accelerator's peak is unknown (CPU).
            "mfu": tflops * 1e12 / peak if peak and self.seconds > 0 else None,
            "step_time_s": self.seconds / self.steps if self.steps else 0.0,
            **self.extra,
        }


def computed_tokens(batch: Any, lengths: np.ndarray) -> int:
    """Tokens the model processes for a global batch: naive plans pad every sample to
    `pad_to`; the others run exactly the samples' tokens."""
    total = 0
    for rank in batch.micro_batches:
        for plan in rank:
            if plan.pad_to:
                total += plan.pad_to * int(plan.samples.size)
            else:
                total += int(lengths[plan.samples].sum())
    return total


def timed_step(trainer: Any, batch: Any, meter: Measured, lengths: np.ndarray) -> None:
    from megatron_longalign.training.metrics import (
        StepTimer,
        batch_document_lengths,
        training_flops,
    )

    # StepTimer synchronises CUDA at both ends; the trainer's own step_time does not.
    with StepTimer() as timer:
        result = trainer.train_step(batch)
    if result.skipped:
        raise RuntimeError(f"step {result.step} was skipped (non-finite loss or gradient)")
    meter.steps += 1
    meter.seconds += timer.elapsed
    meter.real_tokens += batch.real_tokens
    meter.computed_tokens += computed_tokens(batch, lengths)
    meter.flops += training_flops(trainer.config.model, batch_document_lengths(batch, lengths))


def device_peak(trainer: Any) -> tuple[str | None, float | None]:
    from megatron_longalign.training.metrics import detect_device_name, matmul_dtype, peak_flops

    name = detect_device_name()
    return name, peak_flops(name, matmul_dtype(trainer.dtype))


# ---- the two measurements -----------------------------------------------------------------


def sweep_case(
    profile: Profile,
    workdir: Path,
    seq_length: int,
    backend: str,
    steps: int,
    warmup: int,
    scoring_steps: int = 0,
) -> dict[str, Any]:
    """Packed batching at one pack length and backend: warmup steps, then `steps` timed,
    with the peak memory against the planner's; then `scoring_steps` forward-only
    batches (`scoring_case`)."""
    from megatron_longalign.training.trainer import Trainer

    prefix = str(workdir / f"sweep_{seq_length}")
    if not Path(prefix + ".json").exists():
        # Enough samples for every step's packs, with 50% to spare (packs are not full).
        budget = 1.5 * (steps + warmup + scoring_steps + 1) * profile.packs_per_step * seq_length
        n = samples_for(int(budget), seq_length, profile.min_length)
        lengths = longalign_lengths(n, seq_length, profile.min_length, seed=seq_length)
        write_random_dataset(prefix, lengths, profile.model["vocab_size"], seed=seq_length)
    config = make_config(
        profile,
        prefix,
        seq_length,
        backend,
        global_batch_size=profile.packs_per_step,
        max_steps=steps + warmup + scoring_steps + 1,
    )
    memory = MemoryMeter()
    trainer = Trainer(config)
    lengths = trainer.data.planner.lengths
    batches: Iterator[Any] = trainer.batches()  # max_steps mode: epochs repeat as needed
    meter, ignored = Measured(), Measured()
    for i in range(warmup + steps):
        timed_step(trainer, next(batches), ignored if i < warmup else meter, lengths)
    peak_bytes = memory.peak_above_start()
    device, peak = device_peak(trainer)
    row = {
        "seq_length": seq_length,
        "backend": backend,
        "resolved_backend": getattr(trainer.unwrapped_model[0], "attention_backend", backend),
        "status": "ok",
        "device": device,
        "dtype": str(trainer.dtype).replace("torch.", ""),
        **meter.row(peak),
        **memory_row(profile, config, seq_length, peak_bytes),
    }
    if scoring_steps:
        row["scoring"] = scoring_case(trainer, batches, scoring_steps, lengths).row(peak)
    free_trainer(trainer)
    return row


class MemoryMeter:
    """Peak device memory from construction on: torch's CUDA allocator statistics (what
    tensors held, not the CUDA context or the allocator's cache). None on CPU, where RSS
    would mostly measure this process's other cases (bench/memory_estimate_check.py is
    the CPU check)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()

    def peak_above_start(self) -> int | None:
        import torch

        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.start


def memory_row(
    profile: Profile, config: Any, seq_length: int, peak_bytes: int | None
) -> dict[str, Any]:
    """The measured peak next to planning.memory's estimate for the same layout (one
    GPU, this recompute, packs of `seq_length`, one document filling each: the planner's
    worst case for attention), without the planner's fixed overhead, which stands for
    what torch's statistics do not count (context, NCCL and allocator cache)."""
    from megatron_longalign.planning.memory import GB, GPU_BF16, Layout, Workload, estimate_memory

    if peak_bytes is None:
        return {"peak_memory_gb": None, "planned_memory_gb": None}
    layout = Layout(recompute=profile.recompute or "none")
    workload = Workload(seq_length, global_batch_size=profile.packs_per_step)
    estimate = estimate_memory(config.model, layout, workload, GPU_BF16, overhead_bytes=0.0)
    return {
        "peak_memory_gb": peak_bytes / GB,
        "planned_memory_gb": estimate.total / GB,
        "planned_parts_gb": estimate.as_gb(),
    }


def scoring_case(trainer: Any, batches: Iterator[Any], steps: int, lengths: np.ndarray) -> Measured:
    """Forward-only per-token NLL over `steps` global batches, in eval mode without
    autograd: the work of scoring samples with one model (GATEAU's homologous-model
    scores run this once per model). FLOPs are a third of training's (no backward)."""
    import torch

    from megatron_longalign.model import model_inputs
    from megatron_longalign.training.metrics import (
        StepTimer,
        batch_document_lengths,
        training_flops,
    )

    meter = Measured()
    model = trainer.model[0]
    model.eval()
    try:
        for i in range(steps + 1):  # the first is a warm-up (eval-mode kernels, shapes)
            batch = next(batches)
            micro_batches = trainer.data.micro_batches(batch)
            with StepTimer() as timer, torch.no_grad():
                for micro_batch in micro_batches:
                    nll = model(**model_inputs(micro_batch, trainer.device))
                    if not torch.isfinite(nll).all():
                        raise RuntimeError("scoring produced a non-finite NLL")
            if i == 0:
                continue
            meter.steps += 1
            meter.seconds += timer.elapsed
            meter.real_tokens += batch.real_tokens
            meter.computed_tokens += computed_tokens(batch, lengths)
            docs = batch_document_lengths(batch, lengths)
            meter.flops += training_flops(trainer.config.model, docs) / 3
    finally:
        model.train()
    return meter


def batching_comparison(profile: Profile, workdir: Path, warmup: int) -> dict[str, Any]:
    """naive vs sorted vs packed on ONE model and ONE dataset: every mode runs one whole
    epoch (the same samples, hence the same real tokens), with the modes' steps
    interleaved round-robin so that drifts of the machine hit them alike."""
    from megatron_longalign.data.planner import GlobalBatchPlanner, PlanPosition
    from megatron_longalign.training.trainer import Trainer

    seq_length = profile.ab_seq_length
    prefix = str(workdir / "batching")
    lengths = longalign_lengths(profile.ab_samples, seq_length, profile.min_length, seed=99)
    write_random_dataset(prefix, lengths, profile.model["vocab_size"], seed=99)
    mbs = profile.ab_micro_batch_size
    # About as many real tokens per optimizer step in every mode: a pack holds about
    # seq_length * fill tokens, a sample the mean length.
    per_pack = max(1, round(0.95 * seq_length / float(lengths.mean())))
    sample_gbs = mbs * max(1, round(profile.ab_packs_per_step * per_pack / mbs))
    layouts = {
        "packed": (1, profile.ab_packs_per_step),
        "sorted": (mbs, sample_gbs),
        "naive": (mbs, sample_gbs),
    }
    trainer = Trainer(
        make_config(profile, prefix, seq_length, "auto", global_batch_size=layouts["packed"][1])
    )
    mixture = trainer.data.mixture
    planners = {}
    for mode in BATCHING_MODES:
        micro, global_ = layouts[mode]
        data = replace(
            trainer.config.data, batching=mode, micro_batch_size=micro, global_batch_size=global_
        )
        # Same mixture, lengths and seed: only the batching differs.
        planners[mode] = GlobalBatchPlanner(
            mixture.lengths,
            mixture.target_counts,
            mixture.sizes,
            mixture.weights,
            data,
            loss_reduction=trainer.config.train.loss_reduction,
        )
    sample_lengths = planners["packed"].lengths
    ignored = Measured()
    # Warm-up on epoch 1's plan (another shuffle), so the timed epoch 0 is untouched.
    for mode in BATCHING_MODES:
        warm = planners[mode].iterate(start=PlanPosition(epoch=1), epochs=2)
        for _ in range(min(warmup, planners[mode].num_steps(1))):
            timed_step(trainer, next(warm), ignored, sample_lengths)
    meters = {mode: Measured() for mode in BATCHING_MODES}
    streams = {mode: planners[mode].iterate(epochs=1) for mode in BATCHING_MODES}
    while streams:
        for mode in list(streams):
            batch = next(streams[mode], None)
            if batch is None:
                del streams[mode]
                continue
            timed_step(trainer, batch, meters[mode], sample_lengths)
    device, peak = device_peak(trainer)
    rows = {mode: meters[mode].row(peak) for mode in BATCHING_MODES}
    naive_rate = rows["naive"]["tokens_per_sec"]
    for mode in BATCHING_MODES:
        rows[mode]["micro_batch_size"], rows[mode]["global_batch_size"] = layouts[mode]
        rows[mode]["speedup_vs_naive"] = (
            rows[mode]["tokens_per_sec"] / naive_rate if naive_rate > 0 else None
        )
        rows[mode]["padding_fraction"] = 1 - rows[mode]["real_tokens"] / max(
            rows[mode]["computed_tokens"], 1
        )
    result = {
        "seq_length": seq_length,
        "samples": int(lengths.size),
        "used_samples": int(
            planners["packed"].lengths.size - planners["packed"].report.dropped_overlength
        ),
        "resolved_backend": getattr(trainer.unwrapped_model[0], "attention_backend", "auto"),
        "device": device,
        "modes": rows,
    }
    free_trainer(trainer)
    return result


# ---- reporting ---------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    print(f"\nmachine: {report['machine']['description']}")
    print(f"profile: {report['profile']}   model: {report['model']['name']}")
    if report["note"]:
        print(f"NOTE: {report['note']}")
    print("\npacked throughput per (seq_length, backend)")
    print(
        f"{'seq_len':>8} {'backend':>8} {'tokens/s':>12} {'TFLOP/s':>9} {'MFU':>7} "
        f"{'step s':>8} {'peak GB':>8} {'plan GB':>8} {'score tok/s':>12} {'score MFU':>9}"
    )
    for row in report["sweep"]:
        if row["status"] != "ok":
            print(f"{row['seq_length']:>8} {row['backend']:>8}  skipped: {row['reason']}")
            continue
        scoring = row.get("scoring") or {}
        print(
            f"{row['seq_length']:>8} {row['backend']:>8} {row['tokens_per_sec']:>12,.0f} "
            f"{row['tflops_per_gpu']:>9.3f} {_fmt(row['mfu'], '.1%'):>7} "
            f"{row['step_time_s']:>8.3f} {_fmt(row.get('peak_memory_gb'), '.2f'):>8} "
            f"{_fmt(row.get('planned_memory_gb'), '.2f'):>8} "
            f"{_fmt(scoring.get('tokens_per_sec'), ',.0f'):>12} "
            f"{_fmt(scoring.get('mfu'), '.1%'):>9}"
        )
    ab = report.get("batching")
    if ab:
        print(
            f"\nbatching at seq_length {ab['seq_length']}: one epoch of {ab['used_samples']} "
            "samples per mode, steps interleaved"
        )
        print(
            f"{'mode':>7} {'steps':>6} {'real tok':>10} {'run tok':>10} {'real tok/s':>12} "
            f"{'MFU':>7} {'vs naive':>9}"
        )
        for mode, row in ab["modes"].items():
            mfu = row["mfu"]
            print(
                f"{mode:>7} {row['steps']:>6} {row['real_tokens']:>10,} "
                f"{row['computed_tokens']:>10,} {row['tokens_per_sec']:>12,.0f} "
                f"{_fmt(mfu, '.1%'):>7} {_fmt(row['speedup_vs_naive'], '.2f'):>8}x"
            )


def machine_info() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpus = os.cpu_count()
    description = (
        f"{gpu}, torch {torch.__version__}"
        if gpu
        else f"{cpus}-core {platform.machine()} CPU, no GPU, torch {torch.__version__}"
    )
    return {
        "description": description,
        "gpu": gpu,
        "cpu_count": cpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-profile", choices=("auto", "cpu-smoke", "gpu"), default="auto")
    parser.add_argument("--seq-lengths", type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--backends", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--steps", type=int, help="timed steps per (seq_length, backend)")
    parser.add_argument("--warmup", type=int, help="untimed steps per case (and per mode)")
    parser.add_argument("--ab-samples", type=int, help="samples of the batching comparison")
    parser.add_argument("--ab-seq-length", type=int, help="seq_length of the batching comparison")
    parser.add_argument("--skip-batching", action="store_true", help="sweep only")
    parser.add_argument(
        "--scoring-steps",
        type=int,
        default=2,
        help="forward-only (scoring) batches timed after each sweep case; 0: none",
    )
    parser.add_argument("--output-json", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings

    # megatron-core and torch warn at length about Apex/TE fallbacks and deprecated
    # collectives on every model build; they drown the tables and say nothing about speed.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from megatron_longalign.config.model import ATTENTION_BACKENDS
    from megatron_longalign.model.backends import unavailable_reason

    name = args.device_profile
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu-smoke"
    if name == "gpu" and not torch.cuda.is_available():
        print("--device-profile gpu needs a CUDA GPU; none is available", file=sys.stderr)
        return 2
    profile = PROFILES[name]
    overrides = {
        "seq_lengths": args.seq_lengths,
        "backends": args.backends,
        "steps": args.steps,
        "warmup": args.warmup,
        "ab_samples": args.ab_samples,
        "ab_seq_length": args.ab_seq_length,
    }
    profile = replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    for backend in profile.backends:
        if backend not in ATTENTION_BACKENDS:
            print(f"unknown backend {backend!r}; choose from {ATTENTION_BACKENDS}", file=sys.stderr)
            return 2

    report: dict[str, Any] = {
        "machine": machine_info(),
        "profile": profile.name,
        "settings": asdict(profile),
        "model": profile.model,
        "note": CPU_NOTE if profile.name == "cpu-smoke" else "",
        "data": "synthetic: LongAlign length mix, uniformly random token ids",
        "sweep": [],
        "batching": None,
    }
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        workdir = Path(tmp)
        for seq_length in profile.seq_lengths:
            for backend in profile.backends:
                reason = unavailable_reason(backend)
                if reason is not None:
                    print(f"skip {backend} at {seq_length}: {reason}", flush=True)
                    report["sweep"].append(
                        {
                            "seq_length": seq_length,
                            "backend": backend,
                            "status": "skipped",
                            "reason": reason,
                        }
                    )
                    continue
                print(f"measuring seq_length {seq_length}, backend {backend} ...", flush=True)
                try:
                    row = sweep_case(
                        profile,
                        workdir,
                        seq_length,
                        backend,
                        profile.steps,
                        profile.warmup,
                        args.scoring_steps,
                    )
                except torch.cuda.OutOfMemoryError as err:
                    # A backend/length that does not fit is a result, not a crash.
                    free_trainer(None)
                    row = {
                        "seq_length": seq_length,
                        "backend": backend,
                        "status": "skipped",
                        "reason": f"out of memory: {str(err).splitlines()[0]}",
                    }
                report["sweep"].append(row)
        if not args.skip_batching:
            print("measuring naive vs sorted vs packed ...", flush=True)
            report["batching"] = batching_comparison(profile, workdir, profile.warmup)

    print_report(report)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
