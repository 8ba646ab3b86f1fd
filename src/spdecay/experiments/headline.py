"""A task's headline metric: the number selection, paired differences, tables and plots use.

Every split of a record holds a dict of metrics (``record["val"]``, ``record["test"]``,
``record["ood"][name]``). A task declares which of them is the headline (``Task.headline``, a
``Headline`` of the task registry); classification tasks use balanced accuracy, the segmentation
task mIoU. Reporting code reads the headline from here instead of naming a metric, so no report
or selection code branches on the task.
"""

from __future__ import annotations

from spdecay.experiments.errors import RunnerError
from spdecay.experiments.tasks.registry import BALANCED_ACCURACY, Headline, get_task


def headline_of_task(task: str | None) -> Headline:
    """The headline of the registered task ``task`` (balanced accuracy for an unknown name)."""
    if task is None:
        return BALANCED_ACCURACY
    try:
        return get_task(task).headline
    except RunnerError:
        return BALANCED_ACCURACY


def headline_for(records: list[dict]) -> Headline:
    """The headline of the task that made ``records`` (every record names its task)."""
    for r in records:
        if r.get("task"):
            return headline_of_task(r["task"])
    return BALANCED_ACCURACY
