"""A task's data and model built once per process, and the one function that runs a unit of
work (a run and the rows derived from it) for every task and method kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import TaskData
from spdecay.experiments.methods import method
from spdecay.experiments.models import TaskModel
from spdecay.experiments.protocol import RunSpec, RunUnit


@dataclass(frozen=True)
class RunSettings:
    """What every run of a study shares (resolved from the preset and the options)."""

    total_steps: int
    batch_size: int
    eval_batch_size: int
    schedule: str
    checkpoint_every: int


@dataclass
class Session:
    """A task's data, model and settings in one process (built once, used by every unit)."""

    config: CompareConfig
    data: TaskData
    task_model: TaskModel
    settings: RunSettings
    device: torch.device
    threads: int
    notes: dict = field(default_factory=dict)  # run_notes.json: how the data and model were read


def build_session(config: CompareConfig, device: torch.device, threads: int) -> Session:
    from spdecay.experiments.tasks.registry import build_task, task_defaults
    from spdecay.experiments.training.batch_norm import batch_norm_layers
    from spdecay.experiments.training.schedule import total_steps_for

    d = task_defaults(config)
    data, task_model = build_task(config, device)
    batch_size = config.batch_size or d.batch_size
    steps = config.steps if config.steps is not None else (None if config.epochs is not None else d.steps)
    epochs = config.epochs if config.epochs is not None else d.epochs
    settings = RunSettings(
        total_steps=total_steps_for(len(data.train), batch_size, steps, epochs), batch_size=batch_size,
        eval_batch_size=d.eval_batch_size, schedule=config.schedule or d.schedule,
        checkpoint_every=config.checkpoint_every or d.checkpoint_every,
    )
    notes = {"dropped_rows": dict(getattr(data, "dropped", {}) or {}), "model_reading": task_model.reading,
             "model_name": task_model.name, "unused_weights": list(task_model.unused),
             "batch_norm_layers": len(batch_norm_layers(task_model.base))}
    return Session(config, data, task_model, settings, device, threads, notes)


def run_unit(session: Session, unit: RunUnit, checkpoint_dir: Path, *, progress: bool = True,
             interrupt: Callable[[RunSpec, int], None] | None = None) -> list[dict]:
    """The records of one unit: the run (trained, probed or evaluated as it is, by its method's
    kind) and the rows derived from its trained model. A reference row follows the task model's
    own recipe where it has one (``TaskModel.probe_record`` ...), else ``training/references.py``."""
    from spdecay.experiments.training.loop import train_run
    from spdecay.experiments.training.references import (
        train_probe,
        wise_ft_record,
        zero_shot_record,
    )

    spec, s, tm, data = unit.spec, session.settings, session.task_model, session.data
    if getattr(session.config, "resample_train", False):
        data = data.for_seed(spec.seed)  # this seed's own training subset (every method alike)
    kind = method(spec.optimizer).kind
    new: list[dict] = []
    if kind == "probe":
        new.append(tm.probe_record(spec, data, s.batch_size, s.eval_batch_size) if tm.probe_record
                   else train_probe(spec, data, tm, batch_size=s.batch_size, eval_batch_size=s.eval_batch_size))
    elif kind == "reference":
        new.append(tm.zero_shot_record(spec, data, s.eval_batch_size) if tm.zero_shot_record
                   else zero_shot_record(spec, data, tm, s.eval_batch_size))
    else:
        record = train_run(
            spec, data, tm, total_steps=s.total_steps, batch_size=s.batch_size, eval_batch_size=s.eval_batch_size,
            checkpoint_path=checkpoint_dir / f"{spec.run_id}.pt", checkpoint_every=s.checkpoint_every,
            progress=progress, interrupt=interrupt, schedule=s.schedule, fingerprint=session.config.fingerprint(),
            keep_model=bool(unit.derived),
        )
        model = record.pop("_model", None)
        if unit.spec_wanted:
            new.append(record)
        for derived in unit.derived:
            if record.get("diverged"):  # nothing to interpolate: the derived row diverged with it
                new.append({**record, "run_id": derived.run_id, "optimizer": derived.optimizer,
                            "hparams": derived.hparams})
            else:
                new.append(tm.wise_ft_record(model, derived, record, data, s.eval_batch_size) if tm.wise_ft_record
                           else wise_ft_record(model, derived, record, data, tm, s.eval_batch_size))
        del model
    for record in new:
        record["task"] = session.config.task
        record["preset"] = session.config.preset
        record["schedule"] = s.schedule
        record["threads"] = session.threads
        if getattr(session.config, "select_seeds", 0):
            from spdecay.experiments.protocol import seed_role

            record["role"] = seed_role(session.config, record["seed"])
        if not record.get("diverged"):
            tm.annotate(record)
    return new
