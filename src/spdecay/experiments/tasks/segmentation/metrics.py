"""Segmentation metrics of one split, from the confusion matrix over all its labelled pixels.

* ``miou`` (the headline): per class, IoU = TP / (TP + FP + FN) over the whole split (not per
  image), averaged over the classes that occur in the labels or the predictions (a class absent
  from both has no IoU);
* ``accuracy``: pixel accuracy, the fraction of labelled pixels predicted right;
* ``balanced_accuracy``: the mean over the classes present in the labels of their pixel recall
  (segmentation's "mean accuracy", mAcc);
* ``class_iou``: the IoU of every class (None where it is undefined).

Pixels labelled ``ignore_index`` count nowhere.
"""

from __future__ import annotations

import torch
from torch import Tensor


def confusion(pred: Tensor, labels: Tensor, n_classes: int, ignore_index: int | None = None) -> Tensor:
    """n_classes x n_classes int64 counts: row = true class, column = predicted class."""
    labels = labels.reshape(-1).long().cpu()
    pred = pred.reshape(-1).long().cpu()
    keep = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    labels, pred = labels[keep], pred[keep]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels outside 0..{n_classes - 1} (and not the ignore index {ignore_index})")
    return torch.bincount(labels * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_metrics(pred: Tensor, labels: Tensor, n_classes: int, ignore_index: int | None = None) -> dict:
    """``miou``, ``accuracy`` (pixel), ``balanced_accuracy`` (mean class pixel recall) and
    ``class_iou`` of predicted class maps ``pred`` against ``labels`` (same shape)."""
    cm = confusion(pred, labels, n_classes, ignore_index).double()
    tp = cm.diag()
    support = cm.sum(1)  # true pixels per class
    predicted = cm.sum(0)
    union = support + predicted - tp
    defined = union > 0
    iou = torch.where(defined, tp / union.clamp(min=1), torch.zeros_like(tp))
    present = support > 0
    total = float(support.sum())
    return {
        "miou": float(iou[defined].mean()) if bool(defined.any()) else float("nan"),
        "accuracy": float(tp.sum()) / total if total else float("nan"),
        "balanced_accuracy": float((tp[present] / support[present]).mean()) if bool(present.any()) else float("nan"),
        "class_iou": [float(v) if d else None for v, d in zip(iou.tolist(), defined.tolist())],
    }
