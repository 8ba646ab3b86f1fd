"""Accuracy and balanced accuracy of a model on a split (inference mode, large batches)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spdecay.experiments.data import Split
from spdecay.experiments.models import TaskModel


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


def predict(model: nn.Module, task_model: TaskModel, split: Split, batch_size: int) -> Tensor:
    was_training = model.training
    model.eval()
    order = task_model.eval_order(split)
    pred = torch.empty(len(split), dtype=torch.long)
    with torch.inference_mode():
        start = 0
        for inputs, _ in task_model.batches(split, batch_size, order):
            logits = task_model.logits(model, inputs)
            n = logits.shape[0]
            pred[order[start : start + n]] = logits.argmax(-1).cpu()
            start += n
    model.train(was_training)
    return pred


def evaluate(model: nn.Module, task_model: TaskModel, split: Split, n_classes: int, batch_size: int) -> dict[str, float]:
    return accuracy_metrics(predict(model, task_model, split, batch_size), split.labels, n_classes)
