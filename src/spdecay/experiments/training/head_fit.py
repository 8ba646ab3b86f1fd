"""A new head trained alone on frozen pre-trained features: the linear probe's recipe
(``fit_head``), shared by the probe row (``references.py``) and LP-FT's first phase
(``probe_head_phase``, the method table's ``prepare`` hook of ``lpft``)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from spdecay.experiments.errors import RunnerError
from spdecay.experiments.training.schedule import epoch_order, lr_lambda

if TYPE_CHECKING:
    from spdecay.experiments.data import TaskData
    from spdecay.experiments.models import TaskModel

PROBE_EPOCHS = 50  # passes over the cached features (cheap: only a linear head trains)


def fit_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, lr: float, weight_decay: float,
             batch_size: int) -> tuple[int, float, int, int]:
    """The probe's recipe, shared by the probe row and LP-FT's first phase: ``PROBE_EPOCHS``
    passes over the cached features ``x`` with AdamW (``lr``, ``weight_decay``) and cosine decay,
    batches in the seed's order. Returns (steps, loss sum, correct, seen)."""
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = max(1, len(y) // batch_size)
    total = PROBE_EPOCHS * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, "cosine"))
    loss_sum, correct, seen = 0.0, 0, 0
    for step in range(total):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:
            perm = epoch_order(seed, epoch, len(y))
        index = perm[pos * batch_size : (pos + 1) * batch_size]
        logits = head(x[index])
        loss = F.cross_entropy(logits, y[index])
        loss.backward()
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += float(loss.detach())
        correct += int((logits.argmax(-1) == y[index]).sum())
        seen += len(index)
    return total, loss_sum, correct, seen


def probe_head_phase(model: nn.Module, task_model: TaskModel, data: TaskData, seed: int, batch_size: int,
                     eval_batch_size: int, *, lr: float, weight_decay: float) -> dict:
    """LP-FT's first phase: ``model``'s (seeded, fresh) head trained on the frozen pre-trained
    features exactly like the probe row (``PROBE_EPOCHS``, cosine; the method table passes the
    probe's ``PROBE_LR`` and the head decay ``HEAD_WEIGHT_DECAY``), in place; the fine-tuning
    phase then starts from it."""
    name = task_model.head_modules[0]
    heads = [m for n, m in model.named_modules() if n == name or n.endswith(f".{name}")]
    if len(task_model.head_modules) != 1 or not heads:
        raise RunnerError(f"LP-FT needs a single head module, found {task_model.head_modules}")
    head = heads[0]
    x = task_model.features(data.train, eval_batch_size).to(next(head.parameters()).device)
    y = data.train.labels.to(x.device)
    dtype = next(head.parameters()).dtype
    work = copy.deepcopy(head).float()
    total, loss_sum, correct, seen = fit_head(work, x, y, seed, lr, weight_decay, batch_size)
    with torch.no_grad():
        for p, q in zip(head.parameters(), work.parameters()):
            p.copy_(q.to(dtype))
    return {"lp_phase": {"steps": total, "lr": lr, "weight_decay": weight_decay,
                         "train_loss": loss_sum / max(1, total), "train_accuracy": correct / max(1, seen)}}
