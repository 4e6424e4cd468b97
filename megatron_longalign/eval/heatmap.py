"""The needle-in-a-haystack heatmap: context length (tokens) across, needle depth (%) down,
colour = score, with a labelled colour bar. Cells without a score (an unparsed judge
reply, a case not run) are grey and marked "n/a"; every cell carries its value."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def format_length(tokens: int) -> str:
    """1000 -> "1k", 64000 -> "64k", 1500 -> "1.5k", 700 -> "700"."""
    if tokens >= 1000 and tokens % 100 == 0:
        return f"{tokens / 1000:g}k"
    return str(tokens)


def write_heatmap(
    path: str | Path,
    lengths: Sequence[int],
    depths: Sequence[float],
    scores: np.ndarray,
    *,
    title: str,
    score_label: str,
    score_range: tuple[float, float],
) -> Path:
    """Save the heatmap of `scores[depth_index, length_index]` (NaN: no score) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in tests
    import matplotlib.pyplot as plt

    scores = np.asarray(scores, dtype=float)
    if scores.shape != (len(depths), len(lengths)):
        raise ValueError(
            f"scores have shape {scores.shape}, expected {(len(depths), len(lengths))}"
        )
    low, high = score_range
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d9d9d9")
    width = max(6.0, 0.9 * len(lengths) + 3.0)
    height = max(4.0, 0.5 * len(depths) + 2.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    image = ax.imshow(
        np.ma.masked_invalid(scores), cmap=cmap, vmin=low, vmax=high, aspect="auto",
        interpolation="nearest",
    )  # fmt: skip
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(score_label)
    ax.set_xticks(range(len(lengths)), [format_length(int(x)) for x in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (% of the context)")
    ax.set_title(title)
    _annotate(ax, scores, low, high)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _annotate(ax, scores: np.ndarray, low: float, high: float) -> None:
    """The value in each cell, dark on the light middle of the colour map."""
    for row, col in np.ndindex(scores.shape):
        value = scores[row, col]
        if np.isnan(value):
            text, colour = "n/a", "#555555"
        else:
            text = f"{value:.2g}" if high <= 1 else f"{value:.1f}"
            middle = abs((value - low) / (high - low) - 0.5) < 0.3 if high > low else True
            colour = "black" if middle else "white"
        ax.text(col, row, text, ha="center", va="center", fontsize=8, color=colour)
