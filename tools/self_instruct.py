#!/usr/bin/env python
"""Long documents -> long instruction samples (LongAlign's Self-Instruct) from any
OpenAI-compatible chat endpoint. docs/DATA_CONSTRUCTION.md has the details.

Example:
    export OPENAI_API_KEY=...
    python tools/self_instruct.py --input docs_dir/ more.jsonl --output out/samples.jsonl \
        --base-url https://api.example.com/v1 --model some-model \
        --tokenizer /models/llama2/tokenizer.model --concurrency 16 \
        --price-input 3 --price-output 15
    python tools/preprocess.py --input out/samples.jsonl --tokenizer ... --template llama2 ...

A rerun with the same --output resumes: finished documents are skipped.
Exit status: 0 done, 1 the endpoint failed (rerun to resume), 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys

from megatron_longalign.data.tokenizer import TokenizerError
from megatron_longalign.datagen.documents import DocumentError
from megatron_longalign.datagen.report import format_summary
from megatron_longalign.datagen.runner import Endpoint, RunConfig, run_self_instruct
from megatron_longalign.datagen.selection import SelectionRules
from megatron_longalign.datagen.settings import GenerationSettings, SettingsMismatch
from megatron_longalign.utils.chat_api import ChatAPIError
from megatron_longalign.utils.jsonl_records import RecordsFileError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--input", nargs="+", required=True, help="directories of .txt/.md files, JSONL files")
    add("--output", required=True, help="samples JSONL (rejects/cache/settings/summary beside)")
    add("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    add("--model", required=True, help="the generator model name at the endpoint")
    add("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    add("--tokenizer", required=True, help="the training tokenizer (lengths are its tokens)")
    add("--min-tokens", type=int, default=8192, help="shortest document kept (tokens)")
    add("--max-tokens", type=int, default=65536, help="longest document kept (tokens)")
    add("--upsample-min-tokens", type=int, default=None, help="documents this long or longer...")
    add("--upsample-copies", type=int, default=1, help="...yield this many samples each")
    add("--seed", type=int, default=0, help="seeds the task and question choices per document")
    add("--temperature", type=float, default=0.7)
    add("--max-output-tokens", type=int, default=2048, help="per reply")
    add("--max-attempts", type=int, default=3, help="asks per step before a reject")
    add("--concurrency", type=int, default=8, help="requests in flight at most")
    add("--max-retries", type=int, default=6, help="HTTP retries on 429/5xx/connection errors")
    add("--timeout", type=float, default=600.0, help="seconds per request")
    add("--price-input", type=float, default=0.0, help="price per 1M prompt tokens")
    add("--price-output", type=float, default=0.0, help="price per 1M completion tokens")
    add("--limit", type=int, default=None, help="at most this many new jobs (a pilot run)")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        inputs=args.input,
        output=args.output,
        tokenizer=args.tokenizer,
        endpoint=Endpoint(
            base_url=args.base_url,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            max_retries=args.max_retries,
            timeout=args.timeout,
            price_input=args.price_input,
            price_output=args.price_output,
        ),
        settings=GenerationSettings(
            model=args.model,
            seed=args.seed,
            temperature=args.temperature,
            max_output_tokens=args.max_output_tokens,
            max_attempts=args.max_attempts,
        ),
        selection=SelectionRules(
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            upsample_min_tokens=args.upsample_min_tokens,
            upsample_copies=args.upsample_copies,
        ),
        limit=args.limit,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_self_instruct(config_from_args(args))
    except (DocumentError, SettingsMismatch, TokenizerError, RecordsFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ChatAPIError as err:
        print(f"error: {err}\nfinished jobs are kept; rerun to resume", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"samples: {summary['files']['samples']}; rejects: {summary['files']['rejects']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
