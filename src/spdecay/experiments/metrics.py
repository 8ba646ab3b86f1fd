"""Classification metrics from predictions and class scores: accuracy, balanced accuracy and
AUROC (pure functions; the task model, the evaluation and the reference rows use them)."""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy_metrics(pred: Tensor, labels: Tensor, n_classes: int) -> dict[str, float]:
    """Accuracy, and balanced accuracy: the mean recall over the classes present in ``labels``
    (what a majority-class guess scores 1 / n_present on, however imbalanced the set)."""
    pred, labels = pred.cpu(), labels.cpu()
    correct = (pred == labels).double()
    support = torch.bincount(labels, minlength=n_classes).double()
    hits = torch.bincount(labels, weights=correct, minlength=n_classes)
    present = support > 0
    return {
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float((hits[present] / support[present]).mean()),
    }


def auroc(scores: Tensor, labels: Tensor) -> float | None:
    """AUROC of a binary task from its (N, 2) class scores (the positive class's margin;
    sklearn's ``roc_auc_score``); None unless both classes are present."""
    labels = labels.cpu()
    if scores.ndim != 2 or scores.shape[-1] != 2 or len(torch.unique(labels)) != 2:
        return None
    from sklearn.metrics import roc_auc_score

    margin = (scores[:, 1] - scores[:, 0]).double().cpu()
    return float(roc_auc_score(labels.numpy(), margin.numpy()))
