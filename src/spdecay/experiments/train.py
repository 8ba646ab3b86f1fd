"""One training run (optimizer x seed x hyper-parameters): fine-tune, evaluate, record.

Resumable: every ``checkpoint_every`` steps the model, optimizer (with its anchors), scheduler,
RNG state and running statistics are saved atomically, tagged with the run's configuration
fingerprint (a checkpoint of another configuration is refused). The data order is a pure
function of (seed, epoch), so a run continued from a checkpoint takes exactly the same steps as
one that never stopped.

Reference rows: ``probe`` trains only the head on frozen features (computed once per process),
``lpft`` freezes the backbone for the first ``LP_FRACTION`` of the steps (the package's
``spdecay.LPFT``), ``wise_ft`` interpolates a finished AdamW model with the pre-trained
weights (the package's ``spdecay.interpolate``, alpha ``WISE_FT_ALPHA``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spdecay.experiments.batch_norm import reestimate_batch_norm
from spdecay.experiments.data import TaskData
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.evaluate import accuracy_metrics, evaluate
from spdecay.experiments.models import TaskModel
from spdecay.experiments.optimizers import build_optimizer
from spdecay.experiments.protocol import RunSpec
from spdecay.experiments.results_io import atomic_torch_save

WARMUP_FRACTION = 0.1
COSINE_FLOOR = 0.1  # cosine decays to 10% of the peak rate, not to zero: late steps still move
LP_FRACTION = 0.25  # LP-FT: the share of the steps that trains the head alone
WISE_FT_ALPHA = 0.5
PROBE_EPOCHS = 50  # passes over the cached features (cheap: only a linear head trains)


def lr_lambda(total_steps: int, schedule: str = "linear") -> Callable[[int], float]:
    """Linear warm-up over the first 10% of steps, then ``linear`` decay to zero (BERT-style),
    ``cosine`` decay to ``COSINE_FLOOR`` of the peak, or a ``constant`` rate."""
    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}")
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def total_steps_for(n_train: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    if steps is not None:
        return steps
    per_epoch = max(1, n_train // batch_size)
    return max(1, math.ceil((epochs or 1.0) * per_epoch))


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def train_run(
    spec: RunSpec,
    data: TaskData,
    task_model: TaskModel,
    *,
    total_steps: int,
    batch_size: int,
    eval_batch_size: int,
    checkpoint_path: Path,
    checkpoint_every: int,
    progress: bool = True,
    interrupt: Callable[[RunSpec, int], None] | None = None,
    schedule: str = "linear",
    fingerprint: str = "",
    keep_model: bool = False,
) -> dict:
    """Train one run to ``total_steps`` (continuing from ``checkpoint_path`` if present) and
    return its record (with the trained model under ``"_model"`` if ``keep_model``).
    ``interrupt(spec, step)`` is called after every step (tests use it). ``fingerprint`` ties
    checkpoints to the configuration that wrote them."""
    device = task_model.device
    model = task_model.new_model(spec.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start_values = {n: p.detach().clone() for n, p in named if not task_model.is_head(n)}
    built = build_optimizer(spec.optimizer, model, task_model.head_modules, spec.lr, spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(built.optimizer, lr_lambda(total_steps, schedule))
    lpft = None
    if spec.optimizer == "lpft":
        from spdecay import LPFT

        lpft = LPFT(model, lp_steps=max(1, int(LP_FRACTION * total_steps)), head=task_model.head_modules)
    acc = {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "elapsed": 0.0,
           "fired_counts": None, "fired_names": None, "fired_fraction_sum": 0.0, "ratio_sum": 0.0}
    tag = f"{fingerprint}/{spec.run_id}"

    if checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if ckpt.get("fingerprint") != tag:
            raise RunnerError(
                f"checkpoint {checkpoint_path} was written by another configuration or run "
                f"({ckpt.get('fingerprint') or 'untagged'}, expected {tag}); delete it or use a fresh --out"
            )
        if lpft is not None:
            lpft.load_state_dict(ckpt["lpft"])
        model.load_state_dict(ckpt["model"])
        built.optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], device)
        acc = ckpt["acc"]
    else:
        torch.manual_seed(spec.seed)  # dropout noise of this run

    n_train = len(data.train)
    per_epoch = max(1, n_train // batch_size)
    epoch_cache: dict[int, list[torch.Tensor]] = {}
    bar = _progress_bar(spec, total_steps, acc["step"], progress)
    model.train()
    t0 = time.perf_counter()
    while acc["step"] < total_steps:
        epoch, pos = divmod(acc["step"], per_epoch)
        if epoch not in epoch_cache:  # a pure function of (seed, epoch): resumable
            epoch_cache.clear()
            perm = _epoch_order(spec.seed, epoch, n_train)
            epoch_cache[epoch] = task_model.epoch_batches(data.train, perm, batch_size)
        index = epoch_cache[epoch][pos]
        inputs, labels = next(iter(task_model.batches(data.train, batch_size, index)))
        logits = task_model.logits(model, inputs)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        built.optimizer.step()
        scheduler.step()
        built.optimizer.zero_grad(set_to_none=True)
        if lpft is not None:
            lpft.step()
        _accumulate_spd(built.stats, acc)
        acc["step"] += 1
        acc["loss_sum"] += float(loss.detach())
        acc["correct"] += int((logits.argmax(-1) == labels).sum())
        acc["seen"] += len(labels)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{acc['loss_sum'] / acc['step']:.3f}", acc=f"{acc['correct'] / acc['seen']:.3f}")
        if acc["step"] % checkpoint_every == 0 and acc["step"] < total_steps:
            acc["elapsed"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            atomic_torch_save(
                {"model": model.state_dict(), "optimizer": built.optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": _rng_state(device), "acc": acc,
                 "fingerprint": tag, "lpft": lpft.state_dict() if lpft is not None else None},
                checkpoint_path,
            )
        if interrupt is not None:
            interrupt(spec, acc["step"])
    if bar is not None:
        bar.close()

    n_norm = reestimate_batch_norm(model, task_model, data.train, eval_batch_size)
    record = _evaluate_all(model, data, task_model, eval_batch_size)
    record["batch_norm_reestimated"] = n_norm
    acc["elapsed"] += time.perf_counter() - t0
    record.update(parameter_deviation(model, start_values))
    record.update(_spd_summary(acc, total_steps))
    record.update(
        run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams,
        steps=total_steps, batch_size=batch_size,
        train_loss=acc["loss_sum"] / max(1, acc["step"]),
        train_accuracy=acc["correct"] / max(1, acc["seen"]),
        wall_time_s=acc["elapsed"],
    )
    if keep_model:
        record["_model"] = model
    return record


def wise_ft_record(model: nn.Module, spec: RunSpec, base_record: dict, data: TaskData, task_model: TaskModel,
                   eval_batch_size: int, alpha: float = WISE_FT_ALPHA) -> dict:
    """WiSE-FT of a finished AdamW model: its backbone interpolated with the pre-trained one
    (LoRA adapters merged first, so the interpolation is of the weights the network uses); the
    new head is AdamW's (it has no pre-trained value)."""
    from spdecay import interpolate

    t0 = time.perf_counter()
    merged = _merged(model)
    pre = {k: v for k, v in task_model.base.state_dict().items() if not task_model.is_head(k)}
    merged.load_state_dict(interpolate(pre, merged.state_dict(), alpha, strict=False))
    # Interpolated weights have no matching BatchNorm statistics (neither model's are right).
    n_norm = reestimate_batch_norm(merged, task_model, data.train, eval_batch_size)
    record = _evaluate_all(merged, data, task_model, eval_batch_size)
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
    head = head.float().train()
    opt = torch.optim.AdamW(head.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    per_epoch = max(1, len(data.train) // batch_size)
    total = PROBE_EPOCHS * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, "cosine"))
    x, y = feats["train"], data.train.labels
    loss_sum, correct, seen = 0.0, 0, 0
    for step in range(total):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:
            perm = _epoch_order(spec.seed, epoch, len(y))
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
    head.eval()
    with torch.no_grad():
        def metrics(name: str, split) -> dict:
            return accuracy_metrics(head(feats[name]).argmax(-1), split.labels, n)

        record = {"val": metrics("val", data.val), "test": metrics("test", data.test),
                  "ood": {name: metrics(name, split) for name, split in data.ood.items()}}
    _ood_means(record)
    record.update(
        deviation={"total": 0.0, "relative": 0.0},  # the backbone is frozen by construction
        layers={"names": [], "deviation": [], "relative": [], "ndim": []}, spd=None,
        run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams,
        steps=total, batch_size=batch_size, train_loss=loss_sum / total, train_accuracy=correct / max(1, seen),
        wall_time_s=time.perf_counter() - t0,
    )
    return record


def _progress_bar(spec: RunSpec, total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{spec.optimizer} seed {spec.seed} wd {spec.weight_decay:g}",
                leave=False, dynamic_ncols=True, disable=None)  # None: no bar when not a TTY


def _accumulate_spd(stats_fn, acc: dict) -> None:
    if stats_fn is None:
        return
    stats = stats_fn()
    if len(stats) == 0:
        return
    fired = stats.fired.detach().float().cpu()
    if acc["fired_counts"] is None:
        acc["fired_counts"] = torch.zeros_like(fired)
        acc["fired_names"] = list(stats.names)
    acc["fired_counts"] += fired
    acc["fired_fraction_sum"] += float(fired.mean())
    acc["ratio_sum"] += float(stats.ratio.float().mean())


def _evaluate_all(model: nn.Module, data: TaskData, task_model: TaskModel, batch_size: int) -> dict:
    n = len(data.classes)
    record = {
        "val": evaluate(model, task_model, data.val, n, batch_size),
        "test": evaluate(model, task_model, data.test, n, batch_size),
        "ood": {name: evaluate(model, task_model, split, n, batch_size) for name, split in data.ood.items()},
    }
    _ood_means(record)
    return record


def _ood_means(record: dict) -> None:
    if record["ood"]:
        for metric in ("accuracy", "balanced_accuracy"):
            record[f"ood_mean_{metric}"] = sum(m[metric] for m in record["ood"].values()) / len(record["ood"])


@torch.no_grad()
def parameter_deviation(model: nn.Module, start: dict[str, torch.Tensor]) -> dict:
    """||theta - theta0|| per layer and in total over the trained non-head parameters (theta0:
    the pre-trained weights; for LoRA the adapters' initial values)."""
    names, dev, rel, ndim = [], [], [], []
    total_sq, ref_sq = 0.0, 0.0
    for name, p in model.named_parameters():
        if name not in start:
            continue
        d = float((p.detach().double() - start[name].double()).norm())
        r = float(start[name].double().norm())
        names.append(name)
        ndim.append(p.ndim)
        dev.append(d)
        rel.append(d / r if r > 0 else float("nan"))
        total_sq += d * d
        ref_sq += r * r
    total = math.sqrt(total_sq)
    return {
        "deviation": {"total": total, "relative": total / math.sqrt(ref_sq) if ref_sq > 0 else float("nan")},
        "layers": {"names": names, "deviation": dev, "relative": rel, "ndim": ndim},
    }


def _spd_summary(acc: dict, total_steps: int) -> dict:
    if acc["fired_counts"] is None:
        return {"spd": None}
    steps = max(1, acc["step"])
    return {
        "spd": {
            "fraction_fired": acc["fired_fraction_sum"] / steps,
            "mean_ratio": acc["ratio_sum"] / steps,
            "layer_names": acc["fired_names"],
            "layer_fired_fraction": (acc["fired_counts"] / steps).tolist(),
        }
    }
