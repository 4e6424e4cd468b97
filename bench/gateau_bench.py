#!/usr/bin/env python
"""GATEAU's CAM importance scoring, packed against one forward per segment (the public
code's method), and the attention probe's memory against dense attention probabilities.

Part 1, scoring (one child process, one model, the same documents, side by side).
The documents are GATEAU's segment documents [segment j; question; response]
(`gateau/documents.py`, `segment_tokens` 128) of the demo's long samples up to
`--max-length` tokens, scored by one `ScoringEngine` two ways:
- `packed`: the documents of a block of samples (about `--batch-tokens` tokens, as
  `gateau/runner.py` batches them) in one `score()` call, which packs them into THD
  micro-batches of at most `--seq-length` tokens with per-document attention;
- `per-segment` (the public code's method, emulated): one forward per segment document,
  batch size 1, each right-padded to one fixed length (pad tokens after the response,
  outside the loss mask; causal attention keeps the real tokens' NLL unchanged). The
  fixed length is the longest segment document of the run (`--pad-to 0`), the least any
  fixed-length padding can use.
- `window W` (the public code's procedure, timed): S1s-Z/GATEAU's
  select/cam/run_batch_multi_process.py pads every sample's context to a window of W
  tokens (64,000 there), cuts it into W / 128 chunks and runs [chunk; instruction;
  response] for every chunk, padding chunks (128 pad tokens) included. Emulated as the
  per-segment forwards plus one forward per padding chunk, padded alike. `--window`
  sets W (default: `--max-length`, the smallest window that holds every sample);
  `--window 64000` is the published setting (about 90 s here). The published code
  batches 256 chunks per forward; one per forward is the issue's "one forward per
  segment". `original_window_tokens` also counts the published procedure's tokens
  without the fixed padding.
packed and per-segment alternate block by block (the order flips every block), so load
on this shared machine hits both; the padding chunks run last. Wall time is each `score()` call's, host-side packing included.
Forward tokens are the tokens the model ran, padding included. Sanity: every segment
document's response mean NLL (and its per-token NLL) must agree between the two.

Part 2, memory (one child process per measurement, so an out-of-memory is reported,
not a crash). One attention layer's q [L, H, D] and k [L, Hkv, D] (random, fp32) of one
document of length L, whose last R tokens are the response and whose context is cut into
128-token segments; each child computes the response rows' attention mass per segment:
- `probe`: `AttentionProbe.observe` (chunked over query rows and keys, O(R x L));
- `dense`: what eager attention does for `output_attentions`: the GQA keys repeated to all
  heads, `softmax(q k^T * scale + causal_mask)` materialised as [H, L, L] in fp32, then
  the same sums over the response rows.
Peak RSS as bench/loss_memory_bench.py measures it: the child allocates q and k, resets
VmHWM (`/proc/self/clear_refs`), runs, and reports VmHWM minus the RSS before the run.
Dense is not run where its estimate, (8 H + 4) L^2 bytes (two [H, L, L] fp32 tensors
alive at once, plus the [L, L] mask), exceeds `--memory-fraction` of MemAvailable.
Both masses are compared (they must agree).

    python bench/gateau_bench.py              # full run (~3 min on 2 quiet CPU cores)
    python bench/gateau_bench.py --skip-memory   # part 1 only
    python bench/gateau_bench.py --quick      # smoke run (~1 min)
    python bench/gateau_bench.py --output-json out.json
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
SAMPLE_DATA = REPO / "data" / "sample" / "long.jsonl.gz"
TOKENIZER = REPO / "data" / "sample" / "tokenizer.model"


# ---- setup: data and a tiny checkpoint ------------------------------------------------


def _run(command: list[str], what: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def prepare(args, workdir: Path, log) -> tuple[str, str]:
    """The demo's long samples preprocessed as `make demo` does, and a tiny model
    (conf/model/tiny.yaml, the demo tokenizer's vocabulary) trained for one step: random
    weights are enough for timing, and the checkpoint is a real trainer checkpoint."""
    prefix = args.data_prefix
    if prefix is None:
        prefix = str(workdir / "data" / "long")
        log("preprocessing data/sample/long.jsonl.gz ...")
        _run(
            [sys.executable, "tools/preprocess.py", "--input", str(SAMPLE_DATA),
             "--tokenizer", str(TOKENIZER), "--template", "llama2", "--output-prefix", prefix,
             "--max-length", "65536", "--on-overlength", "truncate-middle", "--workers", "1",
             "--overwrite"],
            "tools/preprocess.py",
        )  # fmt: skip
    checkpoint = args.checkpoint
    if checkpoint is None:
        log("training the tiny model for one step (the checkpoint to score with) ...")
        out = workdir / "train"
        _run(
            [sys.executable, "-m", "megatron_longalign.train", "+experiment=smoke",
             "train.max_steps=1", "optim.lr_warmup_steps=0", f"train.output_dir={out}",
             f"data.sources=[{{prefix:{prefix},weight:1.0}}]", "logging.progress_bar=false"],
            "the one-step training run",
        )  # fmt: skip
        checkpoint = str(out / "checkpoints")
    return prefix, checkpoint


# ---- part 1 child: scoring ------------------------------------------------------------


def _scoring_config(seq_length: int):
    from omegaconf import OmegaConf

    from megatron_longalign.config.training import schema_node, to_config

    model = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    cfg = OmegaConf.merge(
        schema_node(),
        {"model": model, "data": {"seq_length": seq_length}, "train": {"precision": "fp32"}},
    )
    return to_config(cfg)


def _segment_blocks(spec: dict) -> tuple[list[list], list, dict]:
    """Blocks of segment documents (about batch_tokens tokens each, whole samples), keys
    unique over the run; the padding-chunk documents of the window emulation; and what
    was selected."""
    from dataclasses import replace

    from megatron_longalign.data.indexed import SFTIndexedDataset
    from megatron_longalign.gateau.documents import DocumentConfig, sample_documents

    dataset = SFTIndexedDataset(spec["prefix"])
    config = DocumentConfig(segment_tokens=spec["segment_tokens"])
    blocks, block, block_tokens, key, pad_chunks = [], [], 0, 0, []
    samples, sample_tokens, original = 0, 0, 0
    for index in range(len(dataset)):
        if samples >= spec["max_samples"] or int(dataset.lengths[index]) > spec["max_length"]:
            continue
        sample = dataset[index]
        built = sample_documents(index, sample.tokens, sample.regions, config)
        docs = built.segment_docs
        if not docs:
            continue
        samples, sample_tokens = samples + 1, sample_tokens + int(sample.tokens.size)
        # The public code cuts a context padded to its window into window / 128 chunks
        # and scores each with the same question and response: count those tokens.
        start, end = built.segments[0]
        prompt_and_response = int(docs[0].tokens.size) - (end - start)
        original += (spec["original_window"] // spec["segment_tokens"]) * (
            spec["segment_tokens"] + prompt_and_response
        )
        for doc in docs:
            block.append(replace(doc, key=key))
            key += 1
        # The window emulation: the chunks of the context padded to `window`, past the
        # sample's real segments, are [128 pad tokens; question; response] documents.
        chunks = spec["window"] // spec["segment_tokens"]
        for _ in range(max(0, chunks - len(docs))):
            pad_chunks.append(_pad_chunk(docs[0], start, end, spec, key))
            key += 1
        block_tokens += sum(int(d.tokens.size) for d in docs)
        if block_tokens >= spec["batch_tokens"]:
            blocks.append(block)
            block, block_tokens = [], 0
    if block:
        blocks.append(block)
    return (
        blocks,
        pad_chunks,
        {
            "samples": samples,
            "sample_tokens": sample_tokens,
            "original_window_tokens": original,
        },
    )


def _pad_chunk(first_segment_doc, start: int, end: int, spec: dict, key: int):
    """Segment 0's document with its segment replaced by `segment_tokens` pad tokens: a
    chunk of the padded part of the public code's window. Segment 0's tokens sit at
    [start, end) of its document (only non-context tokens precede it)."""
    import numpy as np

    from megatron_longalign.scoring import ScoringDocument

    doc = first_segment_doc
    pads = np.full(spec["segment_tokens"], spec["pad_id"], dtype=doc.tokens.dtype)
    tokens = np.concatenate([doc.tokens[:start], pads, doc.tokens[end:]])
    mask = np.concatenate([doc.loss_mask[:start], np.zeros(pads.size, bool), doc.loss_mask[end:]])
    return ScoringDocument(key=key, tokens=tokens, loss_mask=mask)


def _padded(doc, length: int, pad_id: int):
    """The document right-padded to `length` (pad tokens outside the loss mask)."""
    import numpy as np

    from megatron_longalign.scoring import ScoringDocument

    extra = length - doc.tokens.size
    tokens = np.concatenate([doc.tokens, np.full(extra, pad_id, dtype=doc.tokens.dtype)])
    mask = np.concatenate([doc.loss_mask, np.zeros(extra, dtype=bool)])
    return ScoringDocument(key=doc.key, tokens=tokens, loss_mask=mask)


def _counting_engine(config, checkpoint: str, seq_length: int):
    """A ScoringEngine that also counts the micro-batches and tokens it runs forward."""
    from megatron_longalign.scoring import ScoringEngine

    class CountingEngine(ScoringEngine):
        forward_tokens = 0
        forward_passes = 0

        def _forward(self, microbatches, probes):
            self.forward_tokens += sum(int(mb.num_tokens) for mb in microbatches)
            self.forward_passes += len(microbatches)
            return super()._forward(microbatches, probes)

    return CountingEngine(config, checkpoint, seq_length=seq_length)


def scoring_child(spec: dict) -> dict:
    import numpy as np
    import torch

    from megatron_longalign.config.parallel import ParallelConfig
    from megatron_longalign.parallel.distributed import initialize_distributed

    torch.set_num_threads(spec["threads"])
    initialize_distributed(ParallelConfig(), seed=0, cpu=True)
    blocks, pad_chunks, selected = _segment_blocks(spec)
    docs = [d for block in blocks for d in block]
    pad_to = spec["pad_to"] or max(int(d.tokens.size) for d in docs + pad_chunks)
    if pad_to < max(int(d.tokens.size) for d in docs):
        raise ValueError(f"--pad-to {pad_to} is shorter than the longest segment document")
    engine = _counting_engine(_scoring_config(spec["seq_length"]), spec["checkpoint"],
                              spec["seq_length"])  # fmt: skip
    engine.score(docs[:2])  # warm-up, untimed: first-call allocations and lazy imports
    seconds = {"packed": 0.0, "per_segment": 0.0, "window": 0.0}
    tokens = {"packed": 0, "per_segment": 0, "window": 0}
    passes = {"packed": 0, "per_segment": 0, "window": 0}
    nll = {"packed": {}, "per_segment": {}}
    mean = {"packed": {}, "per_segment": {}}

    def run(method: str, block: list) -> None:
        before = (engine.forward_tokens, engine.forward_passes)
        start = time.perf_counter()
        if method == "packed":
            results = engine.score(block)
        else:
            results = [engine.score([_padded(d, pad_to, spec["pad_id"])])[0] for d in block]
        seconds[method] += time.perf_counter() - start
        tokens[method] += engine.forward_tokens - before[0]
        passes[method] += engine.forward_passes - before[1]
        if method == "window":
            return  # padding chunks: timed and counted, no real segment to compare
        for doc, result in zip(block, results, strict=True):
            nll[method][doc.key] = np.asarray(result.token_nll[: doc.tokens.size], np.float64)
            mean[method][doc.key] = result.mean_nll  # the response NLL GATEAU ranks by

    for i, block in enumerate(blocks):
        order = ("packed", "per_segment") if i % 2 == 0 else ("per_segment", "packed")
        for method in order:
            run(method, block)
    # The window emulation = per-segment's real segments plus the padding chunks.
    run("window", pad_chunks)
    for what in (seconds, tokens, passes):
        what["window"] += what["per_segment"]
    token_diff = max(
        float(np.nanmax(np.abs(nll["packed"][d.key] - nll["per_segment"][d.key]))) for d in docs
    )
    mean_diff = max(abs(mean["packed"][d.key] - mean["per_segment"][d.key]) for d in docs)
    # nanmax skips NaN: count the documents whose scored positions differ instead.
    nan_mismatch = sum(
        not np.array_equal(np.isnan(nll["packed"][d.key]), np.isnan(nll["per_segment"][d.key]))
        for d in docs
    )
    lengths = np.array([d.tokens.size for d in docs])
    return {
        **selected,
        "segment_documents": len(docs),
        "segment_document_tokens": int(lengths.sum()),
        "segment_document_max": int(lengths.max()),
        "segment_document_mean": float(lengths.mean()),
        "blocks": len(blocks),
        "pad_to": pad_to,
        "window": spec["window"],
        "padding_chunks": len(pad_chunks),
        "original_window": spec["original_window"],
        "seconds": seconds,
        "forward_tokens": tokens,
        "forward_passes": passes,
        "max_token_nll_diff": token_diff,
        "max_mean_nll_diff": mean_diff,
        "nan_pattern_mismatches": int(nan_mismatch),
        "load": os.getloadavg()[0],
    }


# ---- part 2 child: attention probe vs dense attention ---------------------------------


def _probe_problem(spec: dict):
    """Random post-RoPE q, k of one document and its request: response = the last R
    tokens, the 64 tokens before them the question, segments of 128 over the rest."""
    import numpy as np
    import torch

    from megatron_longalign.model.attention_probe import ProbeRequest

    length, rows = spec["length"], spec["rows"]
    gen = torch.Generator().manual_seed(spec["seed"])
    q = torch.randn(length, spec["heads"], spec["head_dim"], generator=gen)
    k = torch.randn(length, spec["kv_heads"], spec["head_dim"], generator=gen)
    query_mask = np.zeros(length, dtype=bool)
    query_mask[length - rows :] = True
    context = length - rows - 64
    segments = np.full(length, -1, dtype=np.int32)
    segments[:context] = np.arange(context) // spec["segment_tokens"]
    num_segments = -(-context // spec["segment_tokens"])
    return q, k, ProbeRequest(query_mask, segments, num_segments)


def _dense_mass(q, k, request, scale: float):
    """Eager attention's probabilities (as `output_attentions` returns them), then the
    response rows' mass per segment."""
    import numpy as np
    import torch

    length, heads = q.size(0), q.size(1)
    keys = k.repeat_interleave(heads // k.size(1), dim=1)  # GQA keys repeated, as repeat_kv
    mask = torch.full((length, length), float("-inf")).triu_(1)
    scores = torch.matmul(q.transpose(0, 1), keys.permute(1, 2, 0)) * scale  # [H, L, L]
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    del scores
    rows = torch.as_tensor(np.flatnonzero(request.query_mask))
    per_key = probs[:, rows, :].sum(dim=(0, 1), dtype=torch.float64)  # [L]
    bins = torch.as_tensor(np.where(request.key_segments >= 0, request.key_segments,
                                    request.num_segments))  # fmt: skip
    mass = torch.zeros(request.num_segments + 1, dtype=torch.float64).index_add_(0, bins, per_key)
    return (mass[:-1] / (heads * rows.numel())).numpy()


def probe_child(spec: dict) -> dict:
    import torch

    from megatron_longalign.model.attention_probe import AttentionProbe

    torch.set_num_threads(spec["threads"])
    q, k, request = _probe_problem(spec)
    scale = spec["head_dim"] ** -0.5
    reset_peak_rss()  # VmHWM := VmRSS
    baseline = current_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        if spec["variant"] == "probe":
            probe = AttentionProbe(request, key_chunk=spec["key_chunk"])
            probe.observe(1, q, k, scale, [0, spec["length"]])
            mass = probe.result()
        else:
            mass = _dense_mass(q, k, request, scale)
    seconds = time.perf_counter() - start
    return {
        "peak_above_baseline": peak_rss_bytes() - baseline,
        "seconds": seconds,
        "mass": [float(x) for x in mass],
        "load": os.getloadavg()[0],
    }


# ---- parent ---------------------------------------------------------------------------


def run_child(kind: str, spec: dict) -> dict:
    return run_json_child(__file__, ["--child", kind, json.dumps(spec)], f"{kind} child")


def dense_estimate(length: int, heads: int) -> int:
    """Two [H, L, L] fp32 tensors alive at once (the scores and their successor: scaled,
    masked, softmaxed), plus the [L, L] fp32 causal mask."""
    return (8 * heads + 4) * length * length


def bench_memory(args, log) -> list[dict]:
    rows = []
    dense_fits = True
    for length in args.probe_lengths:
        spec = {
            "length": length, "rows": args.probe_rows, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "segment_tokens": 128,
            "key_chunk": args.key_chunk, "seed": 3, "threads": args.threads,
        }  # fmt: skip
        row = {"length": length, "dense_estimate": dense_estimate(length, args.heads)}
        for variant in ("probe", "dense"):
            need = row["dense_estimate"] + GIB // 2
            if variant == "dense" and (
                not dense_fits or need > args.memory_fraction * available_memory_bytes()
            ):
                dense_fits = False
                row["dense"] = {"failed": f"not run: needs about {need / GIB:.1f} GiB, over "
                                f"{args.memory_fraction:.0%} of MemAvailable"}  # fmt: skip
                continue
            result = run_child("probe", {**spec, "variant": variant})
            row[variant] = result
            if "failed" in result:
                dense_fits = dense_fits and variant != "dense"
                log(f"  L={length} {variant}: {result['failed']}")
            else:
                log(f"  L={length} {variant}: peak +{result['peak_above_baseline'] / GIB:.3f} GiB"
                    f", {result['seconds']:.1f} s (load {result['load']:.1f})")  # fmt: skip
        if "mass" in row.get("probe", {}) and "mass" in row.get("dense", {}):
            row["mass_max_diff"] = max(
                abs(a - b) for a, b in zip(row["probe"]["mass"], row["dense"]["mass"], strict=True)
            )
        for variant in ("probe", "dense"):
            row.get(variant, {}).pop("mass", None)
        rows.append(row)
    return rows


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def report(result: dict) -> str:
    s = result["scoring"]
    sec, tok, passes = s["seconds"], s["forward_tokens"], s["forward_passes"]
    lines = [
        f"scoring: {s['samples']} samples ({s['sample_tokens']} tokens), "
        f"{s['segment_documents']} segment documents ({s['segment_document_tokens']} tokens, "
        f"mean {s['segment_document_mean']:.0f}, max {s['segment_document_max']}), "
        f"{s['blocks']} blocks; per-segment padded to {s['pad_to']}",
        f"{'method':<14}{'forwards':>10}{'forward tokens':>16}{'seconds':>10}",
        f"{'packed':<14}{passes['packed']:>10}{tok['packed']:>16}{sec['packed']:>10.1f}",
        f"{'per-segment':<14}{passes['per_segment']:>10}{tok['per_segment']:>16}"
        f"{sec['per_segment']:>10.1f}",
        f"{'window ' + str(s['window']):<14}{passes['window']:>10}{tok['window']:>16}"
        f"{sec['window']:>10.1f}",
        f"ratio window / packed: wall time {sec['window'] / sec['packed']:.1f}x, forward "
        f"tokens {tok['window'] / tok['packed']:.1f}x ({s['padding_chunks']} padding chunks)",
        f"ratio per-segment / packed: wall time {sec['per_segment'] / sec['packed']:.1f}x, "
        f"forward tokens {tok['per_segment'] / tok['packed']:.1f}x "
        f"(the original's {s['original_window']}-token window, count only: {s['original_window_tokens'] / tok['packed']:.0f}x)",
        f"agreement: max |token NLL diff| {s['max_token_nll_diff']:.1e}, "
        f"max |response mean NLL diff| {s['max_mean_nll_diff']:.1e}",
        "",
        f"{'L':>7}{'probe peak':>14}{'dense peak':>14}{'dense/probe':>13}{'dense estimate':>16}"
        f"{'probe s':>9}{'dense s':>9}{'mass diff':>11}",
    ]
    for row in result["memory"]:
        p, d = row["probe"], row.get("dense", {})
        ok = "failed" not in p and "failed" not in d
        ratio = f"{d['peak_above_baseline'] / p['peak_above_baseline']:.1f}x" if ok else "-"
        lines.append(
            f"{row['length']:>7}"
            f"{_fmt_bytes(p['peak_above_baseline']) if 'failed' not in p else 'failed':>14}"
            f"{_fmt_bytes(d['peak_above_baseline']) if 'failed' not in d else 'not run':>14}"
            f"{ratio:>13}"
            f"{_fmt_bytes(row['dense_estimate']):>16}"
            f"{p.get('seconds', float('nan')):>9.1f}{d.get('seconds', float('nan')):>9.1f}"
            f"{row.get('mass_max_diff', float('nan')):>11.1e}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 min)")
    parser.add_argument(
        "--data-prefix", help="a preprocessed prefix (default: preprocess the demo's long samples)"
    )
    parser.add_argument(
        "--checkpoint", help="a tiny-model checkpoint (default: train one for one step)"
    )
    parser.add_argument(
        "--max-length", type=int, default=8192, help="samples up to this many tokens"
    )
    parser.add_argument("--max-samples", type=int, default=48)
    parser.add_argument("--segment-tokens", type=int, default=128)
    parser.add_argument("--seq-length", type=int, default=16384, help="packed micro-batch tokens")
    parser.add_argument(
        "--batch-tokens", type=int, default=65536, help="segment-document tokens per score() call"
    )
    parser.add_argument(
        "--pad-to",
        type=int,
        default=0,
        help="per-segment pad length (0: the longest segment document)",
    )
    parser.add_argument("--pad-id", type=int, default=0)
    parser.add_argument(
        "--original-window",
        type=int,
        default=64000,
        help="the public code's context window (WINDOW_SIZE), for its token count",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="the timed emulation of the public code's procedure: every sample's context "
        "padded to this window and cut into window / segment_tokens chunks, padding chunks "
        "scored too, one forward each (0: --max-length, the demo data's longest sample)",
    )
    parser.add_argument(
        "--probe-lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[2048, 4096, 6144, 8192, 16384, 32768, 65536],
    )
    parser.add_argument("--probe-rows", type=int, default=512, help="R, the response rows")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--key-chunk", type=int, default=4096)
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.6,
        help="run dense only where its estimate fits this share of MemAvailable (a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=torch_threads())
    parser.add_argument("--skip-memory", action="store_true", help="part 1 only")
    parser.add_argument("--output-json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.max_length, args.max_samples = min(args.max_length, 3000), min(args.max_samples, 4)
        args.seq_length, args.batch_tokens = (
            min(args.seq_length, 4096),
            min(args.batch_tokens, 8192),
        )
        args.probe_lengths = [1024, 2048]
        args.heads, args.kv_heads, args.head_dim, args.probe_rows = 8, 2, 64, 128
    return args


def torch_threads() -> int:
    return len(os.sched_getaffinity(0))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps(scoring_child(spec) if kind == "scoring" else probe_child(spec)))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gateau_bench_") as tmp:
        prefix, checkpoint = prepare(args, Path(tmp), log)
        spec = {
            "prefix": prefix, "checkpoint": checkpoint, "max_length": args.max_length,
            "max_samples": args.max_samples, "segment_tokens": args.segment_tokens,
            "seq_length": args.seq_length, "batch_tokens": args.batch_tokens,
            "pad_to": args.pad_to, "pad_id": args.pad_id, "threads": args.threads,
            "original_window": args.original_window,
            "window": args.window or args.max_length,
        }  # fmt: skip
        log("part 1: packed vs per-segment scoring ...")
        scoring = run_child("scoring", spec)
        log(f"  done ({scoring['seconds']['packed'] + scoring['seconds']['window']:.0f} s "
            f"timed, load {scoring['load']:.1f})")  # fmt: skip
    log("part 2: attention probe vs dense attention memory ...")
    memory = [] if args.skip_memory else bench_memory(args, log)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },  # fmt: skip
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "scoring": scoring,
        "memory": memory,
        "total_seconds": time.perf_counter() - started,
        "load_average": os.getloadavg(),
    }
    print(report(result))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
