"""What an output already holds: the finished jobs (resume skips them) and the running
totals over all runs (samples, rejects by reason, questions dropped, tokens).

The samples file of a real run is large (10k samples of up to 64k tokens is gigabytes),
so it is streamed (utils.jsonl_records.iter_records) rather than loaded whole: a torn
last line (a killed writer) is ignored, and the next RecordAppender cuts it; a malformed
complete line is an error naming file and line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_longalign.utils.jsonl_records import iter_records


@dataclass
class Ledger:
    done: set[str] = field(default_factory=set)
    samples: int = 0
    rejected: Counter = field(default_factory=Counter)
    near_duplicates_dropped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_sample(self, meta: dict[str, Any]) -> None:
        self.samples += 1
        self._add(meta)

    def add_reject(self, record: dict[str, Any]) -> None:
        self.rejected[record["reason"]] += 1
        self._add(record)

    def _add(self, info: dict[str, Any]) -> None:
        self.done.add(info["job"])
        self.near_duplicates_dropped += int(info.get("near_duplicates_dropped", 0))
        usage = info.get("usage", {})
        self.prompt_tokens += int(usage.get("prompt_tokens", 0))
        self.completion_tokens += int(usage.get("completion_tokens", 0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "rejected": dict(sorted(self.rejected.items())),
            "near_duplicate_questions_dropped": self.near_duplicates_dropped,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def read_ledger(samples: Path, rejects: Path) -> Ledger:
    """The ledger of an existing output (empty for a new one)."""
    ledger = Ledger()
    for record in iter_records(samples):
        ledger.add_sample(record["meta"])
    for record in iter_records(rejects):
        ledger.add_reject(record)
    return ledger
