"""The settings of a Self-Instruct run and the files it writes.

Files, all beside `--output` (say samples.jsonl):
- samples.jsonl: the samples (appended and flushed one by one);
- samples.rejects.jsonl: one line per rejected job, with the reason and the raw output;
- samples.cache.jsonl: every model reply (a rerun pays for nothing twice);
- samples.settings.json: the settings that decide what a sample contains;
- samples.summary.json: the counts, usage and cost of the last run.

A rerun appends to the same files and skips the jobs already there, so the sidecar
guards it: a run whose generation settings differ from the sidecar's is refused (the
output would mix two kinds of samples). The length window and upsampling are not among
them: widening the window or adding copies only adds jobs, each made the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_longalign.datagen.prompts import PROMPTS_VERSION
from megatron_longalign.utils.atomic_files import write_text_durably


class SettingsMismatch(ValueError):
    """An existing output was made with other generation settings."""


@dataclass(frozen=True)
class GenerationSettings:
    model: str
    seed: int = 0
    temperature: float = 0.7  # > 0 so that asking again can give a different reply
    max_output_tokens: int | None = 2048
    max_attempts: int = 3  # per model call, for unusable (not failed) replies
    prompts_version: str = PROMPTS_VERSION

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError("--max-output-tokens must be positive")


@dataclass(frozen=True)
class OutputFiles:
    samples: Path

    def _beside(self, suffix: str) -> Path:
        name = self.samples.name
        stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        return self.samples.with_name(stem + suffix)

    @property
    def rejects(self) -> Path:
        return self._beside(".rejects.jsonl")

    @property
    def cache(self) -> Path:
        return self._beside(".cache.jsonl")

    @property
    def settings(self) -> Path:
        return self._beside(".settings.json")

    @property
    def summary(self) -> Path:
        return self._beside(".summary.json")


def check_settings(files: OutputFiles, settings: GenerationSettings) -> None:
    """Refuse `settings` if the output was started with other ones (or by something else)."""
    if files.settings.exists():
        try:
            recorded = json.loads(files.settings.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SettingsMismatch(f"{files.settings}: unreadable ({err})") from None
        wanted = asdict(settings)
        differ = [k for k, v in wanted.items() if recorded.get(k) != v]
        if differ:
            changes = ", ".join(f"{k} {recorded.get(k)!r} there, {wanted[k]!r} now" for k in differ)
            raise SettingsMismatch(
                f"{files.samples} was generated with other settings ({changes}); a resumed "
                "run must use the same ones: pass the recorded settings, or write to a new "
                "--output"
            )
    elif files.samples.exists() or files.rejects.exists():
        raise SettingsMismatch(
            f"{files.samples} exists without {files.settings.name}: it was not written by "
            "this tool (or the sidecar was removed), so its settings are unknown; write to a "
            "new --output"
        )


def record_settings(files: OutputFiles, settings: GenerationSettings) -> None:
    """Write the sidecar of a new output (after `check_settings` passed)."""
    if not files.settings.exists():
        files.samples.parent.mkdir(parents=True, exist_ok=True)
        write_text_durably(files.settings, json.dumps(asdict(settings), indent=2) + "\n")
