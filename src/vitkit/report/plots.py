"""Figures from plain data, written atomically as PNG. matplotlib is imported on first use (Agg)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vitkit.io import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_confusion_matrix(
    cm: list[list[int]], classes: list[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Row-normalised confusion matrix as a PNG (counts printed when the matrix is small)."""
    plt = pyplot()
    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), [str(c)[:12] for c in classes], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [str(c)[:12] for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        int(m[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
