"""One training run (method x seed x hyper-parameters): fine-tune, evaluate, record.

The same loop for every task and every trained method: the task's ``TaskModel`` gives the model
(``new_model(seed)``), the batches and the loss; the method table gives the optimizer and an
optional per-step hook (LP-FT). Resumable: every ``checkpoint_every`` steps the model, optimizer
(with its anchors), scheduler, RNG state and running statistics are saved atomically, tagged
with the run's configuration fingerprint (a checkpoint of another configuration is refused).
The data order is a pure function of (seed, epoch), so a run continued from a checkpoint takes
exactly the same steps as one that never stopped.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spdecay.experiments.data import TaskData
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.methods import build_optimizer, method
from spdecay.experiments.models import TaskModel
from spdecay.experiments.protocol import RunSpec
from spdecay.experiments.reporting.results_io import atomic_torch_save
from spdecay.experiments.training.batch_norm import reestimate_batch_norm
from spdecay.experiments.training.deviation import total_deviation, trace_every
from spdecay.experiments.training.evaluate import evaluate_all
from spdecay.experiments.training.schedule import epoch_order, lr_lambda


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint holds tensors and plain data only: anything else (a pickled object, which
    could run code when loaded) is refused before it is unpickled."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise RunnerError(f"checkpoint {path}: refused to load it: it holds more than tensors and plain data, "
                          f"or is damaged ({first}); delete it or use a fresh --out") from exc
    if not isinstance(ckpt, dict):
        raise RunnerError(f"checkpoint {path}: not a checkpoint of spdecay compare; delete it or use a fresh --out")
    return ckpt


def diverged_record(spec: RunSpec, data: TaskData, step: int, loss: float, total_steps: int, batch_size: int) -> dict:
    """The record of a run whose loss became non-finite: never evaluated (its metrics are NaN,
    never a chance-level row), excluded from every mean, selection and paired difference."""
    nan = {"accuracy": math.nan, "balanced_accuracy": math.nan}
    return {
        "val": dict(nan), "test": dict(nan), "ood": {name: dict(nan) for name in data.ood},
        "deviation": {"total": math.nan, "relative": math.nan},
        "layers": {"names": [], "deviation": [], "relative": [], "ndim": []}, "spd": None,
        "diverged": {"step": step, "loss": repr(loss)},
        "run_id": spec.run_id, "optimizer": spec.optimizer, "seed": spec.seed, "hparams": spec.hparams,
        "steps": total_steps, "batch_size": batch_size, "train_loss": math.nan, "train_accuracy": math.nan,
        "wall_time_s": 0.0,
    }


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
    hook_of = method(spec.optimizer).loop_hook
    hook = hook_of(model, task_model, total_steps) if hook_of is not None else None
    acc = {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "elapsed": 0.0,
           "fired_counts": None, "fired_names": None, "fired_fraction_sum": 0.0, "ratio_sum": 0.0,
           "trace_steps": [0], "trace_deviation": [0.0], "prepared": {}}
    prepare = method(spec.optimizer).prepare
    tag = f"{fingerprint}/{spec.run_id}"

    if checkpoint_path.exists():
        ckpt = load_checkpoint(checkpoint_path, device)
        if ckpt.get("fingerprint") != tag:
            raise RunnerError(
                f"checkpoint {checkpoint_path} was written by another configuration or run "
                f"({ckpt.get('fingerprint') or 'untagged'}, expected {tag}); delete it or use a fresh --out"
            )
        if hook is not None:
            hook.load_state_dict(ckpt["hook"])
        task_model.load_checkpoint_state(model, ckpt["model"])
        built.optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], device)
        acc = ckpt["acc"]
    else:
        if prepare is not None:  # LP-FT: the head's probe phase, once, before the first step
            acc["prepared"] = prepare(model, task_model, data, spec, batch_size, eval_batch_size)
        torch.manual_seed(spec.seed)  # dropout noise of this run
    every = trace_every(total_steps)

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
            perm = epoch_order(spec.seed, epoch, n_train)
            epoch_cache[epoch] = task_model.epoch_batches(data.train, perm, batch_size)
        index = epoch_cache[epoch][pos]
        inputs, labels = next(iter(task_model.batches(data.train, batch_size, index)))
        loss, correct = task_model.loss(model, inputs, labels)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):  # diverged: every later step would be noise
            if bar is not None:
                bar.close()
            return diverged_record(spec, data, acc["step"], loss_value, total_steps, batch_size)
        loss.backward()
        built.optimizer.step()
        scheduler.step()
        built.optimizer.zero_grad(set_to_none=True)
        if hook is not None:
            hook.step()
        _accumulate_spd(built.stats, acc)
        acc["step"] += 1
        acc["loss_sum"] += loss_value
        acc["correct"] += correct
        acc["seen"] += len(labels)
        if acc["step"] % every == 0 or acc["step"] == total_steps:  # D(t), every few steps
            acc.setdefault("trace_steps", []).append(acc["step"])
            acc.setdefault("trace_deviation", []).append(total_deviation(model, start_values))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{acc['loss_sum'] / acc['step']:.3f}", acc=f"{acc['correct'] / acc['seen']:.3f}")
        if acc["step"] % checkpoint_every == 0 and acc["step"] < total_steps:
            acc["elapsed"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            atomic_torch_save(
                {"model": task_model.checkpoint_state(model), "optimizer": built.optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": _rng_state(device), "acc": acc,
                 "fingerprint": tag, "hook": hook.state_dict() if hook is not None else None},
                checkpoint_path,
            )
        if interrupt is not None:
            interrupt(spec, acc["step"])
    if bar is not None:
        bar.close()

    n_norm = reestimate_batch_norm(model, task_model, data.train, eval_batch_size)
    record = evaluate_all(model, data, task_model, eval_batch_size)
    record["batch_norm_reestimated"] = n_norm
    acc["elapsed"] += time.perf_counter() - t0
    record.update(task_model.deviation(model, start_values))
    record.update(_spd_summary(acc, total_steps))
    record.update(acc.get("prepared") or {})
    if acc.get("trace_steps"):
        record["deviation_trace"] = {"steps": list(acc["trace_steps"]), "total": list(acc["trace_deviation"])}
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


def _progress_bar(spec: RunSpec, total: int, initial: int, enabled: bool):
    """A bar on a terminal; in a log, a start line with an estimate and a heartbeat."""
    from spdecay.experiments.methods import label, strength_text
    from spdecay.experiments.training.progress import progress_bar

    desc = f"{label(spec.optimizer)} seed {spec.seed} ({strength_text(spec.optimizer, spec.weight_decay)})"
    return progress_bar(desc, total, initial, enabled)


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
