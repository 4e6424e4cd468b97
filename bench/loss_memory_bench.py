#!/usr/bin/env python
"""Output layer + loss, forward and backward: megatron's full-logits path (`standard`)
against the chunked fused linear cross entropy (`chunked`, model/fused_loss.py), side by
side in one run: peak memory above baseline and the time ratio.

Workload (single process, TP 1, fp32 on CPU by default), per (vocabulary, hidden) size at
T tokens, hidden states [T, H] and an output weight [V_padded, H], both requiring grad:

- `standard`: what LongAlignGPTModel does with `model.loss_impl: standard`: megatron's
  output-layer matmul (`linear_with_grad_accumulation_and_async_allreduce`, as
  ColumnParallelLinear calls it), the padded columns set to -inf by the model's own
  `_mask_padded_vocab` (in place), then megatron's
  `tensor_parallel.vocab_parallel_cross_entropy` on the full logits;
- `chunked`: `chunked_linear_cross_entropy(..., valid_columns=V_real, grad_hint=w)` as
  the trainer runs it (given the loss weights, it makes the gradients in forward), the
  chunk size from `auto_chunk_tokens` (as `model.loss_chunk_tokens: null`) or
  `--chunk-tokens`;
- `recompute` (unless `--no-recompute`): the same without the weights, as any caller
  whose loss is not a weighted sum of the NLL gets it: backward recomputes each chunk's
  logits.

The upstream gradient of each token's NLL is a random per-token weight (the loss weights
of the training loss), and backward goes to the hidden states and the weight.

The vocabulary is padded as megatron pads it for TP 8 (`make_vocab_size_divisible_by`
128 x 8 = 1024): Llama-2's 32,000 -> 32,768 and Llama-3's 128,256 -> 129,024 columns.

Each measurement runs in a fresh child process, so peaks do not mix: the child imports,
joins a 1-rank megatron process group (gloo), allocates the inputs, resets its peak RSS
(`/proc/self/clear_refs`), runs forward + backward once, and reports VmHWM minus the RSS
right after the inputs were allocated (`peak above baseline`), the RSS still held between
forward and backward, and the wall time of forward + backward. Variants alternate in
each repeat and the fastest of the repeats is reported; the time ratio is chunked over
standard from the same run. Where `standard` would not fit in the memory available now,
it is not run: its need is estimated (`standard_estimate`; in fp32 two full logits copies,
in backward: the softmax turned into its gradient, and the copy that `masked_fill_`'s
backward makes) and marked as an estimate;
a child killed by the kernel's OOM killer is reported, not a crash.

    python bench/loss_memory_bench.py            # T=16k, V 32k/128k x H 2048/4096 (~30 min)
    python bench/loss_memory_bench.py --quick    # smoke run (T=6144, V 32k, H 1024), ~1 min
    python bench/loss_memory_bench.py --device cuda --dtype bf16 --tokens 65536 --vocabs 128256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from child_runs import run_json_child

from megatron_longalign.utils.memory import (
    available_memory_bytes,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
VARIANTS = ("standard", "chunked", "recompute")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def padded_vocab(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


# ---- child: one variant, one size -----------------------------------------------------


class _MaskOwner:
    """What LongAlignGPTModel._mask_padded_vocab reads from the model (TP rank 0)."""

    class _Tp:
        @staticmethod
        def rank() -> int:
            return 0

    class _Pg:
        pass

    def __init__(self, real: int, padded: int) -> None:
        self.real_vocab_size, self.vocab_size = real, padded
        self.pg_collection = self._Pg()
        self.pg_collection.tp = self._Tp()


def child(spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.model.fused_loss import auto_chunk_tokens, chunked_linear_cross_entropy
    from megatron_longalign.parallel.distributed import initialize_distributed

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    initialize_distributed(ParallelConfig(), seed=0, cpu=not cuda)
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.layers import (
        linear_with_grad_accumulation_and_async_allreduce,
    )

    from megatron_longalign.model import fused_loss, gpt
    from megatron_longalign.model.gpt import LongAlignGPTModel

    # The code this child measured (the tree may change during a long run).
    code = hashlib.sha1(
        b"".join(Path(m.__file__).read_bytes() for m in (fused_loss, gpt))
    ).hexdigest()[:10]
    tokens, vocab, padded, hidden = spec["tokens"], spec["vocab"], spec["padded"], spec["hidden"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    chunk = spec["chunk_tokens"] or auto_chunk_tokens(padded)
    gen = torch.Generator(device=device).manual_seed(spec["seed"])
    # logits of unit scale: hidden ~ N(0, 1), weight ~ N(0, 1/H)
    h = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype).requires_grad_()
    w = (torch.randn(padded, hidden, generator=gen, device=device) * hidden**-0.5).to(dtype)
    w.requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    token_weights = torch.rand(tokens, generator=gen, device=device)  # upstream gradient

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def memory_now() -> int:
        return torch.cuda.memory_allocated() if cuda else current_rss_bytes()

    variant = spec["variant"]

    def forward() -> torch.Tensor:
        if variant == "standard":
            # [s, b=1, h] as megatron's output layer sees it; the model's mask; megatron's CE.
            logits = linear_with_grad_accumulation_and_async_allreduce(
                h.view(tokens, 1, hidden),
                w,
                None,
                gradient_accumulation_fusion=False,
                allreduce_dgrad=False,
                sequence_parallel=False,
            )
            masked = LongAlignGPTModel._mask_padded_vocab(_MaskOwner(vocab, padded), logits)
            nll = tensor_parallel.vocab_parallel_cross_entropy(masked, labels.view(tokens, 1))
            del logits, masked  # as when the model's _postprocess returns
            return (nll.view(tokens) * token_weights).sum()
        # chunked: as the trainer runs it, given the loss weights (gradients in forward);
        # recompute: without them (the chunk logits recomputed in backward).
        hint = token_weights if variant == "chunked" else None
        nll = chunked_linear_cross_entropy(
            h, w, labels, valid_columns=vocab, chunk_tokens=chunk, grad_hint=hint
        )
        return (nll * token_weights).sum()

    if cuda:
        # One untimed pass first: cuBLAS handles, kernel selection and the caching
        # allocator's first growth are not the variant's cost.
        forward().backward()
        h.grad, w.grad = None, None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # VmHWM := VmRSS
    baseline = memory_now()
    start = time.perf_counter()
    loss = forward()
    sync()
    forward_s = time.perf_counter() - start
    held = memory_now() - baseline  # kept from forward to backward
    loss.backward()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {
        "peak_above_baseline": peak - baseline,
        "baseline": baseline,
        "held_after_forward": held,
        "seconds": seconds,
        "forward_s": forward_s,
        "chunk_tokens": chunk,
        "code": code,
        # 1-minute load average at the end (2 of it is this child on a 2-core machine)
        "load": os.getloadavg()[0],
        # to check that the variants compute the same thing
        "loss": float(loss.double()),
        "grad_hidden_norm": float(torch.linalg.vector_norm(h.grad, dtype=torch.float64)),
        "grad_weight_norm": float(torch.linalg.vector_norm(w.grad, dtype=torch.float64)),
        "grad_padded_max": float(w.grad[vocab:].abs().max()) if padded > vocab else 0.0,
    }


# ---- parent ---------------------------------------------------------------------------


def standard_estimate(tokens: int, padded: int, hidden: int, dtype_bytes: int) -> int:
    """Bytes above baseline of the standard path. Forward: the logits (masked in place by
    the model's `_mask_padded_vocab`), plus megatron CE's `.float()` copy when they are not
    fp32 (CE works in place on it and keeps it as the softmax). Backward: that fp32
    softmax turned into the gradient in place, plus its cast to the logits' dtype or, in
    fp32, the masked copy `masked_fill_`'s backward makes; then one logits-sized gradient
    with the weight and hidden-state gradients in the output layer's backward."""
    logits = tokens * padded * dtype_bytes
    fp32 = tokens * padded * 4
    grads = (padded + tokens) * hidden * dtype_bytes
    forward = logits + (fp32 if dtype_bytes != 4 else 0)
    backward = max(fp32 + logits, logits + grads)
    return max(forward, backward)


def bench_size(args, vocab: int, hidden: int, log) -> dict:
    padded = padded_vocab(vocab, args.vocab_multiple)
    dtype_bytes = DTYPE_BYTES[args.dtype]
    flop = 2 * args.tokens * padded * hidden  # one T x V x H matmul
    repeats = args.repeats if flop <= args.big_tflop * 1e12 else 1
    estimate = standard_estimate(args.tokens, padded, hidden, dtype_bytes)
    inputs = (args.tokens + padded) * hidden * dtype_bytes
    variants = ["standard", "chunked"] + (["recompute"] if args.recompute else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    skipped: dict[str, str] = {}
    for rep in range(repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for variant in order:
            if variant in skipped:
                continue
            if variant == "standard" and args.device == "cpu":
                # the child's whole process: ~0.5 GB of imports, the inputs, the estimate
                need = estimate + inputs + GIB // 2
                available = available_memory_bytes()
                if need > args.memory_fraction * available:
                    skipped[variant] = (
                        f"not run: needs about {need / GIB:.1f} GiB, more than "
                        f"{args.memory_fraction:.0%} of the {available / GIB:.1f} GiB available"
                    )
                    log(f"  V={vocab} H={hidden} {variant}: {skipped[variant]}")
                    continue
            spec = {
                "variant": variant,
                "tokens": args.tokens,
                "vocab": vocab,
                "padded": padded,
                "hidden": hidden,
                "chunk_tokens": args.chunk_tokens,
                "dtype": args.dtype,
                "device": args.device,
                "seed": args.seed,
            }
            started = time.perf_counter()
            result = run_json_child(__file__, ["--child", json.dumps(spec)], str(spec))
            if "failed" in result:
                skipped[variant] = result["failed"]
                log(f"  V={vocab} H={hidden} {variant}: {result['failed']}")
                continue
            runs[variant].append(result)
            log(
                f"  V={vocab} H={hidden} rep {rep + 1}/{repeats} {variant}: "
                f"{result['seconds']:.1f} s fwd+bwd, "
                f"peak +{result['peak_above_baseline'] / GIB:.2f} GiB "
                f"({time.perf_counter() - started:.0f} s with start-up; load {result['load']:.1f})"
            )
    best = {
        v: {
            "seconds": min(r["seconds"] for r in rs),
            "forward_s": min(r["forward_s"] for r in rs),
            "peak_above_baseline": max(r["peak_above_baseline"] for r in rs),
            "held_after_forward": max(r["held_after_forward"] for r in rs),
            "baseline": rs[0]["baseline"],
            "chunk_tokens": rs[0]["chunk_tokens"],
            "code": sorted({r["code"] for r in rs}),
            "max_load": max(r["load"] for r in rs),
            "loss": rs[0]["loss"],
            "grad_hidden_norm": rs[0]["grad_hidden_norm"],
            "grad_weight_norm": rs[0]["grad_weight_norm"],
            "grad_padded_max": rs[0]["grad_padded_max"],
            "runs": len(rs),
        }
        for v, rs in runs.items()
        if rs
    }
    return {
        "vocab": vocab,
        "padded": padded,
        "hidden": hidden,
        "tokens": args.tokens,
        "repeats": repeats,
        "logits_bytes": args.tokens * padded * dtype_bytes,
        # what every variant returns: the weight and hidden-state gradients
        "grads_bytes": (args.tokens + padded) * hidden * dtype_bytes,
        "standard_estimate": estimate,
        "results": best,
        "skipped": skipped,
    }


def agreement(row: dict) -> str:
    """Largest relative difference of loss and gradient norms to standard's, and any
    nonzero gradient on the padded vocabulary columns (there must be none)."""
    res = row["results"]
    padded = max((r["grad_padded_max"] for r in res.values()), default=0.0)
    note = "" if padded == 0.0 else f"; padded columns' gradient {padded:.1e}!"
    if "standard" not in res:
        return "n/a" + note
    ref = res["standard"]
    worst = 0.0
    for variant in ("chunked", "recompute"):
        if variant in res:
            for key in ("loss", "grad_hidden_norm", "grad_weight_norm"):
                worst = max(worst, abs(res[variant][key] - ref[key]) / abs(ref[key]))
    return f"{worst:.1e}" + note


def report(rows: list[dict], args) -> None:
    def gib(value: int) -> str:
        return f"{value / GIB:.2f}"

    def seconds(result: dict | None) -> str:
        return f"{result['seconds']:.1f}" if result else "-"

    print(
        "\n| V real / padded | H | chunk tokens | standard peak (GiB) | chunked peak (GiB) "
        "| chunked / standard memory | standard s | chunked s | time chunked / standard "
        "| runs | agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    memory_met = working_met = time_met = True
    floors = []  # the returned gradients alone, as a share of standard's peak
    time_measured = False
    for row in rows:
        res = row["results"]
        chunked = res.get("chunked")
        standard = res.get("standard")
        std_peak = standard["peak_above_baseline"] if standard else row["standard_estimate"]
        std_label = (
            gib(std_peak)
            if standard
            else f"~{gib(std_peak)} (estimate; {row['skipped'].get('standard', '')})"
        )
        if chunked:
            mem_ratio = chunked["peak_above_baseline"] / std_peak
            memory_met &= mem_ratio <= 0.10
            working_met &= (chunked["peak_above_baseline"] - row["grads_bytes"]) / std_peak <= 0.10
            floors.append(row["grads_bytes"] / std_peak)
            mem = f"{100 * mem_ratio:.1f}%" + ("" if standard else " (of the estimate)")
            time_ratio = f"{chunked['seconds'] / standard['seconds']:.2f}x" if standard else "n/a"
            if standard:
                time_met &= chunked["seconds"] / standard["seconds"] <= 1.3
                time_measured = True
        else:
            mem = time_ratio = "n/a"
        print(
            f"| {row['vocab']:,} / {row['padded']:,} | {row['hidden']} "
            f"| {chunked['chunk_tokens'] if chunked else '-'} | {std_label} "
            f"| {gib(chunked['peak_above_baseline']) if chunked else row['skipped']['chunked']} "
            f"| {mem} | {seconds(standard)} | {seconds(chunked)} | {time_ratio} "
            f"| {max((r['runs'] for r in res.values()), default=0)} | {agreement(row)} |"
        )
    print(
        "\n| V real / padded | H | variant | peak above baseline (GiB) | held forward -> backward "
        "(GiB) | peak minus returned gradients (GiB) | forward s | forward + backward s "
        "| vs standard time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        res = row["results"]
        for variant, r in res.items():
            vs = f"{r['seconds'] / res['standard']['seconds']:.2f}x" if "standard" in res else "n/a"
            print(
                f"| {row['vocab']:,} / {row['padded']:,} | {row['hidden']} | {variant} "
                f"| {gib(r['peak_above_baseline'])} | {gib(r['held_after_forward'])} "
                f"| {gib(r['peak_above_baseline'] - row['grads_bytes'])} "
                f"| {r['forward_s']:.1f} | {r['seconds']:.1f} | {vs} |"
            )
        print(
            f"| {row['vocab']:,} / {row['padded']:,} | {row['hidden']} | standard, estimated "
            f"| {gib(row['standard_estimate'])} "
            f"| {gib(row['logits_bytes'] * 4 // DTYPE_BYTES[args.dtype])} | | | | |"
        )
    floor = f"{100 * max(floors):.1f}%" if floors else "n/a"
    print(
        "\ntargets: chunked working memory (peak minus the gradients every implementation "
        "returns) <= 10% of standard's peak: "
        + ("met" if working_met else "NOT met")
        + "; whole chunked peak <= 10%: "
        + ("met" if memory_met else f"NOT met (the returned gradients alone reach {floor})")
        + "; chunked time <= 1.3x standard's: "
        + (("met" if time_met else "NOT met") if time_measured else "not measured")
    )


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument(
        "--vocabs", default="32000,128256", help="real vocabulary sizes (comma-separated)"
    )
    parser.add_argument("--hiddens", default="2048,4096")
    parser.add_argument(
        "--vocab-multiple",
        type=int,
        default=1024,
        help="pad the vocabulary to a multiple of this (megatron: 128 x TP; 1024 = TP 8)",
    )
    parser.add_argument(
        "--chunk-tokens", type=int, default=None, help="default: auto_chunk_tokens (256 MiB)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--big-tflop",
        type=float,
        default=2.5,
        help="sizes whose T x V x H matmul exceeds this many TFLOP run once",
    )
    parser.add_argument(
        "--no-recompute",
        dest="recompute",
        action="store_false",
        help="skip the variant without loss weights (logits recomputed in backward)",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="run standard only if its estimated process peak fits this share of MemAvailable",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: T=6144, V 32k, H 1024")
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.vocabs, args.hiddens, args.repeats = 6144, "32000", "1024", 1
    args.vocabs = [int(v) for v in args.vocabs.split(",")]
    args.hiddens = [int(h) for h in args.hiddens.split(",")]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cpu_model = "?"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu_model}), "
        f"{available_memory_bytes() / GIB:.1f} GiB available, Python {platform.python_version()}"
    )
    log(f"machine: {machine}")
    started = time.perf_counter()
    rows = []
    for vocab in args.vocabs:
        for hidden in args.hiddens:
            rows.append(bench_size(args, vocab, hidden, log))
    total = time.perf_counter() - started
    import torch

    print(f"machine: {machine}, torch {torch.__version__}")
    print(
        f"T = {args.tokens} tokens, {args.dtype} on {args.device}, TP 1; vocabulary padded to "
        f"a multiple of {args.vocab_multiple}; fastest of `runs` interleaved runs (one "
        f"child process each); total {total / 60:.1f} min"
    )
    if args.output_json:  # before the report: a long run's numbers are kept whatever happens
        args.output_json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    report(rows, args)
    codes = sorted({c for row in rows for r in row["results"].values() for c in r["code"]})
    print(f"\ncode measured (sha1 of model/fused_loss.py + model/gpt.py): {', '.join(codes)}")
    loads = [r["max_load"] for row in rows for r in row["results"].values()]
    print(f"highest 1-minute load average at the end of a measurement: {max(loads):.1f}")
    if len(codes) > 1:
        print("WARNING: the measured code changed during the run; rerun for comparable rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
