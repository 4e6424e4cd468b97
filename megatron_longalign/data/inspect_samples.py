"""`--inspect K`: show how samples are rendered and which tokens are trained on."""

from __future__ import annotations

import sys
from typing import TextIO

import numpy as np

from megatron_longalign.data.jsonl_reader import expand_inputs, read_chunks
from megatron_longalign.data.preprocess import Dropped, Rejected, Written
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.data.tokenizer import TextTokenizer

_ANSI_TARGET, _ANSI_CONTEXT, _ANSI_RESET = "\x1b[42;30m", "\x1b[2m", "\x1b[0m"
_PLAIN_OPEN, _PLAIN_CLOSE = "⟦", "⟧"


def _elide(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} …[{len(text) - 2 * half} chars]… {text[-half:]}"


def format_sample(
    tokens: np.ndarray,
    regions: np.ndarray,
    tokenizer: TextTokenizer,
    color: bool,
    max_chars: int | None = None,
) -> str:
    """The decoded sample with target (loss-masked-in) spans marked:
    ⟦…⟧ in plain text, a green background on a terminal."""
    parts = []
    for start, end, kind in regions.tolist():
        text = _elide(tokenizer.decode(tokens[start:end].tolist()), max_chars)
        if kind == RegionKind.ASSISTANT:
            text = (
                f"{_ANSI_TARGET}{text}{_ANSI_RESET}" if color else _PLAIN_OPEN + text + _PLAIN_CLOSE
            )
        elif kind == RegionKind.CONTEXT and color:
            text = f"{_ANSI_CONTEXT}{text}{_ANSI_RESET}"
        parts.append(text)
    return "".join(parts)


def _region_summary(regions: np.ndarray) -> str:
    sizes: dict[str, int] = {}
    for start, end, kind in regions.tolist():
        name = RegionKind(kind).name.lower()
        sizes[name] = sizes.get(name, 0) + end - start
    return ", ".join(f"{name} {n}" for name, n in sizes.items())


def inspect_samples(
    inputs: list[str],
    processor,
    count: int,
    max_chars: int | None = None,
    color: bool | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print the first `count` samples (and any rejected lines before them); returns the
    number of samples shown."""
    color = out.isatty() if color is None else color
    files = expand_inputs(inputs)
    shown = 0
    for chunk in read_chunks(files):
        path = files[chunk.file_index]
        for lineno, raw in chunk.lines:
            outcome = processor.process_line(lineno, raw)
            if isinstance(outcome, Rejected):
                out.write(f"── {path}:{lineno}: rejected [{outcome.reason}]: {outcome.message}\n")
            elif isinstance(outcome, Dropped):
                out.write(
                    f"── {path}:{lineno}: dropped [{outcome.reason}]: {outcome.num_tokens} tokens\n"
                )
            elif isinstance(outcome, Written):
                tokens, regions = outcome.tokens, outcome.regions
                note = " (truncated)" if outcome.truncated else ""
                out.write(
                    f"── sample {shown + 1}: {path}:{lineno}: {tokens.size} tokens{note}, "
                    f"{outcome.num_targets} target tokens ⟦marked⟧; "
                    f"by region: {_region_summary(regions)}\n"
                )
                text = format_sample(tokens, regions, processor.encoder.tokenizer, color, max_chars)
                out.write(text + "\n\n")
                shown += 1
                if shown >= count:
                    return shown
    return shown
