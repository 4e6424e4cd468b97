#!/usr/bin/env python
"""Train a tiny tokenizer (the bundled demo tokenizer, or test tokenizers).

    python tools/train_tokenizer.py --output data/sample/tokenizer.model
    python tools/train_tokenizer.py --kind hf-byte-level --output /tmp/hf_tok

By default it trains on the synthetic generator's text; `--input` trains on the message
contents of JSONL chat files instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from megatron_longalign.data.jsonl_reader import expand_inputs, read_chunks
from megatron_longalign.devdata.synthetic import tokenizer_training_text
from megatron_longalign.devdata.tokenizer_training import train_hf_bpe, train_sentencepiece

KINDS = ("sentencepiece", "hf-byte-level", "hf-metaspace")


def _contents(patterns: list[str]) -> Iterator[str]:
    for chunk in read_chunks(expand_inputs(patterns)):
        for _, raw in chunk.lines:
            if raw.strip():
                record = json.loads(raw)
                for turn in record.get("messages") or record.get("conversations") or []:
                    yield turn.get("content") or turn.get("value") or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help=".model file or HF directory")
    parser.add_argument("--kind", choices=KINDS, default="sentencepiece")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--input", nargs="*", help="JSONL chat files/globs to train on")
    parser.add_argument("--lines", type=int, default=20000, help="synthetic lines to train on")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    lines = list(
        _contents(args.input) if args.input else tokenizer_training_text(args.lines, args.seed)
    )
    if args.kind == "sentencepiece":
        path = train_sentencepiece(lines, args.output, args.vocab_size)
    else:
        style = "byte_level" if args.kind == "hf-byte-level" else "metaspace"
        path = train_hf_bpe(lines, args.output, args.vocab_size, style)
    print(f"wrote {args.kind} tokenizer ({args.vocab_size} pieces) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
