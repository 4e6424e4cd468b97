"""The documents GATEAU scores for one preprocessed sample.

Terms (the regions of data/templates.py):
- response: the loss-mask tokens (every ASSISTANT region). Its perplexity is
  exp(mean NLL over the response tokens at positions t >= 1), never over the whole
  sequence (one of the public code's bugs).
- context: the CONTEXT regions (a user turn's text before its last blank line).
- segments: each CONTEXT region cut into pieces of `segment_tokens` real tokens, the
  last piece of a region possibly shorter. A segment never spans two regions, and no
  padding is ever scored.
- question: every token that is neither context nor response, i.e. the template
  scaffolding and special tokens, the system prompt and the user text. Keeping the
  template makes a short document look like a real prompt to the model.

Documents per sample:
- the full sample, for model B with the attention probe (queries: the response rows;
  keys: the segments), and for model A (left-truncated to `window_a` if set);
- for each segment j, the short document [segment j; question; response]: the sample
  with every context token outside segment j removed, everything else in its original
  order (so multi-turn samples keep all their turns).

A sample with no CONTEXT region gets no segments (it has no CAM). A sample with no
predicted response token gets no documents at all (it cannot be scored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_longalign.data.encoding import loss_mask_from_regions
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.gateau.engine_api import ScoringDocument


@dataclass(frozen=True)
class DocumentConfig:
    segment_tokens: int = 128
    # Model A's window: None = A sees the whole sample (the default); else its input is
    # left-truncated to this many tokens, the response always kept (as the original does).
    window_a: int | None = None

    def validate(self) -> None:
        if self.segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1, got {self.segment_tokens}")
        if self.window_a is not None and self.window_a < 2:
            raise ValueError(f"window_a must be None or >= 2 tokens, got {self.window_a}")


@dataclass
class SampleDocuments:
    """The documents of one sample. Keys are local (0 = B's full document, 1 = A's,
    2 + j = segment j's short document); `runner` renumbers them per engine call."""

    index: int
    length: int
    segments: list[tuple[int, int]] = field(default_factory=list)  # token [start, end)
    full_b: ScoringDocument | None = None
    full_a: ScoringDocument | None = None
    segment_docs: list[ScoringDocument] = field(default_factory=list)

    @property
    def scorable(self) -> bool:
        return self.full_b is not None

    @property
    def has_context(self) -> bool:
        return bool(self.segments)


def token_kinds(regions: np.ndarray, length: int) -> np.ndarray:
    """RegionKind per token (int8); tokens no region covers count as TEMPLATE."""
    kinds = np.full(length, int(RegionKind.TEMPLATE), dtype=np.int8)
    for start, end, kind in np.asarray(regions).reshape(-1, 3).tolist():
        kinds[start:end] = kind
    return kinds


def context_segments(regions: np.ndarray, segment_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of every segment: each CONTEXT region cut every `segment_tokens`."""
    segments = []
    for start, end, kind in np.asarray(regions).reshape(-1, 3).tolist():
        if kind == RegionKind.CONTEXT:
            segments += [
                (s, min(s + segment_tokens, end)) for s in range(start, end, segment_tokens)
            ]
    return segments


def predicted_targets(loss_mask: np.ndarray) -> int:
    """Response tokens that have something before them to be predicted from."""
    return int(loss_mask[1:].sum())


def left_truncate(tokens: np.ndarray, loss_mask: np.ndarray, window: int | None) -> int:
    """How many leading tokens model A drops: enough to fit `window`, but never a
    response token (if the response alone is longer than the window, A gets the whole
    response and no prompt: the window is exceeded rather than the response cut)."""
    if window is None or tokens.size <= window:
        return 0
    first_response = int(np.argmax(loss_mask)) if loss_mask.any() else tokens.size
    return min(tokens.size - window, first_response)


def sample_documents(
    index: int, tokens: np.ndarray, regions: np.ndarray, config: DocumentConfig
) -> SampleDocuments:
    """The documents of sample `index` (see the module docstring)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    regions = np.asarray(regions).reshape(-1, 3)
    if regions.shape[0] == 0:
        raise ValueError(
            f"sample {index} has no regions: GATEAU needs the context/question/response "
            "regions tools/preprocess.py writes; re-preprocess the data"
        )
    loss_mask = loss_mask_from_regions(regions, tokens.size)
    out = SampleDocuments(index=index, length=int(tokens.size))
    if predicted_targets(loss_mask) == 0:
        return out
    segments = context_segments(regions, config.segment_tokens)
    out.segments = segments
    probe_segments = np.full(tokens.size, -1, dtype=np.int32)
    for j, (start, end) in enumerate(segments):
        probe_segments[start:end] = j
    out.full_b = ScoringDocument(
        key=0,
        tokens=tokens,
        loss_mask=loss_mask,
        probe_query_mask=loss_mask.copy() if segments else None,
        probe_segments=probe_segments if segments else None,
        num_segments=len(segments),
    )
    drop = left_truncate(tokens, loss_mask, config.window_a)
    out.full_a = ScoringDocument(key=1, tokens=tokens[drop:], loss_mask=loss_mask[drop:])
    kinds = token_kinds(regions, tokens.size)
    prompt = kinds != RegionKind.CONTEXT
    for j, (start, end) in enumerate(segments):
        keep = prompt.copy()
        keep[start:end] = True
        out.segment_docs.append(
            ScoringDocument(key=2 + j, tokens=tokens[keep], loss_mask=loss_mask[keep])
        )
    return out
