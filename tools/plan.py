"""Plan a training layout: per-GPU memory and TP/PP/CP/DP layouts ranked by estimated
step time (megatron_longalign/planning; formulas and measured error in docs/PLANNING.md).

    python tools/plan.py --model conf/model/llama3_8b.yaml --seq-length 65536 \\
        --gpus 8 --gpu-memory-gb 80
    python tools/plan.py --model llama2_7b --seq-length 32768 --gpus 16 --nodes 2 --json

The loss memory follows the model's `loss_impl` and `loss_chunk_tokens` (--loss-impl and
--loss-chunk-tokens override them); every row also says what the chunked loss frees
against the standard one on that layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from megatron_longalign.planning import layouts, memory
except ImportError:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
    from megatron_longalign.planning import layouts, memory

Cluster, NoLayoutFits, Plan, recommend = (
    layouts.Cluster,
    layouts.NoLayoutFits,
    layouts.Plan,
    layouts.recommend,
)
GB, PROFILES, Workload = memory.GB, memory.PROFILES, memory.Workload
from megatron_longalign.config.model import LOSS_IMPLS  # noqa: E402 (after the path fix)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model YAML, or a name in conf/model/")
    p.add_argument("--seq-length", type=int, required=True, help="packed row length")
    p.add_argument("--gpus", type=int, required=True, help="total GPU count")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--nodes", type=int, help="node count (sets --gpus-per-node = gpus/nodes)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node")
    p.add_argument("--global-batch-size", type=int, default=16, help="packed rows per step")
    p.add_argument(
        "--document-length",
        type=int,
        help="average document length in a pack (default: one document fills the row)",
    )
    p.add_argument("--accelerator", default="h100_sxm", help="a metrics.PEAK_FLOPS key")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak")
    p.add_argument("--overhead-gb", type=float, help="fixed per-GPU overhead (default 4)")
    p.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="fraction of GPU memory kept free: a layout fits below (1 - headroom) x memory",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu-bf16")
    p.add_argument(
        "--loss-impl",
        choices=LOSS_IMPLS,
        help="model.loss_impl to plan for (default: the model YAML's, chunked unless set)",
    )
    p.add_argument(
        "--loss-chunk-tokens",
        type=int,
        help="model.loss_chunk_tokens for the chunked loss (default: the model YAML's; "
        "null there: auto, about 256 MiB of fp32 chunk logits per TP rank and at least "
        "2048 tokens on a GPU, where each chunk's fp32 weight-gradient accumulation costs "
        "~275/c of its GEMM time on an H200: 2048 tokens on a GPU for a 32k or 128k "
        "vocabulary at TP 1; on the CPU 2048 for 32k, 512 for 128k)",
    )
    p.add_argument(
        "--no-distributed-optimizer", action="store_true", help="optimizer state unsharded"
    )
    p.add_argument("--top", type=int, default=15, help="rows to print (0: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p.parse_args(argv)


def load_model(spec: str):
    """ModelConfig from a YAML path or a conf/model/ name, type-checked by OmegaConf."""
    from omegaconf import OmegaConf

    from megatron_longalign.config.model import ModelConfig

    path = Path(spec)
    if not path.is_file():
        named = REPO / "conf" / "model" / f"{spec}.yaml"
        if not named.is_file():
            names = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
            raise ValueError(f"model {spec!r}: no such file, nor a name in conf/model/ {names}")
        path = named
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def loss_comparison(model, plan: Plan, estimate) -> dict:
    """The plan's loss memory next to the other `loss_impl`'s on the same layout:
    `estimate(model, layout)` gives a MemoryEstimate. `freed_gb` is what the chunked loss
    saves per GPU against the standard one (total, busiest stage)."""
    other_impl = "standard" if model.loss_impl == "chunked" else "chunked"
    other = estimate(dataclasses.replace(model, loss_impl=other_impl), plan.layout)
    by_impl = {model.loss_impl: plan.memory, other_impl: other}
    chunked = by_impl["chunked"]
    return {
        "impl": model.loss_impl,
        "chunk_tokens": plan.memory.loss_chunk_tokens,
        "chunked_chunk_tokens": chunked.loss_chunk_tokens,
        "logits_gb": {impl: m.logits / GB for impl, m in by_impl.items()},
        "total_gb": {impl: m.total / GB for impl, m in by_impl.items()},
        "freed_gb": (by_impl["standard"].total - chunked.total) / GB,
    }


def plan_row(plan: Plan, recommended: bool, loss: dict | None = None) -> dict:
    layout = plan.layout
    row = {
        "tp": layout.tp,
        "pp": layout.pp,
        "cp": layout.cp,
        "dp": layout.dp,
        "sequence_parallel": layout.sequence_parallel,
        "recompute": layout.recompute,
        "memory_gb": plan.memory.as_gb(),
        "fits": plan.fits,
        "step_time_s": plan.step_time_s,
        "time_parts_s": plan.time_parts,
        "recommended": recommended,
    }
    if loss is not None:
        row["loss"] = loss
    return row


def format_table(rows: list[dict], memory_gb: float) -> str:
    header = (
        f"{'':2}{'TP':>3}{'PP':>4}{'CP':>4}{'DP':>4} {'SP':<3} {'recompute':<10}"
        f"{'weights':>8}{'grads':>7}{'optim':>7}{'activ':>8}{'logits':>7}{'other':>7}"
        f"{'total':>8}  {'fits':<4}{'step s':>9}{'freed':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        gb = row["memory_gb"]
        freed = row["loss"]["freed_gb"]
        lines.append(
            f"{'*' if row['recommended'] else '':2}{row['tp']:>3}{row['pp']:>4}{row['cp']:>4}"
            f"{row['dp']:>4} {'yes' if row['sequence_parallel'] else 'no':<3} "
            f"{row['recompute']:<10}{gb['weights']:>8.1f}{gb['grads']:>7.1f}"
            f"{gb['optimizer']:>7.1f}{gb['activations']:>8.1f}{gb['logits']:>7.1f}"
            f"{gb['overhead']:>7.1f}{gb['total']:>8.1f}  {'yes' if row['fits'] else 'no':<4}"
            f"{row['step_time_s']:>9.2f}{freed:>7.1f}"
        )
    lines.append(
        f"memory in GB (1e9 bytes) per GPU of {memory_gb:g} GB; * = recommended; "
        "freed = total with loss_impl=standard - total with loss_impl=chunked"
    )
    return "\n".join(lines)


def format_loss_summary(model, best: dict, other_best: Plan | None) -> str:
    """The loss memory of the recommended layout under both `loss_impl`s, and what the
    other `loss_impl` would recommend."""
    loss = best["loss"]
    logits, total = loss["logits_gb"], loss["total_gb"]
    chunk = loss["chunked_chunk_tokens"]
    how = "auto" if model.loss_chunk_tokens is None else "loss_chunk_tokens"
    other_impl = "standard" if model.loss_impl == "chunked" else "chunked"
    lines = [
        f"loss: loss_impl={model.loss_impl}; the chunked loss "
        f"{'uses' if model.loss_impl == 'chunked' else 'would use'} chunks of {chunk} "
        f"tokens ({how}) on the recommended layout",
        f"  recommended layout, output layer + loss: chunked {logits['chunked']:.1f} GB, "
        f"standard {logits['standard']:.1f} GB; total {total['chunked']:.1f} vs "
        f"{total['standard']:.1f} GB: chunked frees {loss['freed_gb']:.1f} GB per GPU",
    ]
    if other_best is None:
        lines.append(f"  with loss_impl={other_impl} no layout fits")
    else:
        layout = other_best.layout
        lines.append(
            f"  with loss_impl={other_impl} the recommendation would be {layout.label()}, "
            f"recompute {layout.recompute}: {other_best.memory.total / GB:.1f} GB, "
            f"{other_best.step_time_s:.2f} s/step"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_model(args.model)
        if args.loss_impl is not None:
            model = dataclasses.replace(model, loss_impl=args.loss_impl)
        if args.loss_chunk_tokens is not None:
            model = dataclasses.replace(model, loss_chunk_tokens=args.loss_chunk_tokens)
        if model.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl={model.loss_impl!r}; choose one of {LOSS_IMPLS}")
        if model.loss_chunk_tokens is not None and model.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {model.loss_chunk_tokens}")
        gpus_per_node = args.gpus_per_node
        if args.nodes is not None:
            if args.nodes < 1 or args.gpus % args.nodes:
                raise ValueError(f"--gpus {args.gpus} is not divisible by --nodes {args.nodes}")
            gpus_per_node = args.gpus // args.nodes
        workload = Workload(args.seq_length, args.global_batch_size, args.document_length)
        cluster = Cluster(
            gpus=args.gpus,
            gpu_memory_gb=args.gpu_memory_gb,
            headroom=args.headroom,
            gpus_per_node=gpus_per_node,
            accelerator=args.accelerator,
            mfu=args.mfu,
        )
        overhead = args.overhead_gb * GB if args.overhead_gb is not None else None
        options = dict(
            distributed_optimizer=not args.no_distributed_optimizer, overhead_bytes=overhead
        )
        profile = PROFILES[args.profile]
        best, plans = recommend(model, workload, cluster, profile, **options)
    except NoLayoutFits as err:
        print(f"plan: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"plan: error: {err}", file=sys.stderr)
        return 2

    def estimate(variant, layout):
        return memory.estimate_memory(variant, layout, workload, profile, **options)

    shown_plans = plans if args.top == 0 else plans[: args.top]
    rows = [plan_row(p, p is best, loss_comparison(model, p, estimate)) for p in shown_plans]
    other_impl = "standard" if model.loss_impl == "chunked" else "chunked"
    try:
        other_model = dataclasses.replace(model, loss_impl=other_impl)
        other_best, _ = recommend(other_model, workload, cluster, profile, **options)
    except NoLayoutFits:
        other_best = None
    if args.json:
        out = {
            "model": model.name,
            "seq_length": args.seq_length,
            "gpus": args.gpus,
            "gpu_memory_gb": args.gpu_memory_gb,
            "loss_impl": model.loss_impl,
            "loss_chunk_tokens": model.loss_chunk_tokens,
            "recommended": rows[0],
            "layouts": rows,
            "recommended_with_" + other_impl: (
                None if other_best is None else plan_row(other_best, True)
            ),
        }
        print(json.dumps(out, indent=1))
    else:
        print(
            f"{model.name}: seq {args.seq_length}, global batch {args.global_batch_size} rows, "
            f"{args.gpus} GPUs ({gpus_per_node}/node), {len(plans)} candidate layouts"
        )
        print(format_table(rows, args.gpu_memory_gb))
        print(format_loss_summary(model, rows[0], other_best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
