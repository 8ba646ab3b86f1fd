"""A model's metrics on every split of a task (the task model's ``metrics``, AUROC for a binary
task; the functions are in ``spdecay.experiments.metrics``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from spdecay.experiments.data import Split, TaskData
from spdecay.experiments.metrics import auroc

if TYPE_CHECKING:
    from spdecay.experiments.models import TaskModel


def evaluate(model: nn.Module, task_model: TaskModel, split: Split, n_classes: int, batch_size: int,
             keep: dict | None = None, key: str = "") -> dict[str, float]:
    """The split's metrics (AUROC too for a binary task); ``keep[key]`` receives the split's
    class scores where the model gives them (the per-example predictions)."""
    scores = task_model.scores(model, split, batch_size)
    if scores is None:
        return task_model.metrics(task_model.predict(model, split, batch_size), split.labels, n_classes)
    out = task_model.metrics(scores.argmax(-1), split.labels, n_classes)
    if n_classes == 2 and (value := auroc(scores, split.labels)) is not None:
        out["auroc"] = value
    if keep is not None:
        keep[key] = scores
    return out


def ood_means(record: dict) -> None:
    """``ood_mean_<metric>`` over the record's OOD sets for every number every OOD set has
    (``ood_mean_accuracy``, ``ood_mean_balanced_accuracy``; segmentation: ``ood_mean_miou``, ...)."""
    if record["ood"]:
        sets = list(record["ood"].values())
        for metric, value in sets[0].items():
            if isinstance(value, (int, float)) and all(isinstance(m.get(metric), (int, float)) for m in sets):
                record[f"ood_mean_{metric}"] = sum(m[metric] for m in sets) / len(sets)


def evaluate_all(model: nn.Module, data: TaskData, task_model: TaskModel, batch_size: int) -> dict:
    """``val``, ``test`` and every OOD set's metrics, and their OOD means; the per-example
    class scores ride along under ``"_predictions"`` (the runner stores them next to the record,
    see ``training/predictions.py``)."""
    from spdecay.experiments.training.predictions import attach

    n = len(data.classes)
    kept: dict = {}
    record = {
        "val": evaluate(model, task_model, data.val, n, batch_size, kept, "val"),
        "test": evaluate(model, task_model, data.test, n, batch_size, kept, "test"),
        "ood": {name: evaluate(model, task_model, split, n, batch_size, kept, f"ood.{name}")
                for name, split in data.ood.items()},
    }
    ood_means(record)
    attach(record, kept, data)
    return record
