#!/usr/bin/env python
"""Long chat JSONL -> megatron-core IndexedDataset (+ loss regions and stats).

Example:
    python tools/preprocess.py --input 'data/*.jsonl' --tokenizer /models/llama2/tokenizer.model \
        --template llama2 --output-prefix out/long --max-length 65536 --workers 16
"""

from __future__ import annotations

import argparse
import sys

from megatron_longalign.data.encoding import TemplateTokenizerMismatch
from megatron_longalign.data.jsonl_reader import InputError
from megatron_longalign.data.overlength import OVERLENGTH_POLICIES
from megatron_longalign.data.preprocess import (
    EncodeSpec,
    PreprocessConfig,
    PreprocessError,
    SampleProcessor,
    preprocess,
)
from megatron_longalign.data.templates import TEMPLATES
from megatron_longalign.data.tokenizer import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or globs (.gz ok)")
    parser.add_argument(
        "--tokenizer", required=True, help="sentencepiece .model file or local HF tokenizer dir"
    )
    parser.add_argument("--template", required=True, choices=sorted(TEMPLATES))
    parser.add_argument("--output-prefix", help="writes PREFIX.bin/.idx/.regions.*/.json")
    parser.add_argument("--max-length", type=int, default=None, help="max tokens per sample")
    parser.add_argument("--on-overlength", choices=OVERLENGTH_POLICIES, default="drop")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad lines (listed with reasons in PREFIX.rejects.jsonl) instead of stopping",
    )
    parser.add_argument(
        "--inspect", type=int, metavar="K", help="print K rendered samples and exit (no output)"
    )
    parser.add_argument(
        "--inspect-chars", type=int, default=None, help="elide regions longer than this"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = EncodeSpec(args.tokenizer, args.template, args.max_length, args.on_overlength)
    try:
        if args.inspect is not None:
            from megatron_longalign.data.inspect_samples import inspect_samples

            inspect_samples(args.input, SampleProcessor(spec), args.inspect, args.inspect_chars)
            return 0
        if not args.output_prefix:
            print("error: --output-prefix is required (unless --inspect)", file=sys.stderr)
            return 2
        config = PreprocessConfig(
            inputs=tuple(args.input),
            output_prefix=args.output_prefix,
            spec=spec,
            workers=args.workers,
            skip_bad=args.skip_bad,
            progress=not args.no_progress,
        )
        stats = preprocess(config)
    except (
        PreprocessError,
        InputError,
        TokenizerError,
        TemplateTokenizerMismatch,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(stats.summary())
    print(f"wrote {args.output_prefix}.{{bin,idx,regions.bin,regions.idx,json}}")
    if stats.dropped or stats.rejected:
        print(f"dropped/rejected lines are listed in {args.output_prefix}.rejects.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
