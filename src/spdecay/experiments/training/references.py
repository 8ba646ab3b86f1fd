"""The reference rows built around the fine-tuning runs: the linear probe (frozen features, only
a new head trains), WiSE-FT (a finished AdamW model interpolated with the pre-trained weights,
the package's ``spdecay.interpolate``) and the untouched pre-trained model (zero-shot, for tasks
whose model can answer without training). LP-FT is a trained method (its hook is in the method
table).
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from spdecay.experiments.data import TaskData
from spdecay.experiments.metrics import accuracy_metrics, auroc
from spdecay.experiments.models import TaskModel
from spdecay.experiments.protocol import RunSpec
from spdecay.experiments.training.batch_norm import reestimate_batch_norm
from spdecay.experiments.training.deviation import no_deviation, parameter_deviation
from spdecay.experiments.training.evaluate import evaluate_all, ood_means
from spdecay.experiments.training.head_fit import fit_head
from spdecay.experiments.training.loop import diverged_record
from spdecay.experiments.training.predictions import attach

WISE_FT_ALPHA = 0.5


def wise_ft_record(model: nn.Module, spec: RunSpec, base_record: dict, data: TaskData, task_model: TaskModel,
                   eval_batch_size: int, alpha: float = WISE_FT_ALPHA) -> dict:
    """WiSE-FT of a finished AdamW model: its backbone interpolated with the pre-trained one
    (LoRA adapters merged first, so the interpolation is of the weights the network uses); the
    new head is AdamW's (it has no pre-trained value)."""
    from spdecay import interpolate

    if getattr(spec, "alpha", None) is not None:  # the powered presets sweep alpha (evaluation only)
        alpha = spec.alpha
    t0 = time.perf_counter()
    merged = _merged(model)
    pre = {k: v for k, v in task_model.base.state_dict().items() if not task_model.is_head(k)}
    merged.load_state_dict(interpolate(pre, merged.state_dict(), alpha, strict=False))
    # Interpolated weights have no matching BatchNorm statistics (neither model's are right).
    n_norm = reestimate_batch_norm(merged, task_model, data.train, eval_batch_size)
    record = evaluate_all(merged, data, task_model, eval_batch_size)
    record["batch_norm_reestimated"] = n_norm
    start = {n: p.detach().to(task_model.device) for n, p in task_model.base.named_parameters()
             if p.requires_grad and not task_model.is_head(n)}
    record.update(parameter_deviation(merged, start))
    record.update(
        run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams, spd=None,
        steps=base_record["steps"], batch_size=base_record["batch_size"], alpha=alpha,
        train_loss=base_record["train_loss"], train_accuracy=base_record["train_accuracy"],
        wall_time_s=time.perf_counter() - t0,
    )
    return record


def _merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with LoRA adapters merged into the base weights (same architecture
    and parameter names as the pre-trained model)."""
    copy_ = copy.deepcopy(model)
    if hasattr(copy_, "merge_and_unload"):
        return copy_.merge_and_unload()
    encoder = getattr(copy_, "encoder", None)
    if encoder is not None and hasattr(encoder, "merge_and_unload"):
        copy_.encoder = encoder.merge_and_unload()
    return copy_


def train_probe(spec: RunSpec, data: TaskData, task_model: TaskModel, *, batch_size: int, eval_batch_size: int) -> dict:
    """The linear probe: the pre-trained model's head inputs are computed once; only a fresh
    (seeded) head trains on them, with AdamW (decay ``spec.weight_decay``) and cosine decay."""
    t0 = time.perf_counter()
    n = len(data.classes)
    feats = {name: task_model.features(split, eval_batch_size)
             for name, split in (("train", data.train), ("val", data.val), ("test", data.test), *data.ood.items())}
    torch.manual_seed(spec.seed)
    head = copy.deepcopy(task_model.base.get_submodule(task_model.head_modules[0]))
    for module in head.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    head = head.float()
    total, loss_sum, correct, seen = fit_head(head, feats["train"], data.train.labels, spec.seed, spec.lr,
                                              spec.weight_decay, batch_size)
    if not math.isfinite(loss_sum):  # the head diverged (e.g. --lr inf): no chance-level row
        return diverged_record(spec, data, total, loss_sum, total, batch_size)
    head.eval()
    kept: dict = {}
    with torch.no_grad():
        def metrics(name: str, split) -> dict:
            scores = head(feats[name]).float()
            kept["val" if name == "val" else "test" if name == "test" else f"ood.{name}"] = scores
            out = accuracy_metrics(scores.argmax(-1), split.labels, n)
            if n == 2 and (value := auroc(scores, split.labels)) is not None:
                out["auroc"] = value
            return out

        record = {"val": metrics("val", data.val), "test": metrics("test", data.test),
                  "ood": {name: metrics(name, split) for name, split in data.ood.items()}}
    ood_means(record)
    attach(record, kept, data)
    record.update(
        **no_deviation(), spd=None,  # the backbone is frozen by construction
        run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams,
        steps=total, batch_size=batch_size, train_loss=loss_sum / total, train_accuracy=correct / max(1, seen),
        wall_time_s=time.perf_counter() - t0,
    )
    return record


def zero_shot_record(spec: RunSpec, data: TaskData, task_model: TaskModel, eval_batch_size: int) -> dict:
    """The untouched pre-trained model evaluated as it is (the same numbers under every seed)."""
    t0 = time.perf_counter()
    record = evaluate_all(task_model.base, data, task_model, eval_batch_size)
    record.update(no_deviation())
    record.update(run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams, steps=0,
                  batch_size=0, spd=None, train_loss=None, train_accuracy=None, wall_time_s=time.perf_counter() - t0)
    return record
