#!/usr/bin/env python
"""Preprocessing throughput: the full pipeline against the bare tokenizer, in one run.

- bare: the tokenizer library's own encode call (sentencepiece `encode_as_ids`, or HF
  `tokenizers` `encode`) on each sample's fully rendered text, one process, text already
  in memory: the lower bound on cost.
- pipeline: `preprocess()` end to end (read JSONL, parse, validate, template, tokenize
  piecewise, write IndexedDatasets + metadata) with 1 and 2 workers.

Measurements are interleaved (bare, w1, w2, bare, w1, w2, ...) and the median is
reported, so machine noise hits every configuration alike. The one-time import of
megatron-core (~5 s, paid once per run) is done before timing and reported separately.

    python bench/preprocess_bench.py                   # bundled tiny tokenizer
    python bench/preprocess_bench.py --tokenizer /models/llama3   # a real HF tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from megatron_longalign.data.conversation import parse_conversation
from megatron_longalign.data.encoding import SampleEncoder
from megatron_longalign.data.indexed import indexed_dataset_module
from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
from megatron_longalign.data.synthetic import (
    generate_long_samples,
    generate_short_chats,
    write_jsonl,
)
from megatron_longalign.data.templates import get_template
from megatron_longalign.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_data(directory: Path, num_long: int, num_short: int, seed: int) -> Path:
    """A LongAlign-like mix: long retrieval/multi-hop samples plus short chats."""
    records = list(generate_long_samples(num_long, 2000, 14000, seed))
    records += list(generate_short_chats(num_short, seed + 1))
    path = directory / "bench.jsonl"
    write_jsonl(records, path)
    return path


def bare_encoder(tokenizer_path: str):
    """The tokenizer library's own encode function, untouched by this project."""
    path = Path(tokenizer_path)
    if path.is_file() or not (path / "tokenizer.json").is_file():
        import sentencepiece as spm

        model = path if path.is_file() else path / "tokenizer.model"
        return spm.SentencePieceProcessor(model_file=str(model)).encode_as_ids
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def time_bare(encode, texts: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(len(encode(text)) for text in texts)
    return time.perf_counter() - start, tokens


def time_pipeline(data: Path, out: Path, spec: EncodeSpec, workers: int) -> tuple[float, int]:
    config = PreprocessConfig(
        inputs=(str(data),),
        output_prefix=str(out / "ds"),
        spec=spec,
        workers=workers,
        progress=False,
    )
    start = time.perf_counter()
    stats = preprocess(config)
    return time.perf_counter() - start, stats.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(REPO / "data/sample/tokenizer.model"))
    parser.add_argument("--template", default="llama2")
    parser.add_argument("--num-long", type=int, default=60)
    parser.add_argument("--num-short", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    indexed_dataset_module()
    import_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp, args.num_long, args.num_short, args.seed)
        encoder = SampleEncoder(load_tokenizer(args.tokenizer), get_template(args.template))
        with open(data, "rb") as f:
            texts = [encoder.render(parse_conversation(line.rstrip(b"\n"))) for line in f]
        encode = bare_encoder(args.tokenizer)
        spec = EncodeSpec(args.tokenizer, args.template)
        timings: dict[str, list[float]] = {"bare": [], "w1": [], "w2": []}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            seconds, tokens["bare"] = time_bare(encode, texts)
            timings["bare"].append(seconds)
            for workers in (1, 2):
                seconds, tokens[f"w{workers}"] = time_pipeline(
                    data, tmp / f"w{workers}", spec, workers
                )
                timings[f"w{workers}"].append(seconds)
        size_mb = data.stat().st_size / 1e6

    rate = {k: tokens[k] / statistics.median(v) for k, v in timings.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print(f"tokenizer: {args.tokenizer} ({encoder.tokenizer.kind}), template {args.template}")
    print(
        f"data: {len(texts)} samples ({args.num_long} long + {args.num_short} short), "
        f"{size_mb:.1f} MB JSONL, {tokens['w1']:,} tokens; medians of {args.repeats} interleaved runs"
    )
    print(f"one-time megatron-core import (not in the timings): {import_seconds:.1f} s\n")
    print("| configuration | tokens/s | tokens/s per worker | vs bare tokenizer |")
    print("|---|---|---|---|")
    rows = [("bare tokenizer encode (1 process)", "bare", 1)]
    rows += [("pipeline, 1 worker", "w1", 1), ("pipeline, 2 workers", "w2", 2)]
    for label, key, workers in rows:
        relative = rate[key] / workers / rate["bare"]
        print(f"| {label} | {rate[key]:,.0f} | {rate[key] / workers:,.0f} | {relative:.2f}x |")
    overhead = rate["bare"] / rate["w1"] - 1
    print(f"\npipeline cost over the bare tokenizer (1 worker): {100 * overhead:+.1f}%")
    print(f"2-worker speed-up over 1 worker: {rate['w2'] / rate['w1']:.2f}x")
    print(json.dumps({"rates": rate, "overhead": overhead}))


if __name__ == "__main__":
    main()
