"""Counters and the length histogram reported in P.json and on the console."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Power-of-two buckets up to 128k, plus everything longer.
HISTOGRAM_EDGES = [0] + [2**k for k in range(9, 18)]


def _bucket_label(index: int) -> str:
    low = HISTOGRAM_EDGES[index]
    if index + 1 < len(HISTOGRAM_EDGES):
        return f"[{low}, {HISTOGRAM_EDGES[index + 1]})"
    return f"[{low}, inf)"


@dataclass
class PreprocessStats:
    lines: int = 0
    blank_lines: int = 0
    samples: int = 0
    truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0
    min_length: int | None = None
    max_length: int = 0
    dropped: Counter = field(default_factory=Counter)  # valid samples not written
    rejected: Counter = field(default_factory=Counter)  # bad input lines (--skip-bad)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(HISTOGRAM_EDGES), int))
    # member suffix -> file name of the published set (set by preprocess(); not in P.json's
    # stats, which P.json's "files" table already covers)
    published_files: dict[str, str] = field(default_factory=dict)

    def add_sample(self, length: int, targets: int, truncated: bool) -> None:
        self.samples += 1
        self.truncated += int(truncated)
        self.tokens += length
        self.target_tokens += targets
        self.min_length = length if self.min_length is None else min(self.min_length, length)
        self.max_length = max(self.max_length, length)
        self.histogram[np.searchsorted(HISTOGRAM_EDGES, length, side="right") - 1] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {
                "lines": self.lines,
                "blank_lines": self.blank_lines,
                "samples_written": self.samples,
                "truncated": self.truncated,
                "dropped": dict(sorted(self.dropped.items())),
                "rejected": dict(sorted(self.rejected.items())),
            },
            "tokens": {
                "total": self.tokens,
                "target": self.target_tokens,
                "min_length": self.min_length or 0,
                "max_length": self.max_length,
                "mean_length": round(self.tokens / self.samples, 2) if self.samples else 0.0,
            },
            "length_histogram": [
                {"range": _bucket_label(i), "count": int(c)} for i, c in enumerate(self.histogram)
            ],
        }

    def summary(self) -> str:
        """A human-readable report for the console."""
        rows = [
            ("lines read", self.lines),
            ("blank lines", self.blank_lines),
            ("samples written", self.samples),
            ("  of which truncated", self.truncated),
        ]
        rows += [(f"dropped: {reason}", n) for reason, n in sorted(self.dropped.items())]
        rows += [(f"rejected: {reason}", n) for reason, n in sorted(self.rejected.items())]
        mean = self.tokens / self.samples if self.samples else 0.0
        rows += [
            ("tokens", self.tokens),
            ("target tokens", self.target_tokens),
            ("length min / mean / max", f"{self.min_length or 0} / {mean:.0f} / {self.max_length}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines.append("length histogram (tokens):")
        peak = max(int(self.histogram.max()), 1)
        for i, count in enumerate(self.histogram):
            if count:
                bar = "#" * max(1, round(30 * count / peak))
                lines.append(f"  {_bucket_label(i):>16}  {count:>8}  {bar}")
        return "\n".join(lines)
