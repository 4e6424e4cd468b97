#!/usr/bin/env python
"""Preprocessing throughput: the full pipeline against the bare tokenizer, in one run.

- bare: the tokenizer library's own encode call (sentencepiece `encode_as_ids` and its
  native buffer binding, or HF `tokenizers` `encode`) on each sample's fully rendered
  text, one process, text already in memory: the lower bound on cost.
- pipeline: `preprocess()` end to end (read JSONL, parse, validate, template, tokenize
  as at inference with region offsets, write and publish the IndexedDatasets + P.json)
  with 1 and 2 workers.

Measurements are interleaved (bare, encoder, w1, w2, bare, ...) and the fastest of the
repeats is reported: on a shared VM noise only ever adds time (medians of the same code
moved by +-10% between runs here), so the minimum is the stable estimate of the cost. The one-time import of
megatron-core (~5 s, paid once per run) is done before timing and reported separately.

    python bench/preprocess_bench.py                   # bundled tiny tokenizer
    python bench/preprocess_bench.py --tokenizer /models/llama3   # a real HF tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_longalign.data.conversation import parse_conversation
from megatron_longalign.data.encoding import SampleEncoder
from megatron_longalign.data.indexed import indexed_dataset_module
from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
from megatron_longalign.data.templates import get_template
from megatron_longalign.data.tokenizer import load_tokenizer
from megatron_longalign.devdata.synthetic import (
    generate_long_samples,
    generate_short_chats,
    tokenizer_training_text,
    write_jsonl,
)
from megatron_longalign.devdata.tokenizer_training import train_hf_bpe

REPO = Path(__file__).resolve().parents[1]


def make_data(directory: Path, num_long: int, num_short: int, seed: int) -> Path:
    """A LongAlign-like mix: long retrieval/multi-hop samples plus short chats."""
    records = list(generate_long_samples(num_long, 2000, 14000, seed))
    records += list(generate_short_chats(num_short, seed + 1))
    path = directory / "bench.jsonl"
    write_jsonl(records, path)
    return path


def bare_encoders(tokenizer_path: str) -> dict[str, object]:
    """The tokenizer library's own encode calls, untouched by this project: its public
    API, and for sentencepiece also its native ids-as-buffer binding, which skips
    building a Python list (the pipeline uses that binding, so it is the fair floor)."""
    path = Path(tokenizer_path)
    if path.is_file() or not (path / "tokenizer.json").is_file():
        import sentencepiece as spm

        model = path if path.is_file() else path / "tokenizer.model"
        sp = spm.SentencePieceProcessor(model_file=str(model))
        encoders = {"bare `encode_as_ids` (public API)": sp.encode_as_ids}
        native = getattr(getattr(sp, "_processor", None), "_EncodeAsBuffer", None)
        if native is not None:
            encoders["bare native `_EncodeAsBuffer` -> numpy"] = lambda text: np.asarray(
                native(text, False, -1, 0.1, False, False, False)
            )
        return encoders
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return {"bare `Tokenizer.encode`": lambda text: tok.encode(text, add_special_tokens=False).ids}


def time_bare(encode, texts: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for text in texts:
        tokens += len(encode(text))
    return time.perf_counter() - start, tokens


def time_pipeline(data: Path, out: Path, spec: EncodeSpec, workers: int) -> tuple[float, int]:
    config = PreprocessConfig(
        inputs=(str(data),),
        output_prefix=str(out / "ds"),
        spec=spec,
        workers=workers,
        progress=False,
        overwrite=True,  # timed repeatedly into the same prefix
    )
    start = time.perf_counter()
    stats = preprocess(config)
    return time.perf_counter() - start, stats.tokens


def time_encoder(encoder: SampleEncoder, conversations: list) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(len(encoder.encode(conversation)) for conversation in conversations)
    return time.perf_counter() - start, tokens


def bench_tokenizer(data: Path, tmp: Path, tokenizer: str, template: str, repeats: int) -> dict:
    encoder = SampleEncoder(load_tokenizer(tokenizer), get_template(template))
    with open(data, "rb") as f:
        conversations = [parse_conversation(line.rstrip(b"\n")) for line in f]
    texts = [encoder.render(conversation) for conversation in conversations]
    bare = bare_encoders(tokenizer)
    spec = EncodeSpec(tokenizer, template)
    timings: dict[str, list[float]] = {name: [] for name in [*bare, "encoder", "w1", "w2"]}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, encode in bare.items():
            seconds, tokens[name] = time_bare(encode, texts)
            timings[name].append(seconds)
        seconds, tokens["encoder"] = time_encoder(encoder, conversations)
        timings["encoder"].append(seconds)
        for workers in (1, 2):
            seconds, tokens[f"w{workers}"] = time_pipeline(data, tmp / f"w{workers}", spec, workers)
            timings[f"w{workers}"].append(seconds)
    rate = {k: tokens[k] / min(v) for k, v in timings.items()}
    return {"kind": encoder.tokenizer.kind, "bare": list(bare), "rate": rate, "tokens": tokens}


def report(name: str, result: dict) -> None:
    rate, bare = result["rate"], result["bare"]
    floor = max(rate[b] for b in bare)
    print(f"\n### {name} ({result['kind']}), {result['tokens']['w1']:,} tokens\n")
    print("| configuration | tokens/s | tokens/s per worker | per worker vs fastest bare |")
    print("|---|---|---|---|")
    rows = [(b, b, 1) for b in bare]
    rows += [("`SampleEncoder.encode` alone (in memory)", "encoder", 1)]
    rows += [("pipeline, 1 worker", "w1", 1), ("pipeline, 2 workers", "w2", 2)]
    for label, key, workers in rows:
        per_worker = rate[key] / workers
        print(f"| {label} | {rate[key]:,.0f} | {per_worker:,.0f} | {per_worker / floor:.2f}x |")
    print(
        f"\ntokenization as at inference (encoder alone) over the fastest bare call: "
        f"{100 * (floor / rate['encoder'] - 1):+.1f}%"
    )
    print(
        f"pipeline cost over the fastest bare call (1 worker): {100 * (floor / rate['w1'] - 1):+.1f}%"
    )
    print(f"2-worker speed-up over 1 worker: {rate['w2'] / rate['w1']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(REPO / "data/sample/tokenizer.model"))
    parser.add_argument("--template", default="llama2")
    parser.add_argument(
        "--no-hf", action="store_true", help="skip the HF byte-level BPE tokenizer pass"
    )
    # 30% long / 70% short chat by count, as in LongAlign's data mix.
    parser.add_argument("--num-long", type=int, default=720)
    parser.add_argument("--num-short", type=int, default=1680)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    indexed_dataset_module()
    import_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp, args.num_long, args.num_short, args.seed)
        size_mb = data.stat().st_size / 1e6
        tokenizers = {"bundled sentencepiece (BPE, 2048 pieces)": args.tokenizer}
        if not args.no_hf:
            hf = train_hf_bpe(tokenizer_training_text(20000, 7), tmp / "hf", 2048, "byte_level")
            tokenizers["HF tokenizers byte-level BPE (2048 pieces, Llama-3/Qwen style)"] = str(hf)
        results = {
            name: bench_tokenizer(data, tmp, path, args.template, args.repeats)
            for name, path in tokenizers.items()
        }

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"data: {args.num_long} long + {args.num_short} short samples, {size_mb:.1f} MB JSONL, "
        f"template {args.template}; fastest of {args.repeats} interleaved runs"
    )
    print(f"one-time megatron-core import (not in the timings): {import_seconds:.1f} s")
    for name, result in results.items():
        report(name, result)
    print("\n" + json.dumps({name: r["rate"] for name, r in results.items()}))


if __name__ == "__main__":
    main()
