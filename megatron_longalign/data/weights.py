"""Per-token loss weights, computed from the global batch plan.

The trainer's loss is `sum(loss_weights * token_nll)` over everything a rank sees, and
gradients are summed (not averaged) over data-parallel ranks, so the applied gradient is
that of the sum over the whole global batch. With N_i = predicted target tokens of
sample i and M = samples of the global batch with N_i >= 1:

- token:    w = 1 / sum_j N_j                     (global token mean)
- sequence: w_i = 1 / (N_i * M)                   (LongAlign loss weighting: the mean
                                                   over sequences of per-sequence means)
- sqrt:     w_i = 1 / (sqrt(N_i) * sum_j sqrt(N_j))  (weights of sequence i sum to
                                                   sqrt(N_i)/sum_j sqrt(N_j); total 1)

Each is a function of the global batch only: the same for any data-parallel size,
micro-batch size, gradient accumulation, context or pipeline parallelism.
"""

from __future__ import annotations

import numpy as np

from megatron_longalign.config.data import LOSS_REDUCTIONS


def per_token_weights(target_counts: np.ndarray, reduction: str) -> np.ndarray:
    """float64 weight of each target token of each sample of ONE global batch (aligned
    with `target_counts`; 0 for samples without targets). The weights of all target
    tokens sum to 1 (or to 0 if the batch has no target at all)."""
    counts = np.asarray(target_counts, dtype=np.float64)
    has_targets = counts > 0
    weights = np.zeros_like(counts)
    if not has_targets.any():
        return weights
    if reduction == "token":
        weights[has_targets] = 1.0 / counts.sum()
    elif reduction == "sequence":
        weights[has_targets] = 1.0 / (counts[has_targets] * has_targets.sum())
    elif reduction == "sqrt":
        roots = np.sqrt(counts[has_targets])
        weights[has_targets] = 1.0 / (roots * roots.sum())
    else:
        raise ValueError(f"loss reduction {reduction!r}; choose one of {LOSS_REDUCTIONS}")
    return weights
