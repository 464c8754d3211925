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


def label_colors(n: int) -> np.ndarray:
    """(n, 3) float RGB colours for class indices: 0 (background) black, then tab20's colours."""
    plt = pyplot()
    cmap = plt.get_cmap("tab20")
    colors = np.array([cmap(i % 20)[:3] for i in range(max(n - 1, 0))]).reshape(-1, 3)
    return np.concatenate([np.zeros((1, 3)), colors])


def save_mask_overlays(
    images: np.ndarray,
    truths: np.ndarray,
    predictions: np.ndarray,
    classes: list[str],
    path: str | os.PathLike,
    *,
    pair: bool = False,
    title: str = "",
    ignore_index: int = 255,
) -> None:
    """A grid, one row per sample: the image (both dates for ``pair`` data), the true mask and the
    predicted mask coloured by class over the image. ``images``: (n, C or 2C, H, W) uint8;
    ``truths``/``predictions``: (n, h, w) class indices (ignored pixels in grey)."""
    plt = pyplot()
    colors = label_colors(len(classes))
    n = len(images)
    heads = ["first date", "second date"] if pair else ["image"]
    heads += ["truth", "prediction"]
    fig, axes = plt.subplots(
        max(n, 1), len(heads), figsize=(2.1 * len(heads), 2.1 * max(n, 1) + 0.6), squeeze=False
    )

    def rgb(img: np.ndarray) -> np.ndarray:
        x = img.astype(np.float32) / 255.0
        return np.repeat(x, 3, 0).transpose(1, 2, 0) if x.shape[0] == 1 else x[:3].transpose(1, 2, 0)

    def paint(base: np.ndarray, mask: np.ndarray) -> np.ndarray:
        h, w = mask.shape
        if base.shape[:2] != (h, w):  # nearest resample of the image to the mask's grid
            ys = (np.arange(h) * base.shape[0] / h).astype(int)
            xs = (np.arange(w) * base.shape[1] / w).astype(int)
            base = base[ys][:, xs]
        col = colors[np.clip(mask, 0, len(colors) - 1)]
        col[mask == ignore_index] = 0.5
        fg = (mask != 0)[..., None]
        return np.where(fg, 0.35 * base + 0.65 * col, base)

    for i in range(n):
        c = images[i].shape[0] // 2 if pair else images[i].shape[0]
        dates = [rgb(images[i][:c]), rgb(images[i][c:])] if pair else [rgb(images[i])]
        panels = [*dates, paint(dates[-1], truths[i]), paint(dates[-1], predictions[i])]
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(np.clip(panel, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=9)
    shown = sorted(set(np.unique(truths).tolist()) | set(np.unique(predictions).tolist()))
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in shown if 0 < k < len(classes)]
    labels = [str(classes[k])[:14] for k in shown if 0 < k < len(classes)]
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_box_overlays(
    images: np.ndarray,
    truths: list[tuple[np.ndarray, np.ndarray]],
    predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    classes: list[str],
    path: str | os.PathLike,
    *,
    min_score: float = 0.3,
    title: str = "",
) -> None:
    """One row per sample: the image with its true boxes, and with the predicted boxes scoring at
    least ``min_score`` (class and score written on each). ``images``: (n, C, H, W) uint8;
    ``truths``: per sample (boxes (k, 4) xyxy pixels, labels (k,)); ``predictions``: per sample
    (boxes, labels, scores)."""
    plt = pyplot()
    colors = label_colors(len(classes) + 1)[1:]  # label_colors' 0 is the background grey
    n = len(images)
    fig, axes = plt.subplots(max(n, 1), 2, figsize=(4.6, 2.3 * max(n, 1) + 0.4), squeeze=False)
    for i in range(n):
        x = images[i].astype(np.float32) / 255.0
        img = np.repeat(x, 3, 0).transpose(1, 2, 0) if x.shape[0] == 1 else x[:3].transpose(1, 2, 0)
        sets = [(truths[i][0], truths[i][1], None), predictions[i]]
        for j, (boxes, labels, scores) in enumerate(sets):
            ax = axes[i, j]
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            for k, (b, lab) in enumerate(zip(boxes, labels)):
                if scores is not None and scores[k] < min_score:
                    continue
                c = colors[int(lab) % len(colors)]
                ax.add_patch(
                    plt.Rectangle(
                        (b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, color=c, lw=1.2
                    )
                )
                text = str(classes[int(lab)])[:10] + ("" if scores is None else f" {scores[k]:.2f}")
                ax.text(b[0] - 0.5, b[1] - 1, text, color=c, fontsize=6, va="bottom")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("truth" if j == 0 else f"prediction (score >= {min_score:g})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
