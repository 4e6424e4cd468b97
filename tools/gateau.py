#!/usr/bin/env python
"""GATEAU data selection (docs/GATEAU.md): score a preprocessed set with two homologous
models, then select the top samples as a new preprocessed set.

    python tools/gateau.py score --prefix data/long --model-a ckpt/short --model-b ckpt/long \\
        --output gateau/long [--seq-length 65536] [--segment-tokens 128] [--alpha 0.8]
    torchrun --nproc-per-node 8 tools/gateau.py score ... --tp 2 --cp 2     # DP = 8 / (TP x CP x PP)
    python tools/gateau.py select --prefix data/long --scores gateau/long/scores.jsonl \\
        --output-prefix data/long_top10 --ratio 0.1

`score` resumes: rerun the same command after a kill and finished samples are skipped.
Bad input exits with status 2 and a message naming the file or option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_longalign  # noqa: F401
except ImportError:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score every sample of a preprocessed set")
    score.add_argument("--prefix", required=True, help="preprocessed set (tools/preprocess.py)")
    score.add_argument("--model-a", required=True, help="checkpoint of the short-window model")
    score.add_argument("--model-b", required=True, help="checkpoint of the long-window model")
    score.add_argument("--output", required=True, help="scores directory (resumable)")
    score.add_argument("--seq-length", type=int, default=65536, help="tokens per micro-batch")
    score.add_argument("--segment-tokens", type=int, default=128, help="CAM context segment")
    score.add_argument("--window-a", type=int, help="left-truncate model A's input to this")
    score.add_argument("--alpha", type=float, default=0.8, help="weight of HMG in the score")
    score.add_argument("--importance", choices=("softmax", "minmax"), default="softmax")
    score.add_argument("--probe-layers", help="comma-separated layer numbers (default: all)")
    score.add_argument("--tp", type=int, default=1)
    score.add_argument("--pp", type=int, default=1)
    score.add_argument("--cp", type=int, default=1)
    score.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    score.add_argument("--batch-tokens", type=int, default=65536, help="tokens per engine call")
    select = commands.add_parser("select", help="write the top samples as a new set")
    select.add_argument("--prefix", required=True, help="the scored preprocessed set")
    select.add_argument("--scores", required=True, help="scores.jsonl written by `score`")
    select.add_argument("--output-prefix", required=True, help="the new preprocessed set")
    group = select.add_mutually_exclusive_group(required=True)
    group.add_argument("--ratio", type=float, help="fraction of the samples to keep")
    group.add_argument("--top-k", type=int, help="number of samples to keep")
    select.add_argument("--overwrite", action="store_true", help="replace an existing set")
    return parser


def run_score(args: argparse.Namespace) -> int:
    from megatron_longalign.gateau import DocumentConfig, RunOptions, ScoreConfig
    from megatron_longalign.gateau.job import ScoringJob, run_scoring

    layers = None
    if args.probe_layers:
        layers = tuple(int(x) for x in args.probe_layers.split(",") if x)
    options = RunOptions(
        documents=DocumentConfig(segment_tokens=args.segment_tokens, window_a=args.window_a),
        scores=ScoreConfig(alpha=args.alpha, importance=args.importance),
        batch_tokens=args.batch_tokens,
    )
    options.documents.validate()
    options.scores.validate()
    job = ScoringJob(
        prefix=args.prefix,
        checkpoint_a=args.model_a,
        checkpoint_b=args.model_b,
        output_dir=args.output,
        seq_length=args.seq_length,
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        context_parallel=args.cp,
        precision=args.precision,
        probe_layers=layers,
        options=options,
    )
    summary = run_scoring(job)
    if summary is not None:
        print(json.dumps(summary.to_dict(), indent=1))
    return 0


def run_select(args: argparse.Namespace) -> int:
    from megatron_longalign.gateau import select

    selection = select(
        args.prefix,
        args.scores,
        args.output_prefix,
        top_k=args.top_k,
        ratio=args.ratio,
        overwrite=args.overwrite,
    )
    print(f"selected {selection.indices.size} samples -> {selection.prefix}.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_longalign.data.indexed import DataFileError
    from megatron_longalign.gateau import GateauError
    from megatron_longalign.gateau.select import SelectError
    from megatron_longalign.scoring import ScoringError
    from megatron_longalign.training.checkpoint import CheckpointError

    expected = (GateauError, SelectError, ScoringError, CheckpointError, DataFileError, OSError)
    try:
        return run_score(args) if args.command == "score" else run_select(args)
    except (*expected, ValueError) as err:
        print(f"gateau {args.command}: {err}", file=sys.stderr)
        return 2
    finally:
        if args.command == "score":
            from megatron_longalign.parallel.distributed import destroy_distributed

            destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
