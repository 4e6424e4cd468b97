#!/usr/bin/env python
"""Evaluate a trained model (docs/EVALUATION.md): LongBench-Chat with an LLM judge,
needle-in-a-haystack, LongBench.

    python tools/evaluate.py needle --model outputs/demo/hf --output eval/needle
    python tools/evaluate.py longbench-chat --model ckpt/ --data longbench_chat.jsonl \\
        --judge-base-url https://api.openai.com/v1 --judge-model gpt-4o --output eval/lbc
    python tools/evaluate.py longbench --model hf/ --data-dir LongBench/data --output eval/lb

The model is an exported HF directory or a trainer checkpoint (exported on the fly);
`--backend` picks transformers, vllm or an OpenAI-compatible server (`--base-url`).
Every command resumes: rerun it after a kill and finished cases are skipped.
Bad input exits with status 2 and a message naming the file, line or option.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import megatron_longalign  # noqa: F401
except ImportError:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    from megatron_longalign.eval import longbench, longbench_chat, needle
    from megatron_longalign.eval.generation import add_generation_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for task in (longbench_chat, needle, longbench):
        task.add_cli(commands)
    for command in commands.choices.values():
        add_generation_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
