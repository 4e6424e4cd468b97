#!/usr/bin/env python
"""Long chat JSONL -> megatron-core IndexedDataset (+ loss regions and stats).

Example:
    python tools/preprocess.py --input 'data/*.jsonl' --tokenizer /models/llama2/tokenizer.model \
        --template llama2 --output-prefix out/long --max-length 65536 --workers 16
    python tools/preprocess.py --verify out/long     # check every file against out/long.json

Exit status: 0 done, 1 an error (the message names the file and what to do), 2 usage.
"""

from __future__ import annotations

import argparse
import logging
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
    parser.add_argument("--input", nargs="+", help="JSONL files or globs (.gz ok)")
    parser.add_argument("--tokenizer", help="sentencepiece .model file or local HF tokenizer dir")
    parser.add_argument("--template", choices=sorted(TEMPLATES))
    parser.add_argument(
        "--output-prefix",
        help="writes PREFIX.json, which names the set's files PREFIX.<tag>.bin/.idx/...",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing PREFIX.json set (published only once the new one is complete)",
    )
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
    parser.add_argument(
        "--verify",
        nargs="+",
        metavar="PREFIX",
        help="check preprocessed sets instead: every file P.json names, with its size and "
        "sha256, and the indexes",
    )
    return parser


def verify(prefixes: list[str]) -> int:
    from megatron_longalign.data.indexed import DataFileError, open_dataset_files

    failed = 0
    for prefix in prefixes:
        try:
            files = open_dataset_files(prefix, verify=True)
        except DataFileError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        names = ", ".join(p.name for p in files.paths.values())
        print(f"ok: {prefix}.json: {files.lengths.size} samples; {names}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.verify:
        return verify(args.verify)
    missing = [
        f"--{name}" for name in ("input", "tokenizer", "template") if not getattr(args, name)
    ]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
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
            overwrite=args.overwrite,
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
    files = stats.published_files
    print(f"wrote {args.output_prefix}.json, naming {', '.join(files.values())}")
    if ".rejects.jsonl" in files:
        print(f"dropped/rejected lines are listed in {files['.rejects.jsonl']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
