"""Re-estimate BatchNorm running statistics of a model before it is evaluated.

A fine-tuned BatchNorm network is evaluated with running statistics, which lag its weights: with
the TF-style momentum many image checkpoints use (EfficientNet-Lite0: 0.01), 120 steps leave
30% of the ImageNet statistics in place, and a WiSE-FT model (weights interpolated) has no
matching statistics at all. Both then score near chance for reasons unrelated to the optimizer.
The runner therefore recomputes the statistics of every evaluated model from its own weights on
the ID training set (the cumulative average over batches, as ``torch.optim.swa_utils.update_bn``),
the same way for every method. Models without BatchNorm are untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from spdecay.experiments.data import Split
from spdecay.experiments.models import TaskModel


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_batch_norm(model: nn.Module, task_model: TaskModel, split: Split, batch_size: int) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers on ``split``; returns
    the number of layers. Only the BatchNorm layers run in training mode (dropout stays off, so
    the result is deterministic and no random state is used); weights do not change."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts equally
        m.train()
    try:
        for inputs, _ in task_model.batches(split, batch_size):
            task_model.logits(model, inputs)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return len(layers)
