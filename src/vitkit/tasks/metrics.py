"""Metrics of the image-label tasks, from logits and targets.

Single-label: top-1/top-5, per-class and balanced accuracy, macro-F1, expected calibration error,
many/medium/few-shot accuracy (by training-set class counts), confusion matrix.
Multi-label: per-class and mean AUROC, per-class AP and mAP.
Grouped single-label data (a patient per image, an image per crop): group-level accuracy and
low-confidence flags (:func:`group_metrics`).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_counts: list[int] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    ece_bins: int = 15,
) -> dict:
    """Single-label metrics. ``class_counts`` are training-set counts, for many/medium/few-shot groups
    (many: > many_threshold samples, few: < few_threshold, medium: the rest)."""
    from sklearn.metrics import f1_score

    num_classes = logits.shape[1]
    y = targets.long()
    pred = logits.argmax(1)
    correct = (pred == y).float()
    out: dict = {"n": len(y), "top1": correct.mean().item() if len(y) else float("nan")}
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    out[f"top{k}"] = (topk == y[:, None]).any(1).float().mean().item()
    out["loss"] = F.cross_entropy(logits, y).item()

    per_class = []
    for c in range(num_classes):
        m = y == c
        per_class.append(correct[m].mean().item() if m.any() else float("nan"))
    out["per_class_accuracy"] = per_class
    present = [a for a in per_class if not np.isnan(a)]
    out["balanced_accuracy"] = float(np.mean(present)) if present else float("nan")
    out["macro_f1"] = float(
        f1_score(y.numpy(), pred.numpy(), labels=list(range(num_classes)), average="macro", zero_division=0)
    )
    out["ece"] = expected_calibration_error(logits, y, ece_bins)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    out["confusion_matrix"] = cm.tolist()

    if class_counts is not None:
        groups = {"many": [], "medium": [], "few": []}
        for c, n in enumerate(class_counts):
            g = "many" if n > many_threshold else "few" if n < few_threshold else "medium"
            groups[g].append(c)
        out["shot_thresholds"] = {"many_above": many_threshold, "few_below": few_threshold}
        out["shot_classes"] = groups
        for g, cls in groups.items():
            m = (
                torch.isin(y, torch.tensor(cls, dtype=torch.long))
                if cls
                else torch.zeros_like(y, dtype=torch.bool)
            )
            out[f"{g}_shot_accuracy"] = correct[m].mean().item() if m.any() else None
    return out


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    probs = logits.float().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (conf[m].mean() - correct[m].mean()).abs()
    return ece.item()


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-class AUROC and average precision; means over classes that have both labels present."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = logits.float().sigmoid().numpy()
    y = targets.numpy() > 0.5
    auroc, ap = [], []
    for c in range(y.shape[1]):
        if y[:, c].all() or not y[:, c].any():
            auroc.append(None)
            ap.append(None)
            continue
        auroc.append(float(roc_auc_score(y[:, c], scores[:, c])))
        ap.append(float(average_precision_score(y[:, c], scores[:, c])))
    valid_auc = [a for a in auroc if a is not None]
    valid_ap = [a for a in ap if a is not None]
    pred = scores > 0.5
    return {
        "n": len(y),
        "mean_auroc": float(np.mean(valid_auc)) if valid_auc else float("nan"),
        "mAP": float(np.mean(valid_ap)) if valid_ap else float("nan"),
        "per_class_auroc": auroc,
        "per_class_ap": ap,
        "label_accuracy": float((pred == y).mean()),
        "exact_match": float((pred == y).all(1).mean()),
        "loss": F.binary_cross_entropy_with_logits(logits.float(), targets.float()).item(),
    }


ANOMALY_THRESHOLD = 0.5


def group_metrics(
    logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, threshold: float = ANOMALY_THRESHOLD
) -> dict[str, Any]:
    """Group-level classification (a patient's images, an image's crops): each group's prediction is
    the argmax of its samples' mean class probabilities, its truth the most frequent true label
    (the lowest on a tie). Samples whose top probability is under ``threshold`` are flagged as
    anomalies (low confidence: for a person to look at); ``top1_confident`` is the sample accuracy
    without them."""
    probs = logits.float().softmax(1)
    conf, pred = probs.max(1)
    ids = groups.unique()
    right = 0
    for g in ids:
        m = groups == g
        truth = int(torch.mode(targets[m]).values)
        right += int(int(probs[m].mean(0).argmax()) == truth)
    anomaly = conf < threshold
    confident = ~anomaly
    return {
        "groups": len(ids),
        "group_top1": right / max(len(ids), 1),
        "anomaly_threshold": threshold,
        "anomalies": int(anomaly.sum()),
        "anomaly_fraction": float(anomaly.float().mean()) if len(conf) else 0.0,
        "top1_confident": float((pred[confident] == targets[confident]).float().mean())
        if confident.any()
        else None,
    }
