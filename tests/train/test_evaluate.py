"""Evaluation metrics against independent implementations (scikit-learn, hand computation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from vitkit.train import classification_metrics, expected_calibration_error, multilabel_metrics


@pytest.fixture
def scored():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (300,), generator=g)
    logits = torch.randn(300, 6, generator=g) * 2
    logits[torch.arange(300), y] += 1.5  # better than chance, not perfect
    return logits, y


def test_single_label_metrics_match_sklearn(scored):
    logits, y = scored
    m = classification_metrics(logits, y, class_counts=[500, 300, 120, 60, 19, 5])
    pred = logits.argmax(1).numpy()
    assert m["top1"] == pytest.approx((pred == y.numpy()).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y.numpy(), pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y.numpy(), pred, average="macro"))
    top5 = logits.topk(5, 1).indices
    assert m["top5"] == pytest.approx((top5 == y[:, None]).any(1).float().mean().item())
    assert (
        np.sum(m["confusion_matrix"]) == 300 and np.trace(m["confusion_matrix"]) == (pred == y.numpy()).sum()
    )
    assert m["shot_classes"] == {"many": [0, 1, 2], "medium": [3], "few": [4, 5]}
    few = np.isin(y.numpy(), [4, 5])
    assert m["few_shot_accuracy"] == pytest.approx((pred[few] == y.numpy()[few]).mean())


def test_ece_by_hand():
    # Two confident-correct and two half-confident-wrong predictions.
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]))
    y = torch.tensor([0, 0, 1, 1])
    # bins: conf 0.9 (acc 1) gap 0.1 weight 0.5; conf 0.6 (acc 0) gap 0.6 weight 0.5 → 0.35
    assert expected_calibration_error(logits, y, bins=10) == pytest.approx(0.35, abs=1e-6)


def test_multilabel_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(200, 4, generator=g) < 0.4).float()
    logits = torch.randn(200, 4, generator=g) + 2 * (y - 0.5)
    m = multilabel_metrics(logits, y)
    s = logits.sigmoid().numpy()
    auc = [roc_auc_score(y[:, c].numpy(), s[:, c]) for c in range(4)]
    ap = [average_precision_score(y[:, c].numpy(), s[:, c]) for c in range(4)]
    assert m["mean_auroc"] == pytest.approx(np.mean(auc)) and m["mAP"] == pytest.approx(np.mean(ap))
    y[:, 3] = 0  # a class with no positives is skipped, not counted as 0.5
    m2 = multilabel_metrics(logits, y)
    assert m2["per_class_auroc"][3] is None and m2["mean_auroc"] == pytest.approx(np.mean(auc[:3]))
