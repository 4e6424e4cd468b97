"""Write the synthetic long-context + short-chat data set (the bundled demo data).

    python tools/make_synthetic.py --output-dir data/sample

All generation logic lives in `megatron_longalign.devdata.synthetic`; this is only the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    from megatron_longalign.devdata import synthetic
except ImportError:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_longalign.devdata import synthetic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True, help="directory for the JSONL files")
    parser.add_argument("--num-long", type=int, default=48, help="long-context samples")
    parser.add_argument("--num-short", type=int, default=400, help="short chat samples")
    parser.add_argument("--min-words", type=int, default=600, help="shortest long context")
    parser.add_argument("--max-words", type=int, default=14000, help="longest long context")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--style", choices=synthetic.STYLES, default="messages")
    parser.add_argument(
        "--compress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gzip the outputs (*.jsonl.gz; deterministic bytes)",
    )
    return parser.parse_args(argv)


class _WordTally:
    """Counts words per record while the records stream through write_jsonl."""

    def __init__(self) -> None:
        self.per_record: list[int] = []

    def watch(self, records: Iterable[dict]) -> Iterator[dict]:
        for record in records:
            self.per_record.append(sum(len(m["content"].split()) for m in record["messages"]))
            yield record

    def summary(self) -> str:
        counts = self.per_record
        if not counts:
            return "0 words"
        mean = sum(counts) / len(counts)
        return (
            f"{sum(counts)} words (per record min {min(counts)} / mean {mean:.0f} "
            f"/ max {max(counts)})"
        )


def _write(path: Path, records: Iterable[dict], style: str) -> None:
    tally = _WordTally()
    count = synthetic.write_jsonl(tally.watch(records), path, style=style)
    print(f"wrote {path}: {count} records, {tally.summary()}, {os.path.getsize(path)} bytes")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = ".jsonl.gz" if args.compress else ".jsonl"
    out = Path(args.output_dir)
    try:
        long_records = synthetic.generate_long_samples(
            args.num_long, args.min_words, args.max_words, args.seed
        )
        short_records = synthetic.generate_short_chats(args.num_short, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _write(out / f"long{suffix}", long_records, args.style)
    _write(out / f"short_chat{suffix}", short_records, args.style)
    return 0


if __name__ == "__main__":
    sys.exit(main())
