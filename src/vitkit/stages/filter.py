"""``vitkit filter``: DataComp's baseline filters over an image-text pool — Gadre et al.,
"DataComp: In search of the next generation of multimodal datasets" (NeurIPS 2023 Datasets and
Benchmarks), section 3.4 / appendix: the training recipe stays fixed and only the data changes.

Filters (``by``; ``a+b`` keeps the intersection, as DataComp's "image-based ∩ CLIP score"):

- ``none``: every pair (the no-filtering baseline).
- ``clip-score``: the cosine similarity of each pair's image and caption embeddings from a scorer
  (an image-text run: DataComp uses OpenAI's CLIP ViT-L/14; no such weights exist offline here, so the
  scorer is a vitkit image-text run, e.g. one trained on the unfiltered pool), keep the top ``top``
  fraction.
- ``text``: captions that name a class of the target dataset (DataComp's text-based filter keeps
  captions containing an ImageNet-21k synset name; here the target's class names, whole words,
  case-insensitive, each alternative of a name such as "T-shirt/top" counting).
- ``image-cluster``: DataComp's image-based filter: k-means over the pool's image embeddings (the
  scorer's image tower; DataComp: 100k clusters of CLIP L/14 embeddings with faiss, here
  scikit-learn's KMeans and ``clusters`` centres), then each image of the target's training split
  picks its nearest centre, and the pool's pairs in a picked cluster are kept.

Rows whose image does not decode or whose caption is empty cannot be scored and are left out (and
counted). The output CSV keeps the pool's columns, with image paths rewritten relative to it; a
``.json`` report beside it records the filter, the counts and, when the pool has a ``noise``
column (the generated pool, ``vitkit make-pool``), the noise mix before and after.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.errors import VitkitError

FILTERS = ("none", "clip-score", "text", "image-cluster")
NEEDS_SCORER = ("clip-score", "image-cluster")


def parse_filters(by: str) -> list[str]:
    names = [b.strip() for b in by.split("+") if b.strip()]
    bad = [n for n in names if n not in FILTERS]
    if not names or bad:
        raise VitkitError(f"--by '{by}': expected one of {', '.join(FILTERS)}, or several joined by +")
    return names


def class_terms(classes: list[str]) -> list[re.Pattern]:
    """Whole-word patterns for each class name and each of its alternatives (``T-shirt/top``)."""
    from vitkit.data.imagetext import readable_class_name

    pats = []
    for c in classes:
        for alt in readable_class_name(c).split(" or "):
            alt = alt.strip()
            if alt:
                pats.append(re.compile(r"(?<![\w-])" + re.escape(alt) + r"(?![\w-])"))
    return pats


def text_filter(captions: list[str], classes: list[str]) -> np.ndarray:
    pats = class_terms(classes)
    return np.array([any(p.search(c.lower()) for p in pats) for c in captions], dtype=bool)


@torch.no_grad()
def pair_scores(model, images: torch.Tensor, captions: list[str], batch_size: int = 256) -> np.ndarray:
    """CLIP score: cosine similarity of each pair's image and caption embeddings."""
    from vitkit.data.imagetext import pairs_dataset
    from vitkit.tasks.imagetext import ImageTextTask

    task = ImageTextTask(ImageTextTask.Options(embed_dim=model.embed_dim))
    out = task.predict(model, pairs_dataset(images, captions, "pool"), batch_size=batch_size)
    e = out.shape[1] // 2
    return (out[:, :e] * out[:, e:]).sum(1).numpy()


def image_cluster_filter(
    pool_emb: np.ndarray, target_emb: np.ndarray, clusters: int, seed: int
) -> tuple[np.ndarray, int]:
    """Pool rows whose k-means cluster is the nearest centre of some target embedding, and how many
    clusters the target picked."""
    from sklearn.cluster import KMeans

    k = min(clusters, len(pool_emb))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(pool_emb)
    picked = np.unique(km.predict(target_emb))
    return np.isin(km.labels_, picked), len(picked)


def _read_pool(
    pool: Path, img_size: int | None
) -> tuple[list[str], list[dict], torch.Tensor | None, list[int]]:
    """Header, rows, images (when ``img_size``) and the indices of the usable rows."""
    from vitkit.data.imagetext import CAPTION_COLUMNS
    from vitkit.data.sources import _PATH_COLUMNS, _read_csv_rows, _read_images, _stack

    source = f"pool {pool}"
    if not pool.is_file():
        raise VitkitError(f"{source}: file does not exist (expected a CSV of image paths and captions)")
    columns, numbered = _read_csv_rows(pool, source)
    lower = {c.lower().strip(): c for c in columns}
    path_col = next((lower[c] for c in _PATH_COLUMNS if c in lower), None)
    text_col = next((lower[c] for c in CAPTION_COLUMNS if c in lower), None)
    if path_col is None or text_col is None:
        raise VitkitError(f"{source}: needs an image path column and a caption column; found {columns}")
    rows = [r for _, r in numbered]
    usable = [
        i for i, r in enumerate(rows) if (r.get(text_col) or "").strip() and (r.get(path_col) or "").strip()
    ]
    images = None
    if img_size is not None:
        paths = [_abs(pool, rows[i][path_col]) for i in usable]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise VitkitError(f"{source}: image '{missing[0]}' not found ({len(missing)} missing)")
        arrays, _ = _read_images(paths, img_size, False, source)
        ok = [j for j, a in enumerate(arrays) if a is not None]
        usable = [usable[j] for j in ok]
        images = _stack([arrays[j] for j in ok], source) if ok else None
    return columns, rows, images, usable


def _abs(pool: Path, name: str) -> Path:
    name = name.strip()
    return Path(name) if os.path.isabs(name) else pool.parent / name


def filter_pool(
    pool: str | os.PathLike,
    output: str | os.PathLike,
    by: str = "clip-score",
    *,
    top: float = 0.3,
    scorer: str | os.PathLike | None = None,
    target: str | None = None,
    clusters: int = 50,
    target_size: int = 5000,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Filter ``pool`` into the CSV ``output``; returns (and writes beside it, as ``.json``) the
    report."""
    from vitkit.data import load_eval_data, load_splits
    from vitkit.data.imagetext import CAPTION_COLUMNS
    from vitkit.io import atomic_path, write_json

    filters = parse_filters(by)
    if not 0.0 < top <= 1.0:
        raise VitkitError(f"--top {top}: expected a fraction in (0, 1]")
    if any(f in NEEDS_SCORER for f in filters) and scorer is None:
        raise VitkitError(f"--by {by}: clip-score and image-cluster need --scorer (an image-text run)")
    if any(f in ("text", "image-cluster") for f in filters) and target is None:
        raise VitkitError(f"--by {by}: text and image-cluster need --target (a labelled dataset URI)")
    pool = Path(pool)
    model = None
    img_size = None
    if scorer is not None:
        from vitkit.models import model_input_size
        from vitkit.models.imagetext import ImageTextModel
        from vitkit.runs import Run

        model = Run.open(scorer).model("cpu")
        if not isinstance(model, ImageTextModel):
            raise VitkitError(f"--scorer {scorer}: not an image-text run (vitkit train --task image-text)")
        img_size = model_input_size(model)[1]
    columns, rows, images, usable = _read_pool(pool, img_size if model is not None else None)
    lower = {c.lower().strip(): c for c in columns}
    text_col = next(lower[c] for c in CAPTION_COLUMNS if c in lower)
    captions = [" ".join(rows[i][text_col].split()) for i in usable]
    keep = np.ones(len(usable), dtype=bool)
    report: dict[str, Any] = {
        "pool": str(pool),
        "by": "+".join(filters),
        "rows": len(rows),
        "usable": len(usable),
    }
    for f in filters:
        if f == "none":
            continue
        if f == "text":
            classes = load_eval_data(target).classes
            mask = text_filter(captions, classes)
        elif f == "clip-score":
            scores = pair_scores(model, images, captions, batch_size)
            cut = np.quantile(scores, 1.0 - top) if top < 1.0 else -np.inf
            mask = scores >= cut
            report["clip_score_threshold"] = float(cut)
            report["clip_score_top"] = top
        else:  # image-cluster
            from vitkit.data.imagetext import pairs_dataset
            from vitkit.models.inference import predict

            pool_emb = predict(model, pairs_dataset(images, captions, "pool"), batch_size=batch_size).numpy()
            tgt = load_splits(target, img_size=img_size, seed=seed).train
            if len(tgt) > target_size:
                tgt = tgt.subset(
                    torch.randperm(len(tgt), generator=torch.Generator().manual_seed(seed))[:target_size]
                )
            target_emb = predict(model, tgt, batch_size=batch_size).numpy()
            mask, picked = image_cluster_filter(pool_emb, target_emb, clusters, seed)
            report["clusters"] = min(clusters, len(pool_emb))
            report["clusters_picked"] = picked
        report[f"kept_by_{f}"] = int(mask.sum())
        keep &= mask
    kept = [usable[i] for i in np.flatnonzero(keep)]
    report["kept"] = len(kept)
    report["kept_fraction"] = len(kept) / max(1, len(rows))
    if "noise" in lower:
        noise_col = lower["noise"]
        report["noise_before"] = dict(Counter(rows[i][noise_col] for i in usable))
        report["noise_after"] = dict(Counter(rows[i][noise_col] for i in kept))
    if not kept:
        raise VitkitError(f"--by {by}: no pair of {pool} passes; nothing written")
    out = Path(output)
    path_col = next(c for c in columns if c.lower().strip() in ("path", "image", "filename", "file"))
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for i in kept:
            r = dict(rows[i])
            r[path_col] = os.path.relpath(_abs(pool, r[path_col]).resolve(), out.resolve().parent)
            w.writerow(r)
    write_json(out.with_suffix(".json"), report)
    return report
