"""Orchestrates ``spdecay compare``: plan the runs, train each (skipping finished ones on
--resume), write results atomically after every run, then the report and the plots."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.protocol import RunSpec, plan
from spdecay.experiments.results_io import atomic_write_text, read_records, write_records
from spdecay.experiments.tasks import build_task, resolve_device, task_defaults


def default_out_dir(task: str) -> Path:
    return Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_out_dir(config: CompareConfig, out: Path | None, resume: bool) -> tuple[CompareConfig, Path]:
    """Resume: reuse the stored config of ``out``. Fresh: refuse to mix into an old run's results."""
    if resume:
        if out is None:
            raise RunnerError("--resume needs --out DIR: the folder of the run to continue")
        stored = out / "config.json"
        if not stored.is_file():
            raise RunnerError(f"--resume: {stored} not found; nothing to resume in --out {out}")
        # The stored config fixes the plan: other options given with --resume are not applied.
        return CompareConfig.load(stored), out
    out = out or default_out_dir(config.task)
    if (out / "results.jsonl").exists():
        raise RunnerError(f"--out {out}: already holds results; continue it with --resume or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.to_json())
    return config, out


def set_threads(device: torch.device) -> None:
    if device.type == "cpu":
        # One intra-op thread per core we may use; more only adds contention on small machines.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores))


def run_compare(
    config: CompareConfig,
    out: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    interrupt: Callable[[RunSpec, int], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Path:
    """Run (or continue) a comparison; returns the output folder."""
    config, out = prepare_out_dir(config, out, resume)
    d = task_defaults(config)
    default_lr = {n: (d.lr_sgd if n == "sgdspd" else d.lr_adam) for n in ("adamw", "l2sp", "adamspd", "sgdspd")}
    specs = plan(config, d.grids, default_lr)
    device = resolve_device(config.device)
    set_threads(device)

    records = read_records(out / "results.jsonl")
    done = {r["run_id"] for r in records}
    todo = [s for s in specs if s.run_id not in done]
    log(f"spdecay compare: task {config.task}, {len(specs)} runs ({len(specs) - len(todo)} already done), output {out}")
    if todo:
        data, task_model = build_task(config, device)
        from spdecay.experiments.train import total_steps_for, train_run

        batch_size = config.batch_size or d.batch_size
        steps = config.steps if config.steps is not None else (None if config.epochs is not None else d.steps)
        epochs = config.epochs if config.epochs is not None else d.epochs
        total = total_steps_for(len(data.train), batch_size, steps, epochs)
        log(
            f"data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}, "
            + ", ".join(f"{k} {len(v)}" for k, v in data.ood.items())
            + f"; {total} steps of batch {batch_size} per run on {device}"
        )
        ckpt_dir = out / "checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        for i, spec in enumerate(todo, 1):
            ckpt = ckpt_dir / f"{spec.run_id}.pt"
            record = train_run(
                spec, data, task_model, total_steps=total, batch_size=batch_size,
                eval_batch_size=d.eval_batch_size, checkpoint_path=ckpt,
                checkpoint_every=config.checkpoint_every or d.checkpoint_every,
                progress=progress, interrupt=interrupt,
            )
            record["task"] = config.task
            records.append(record)
            write_records(out, records)  # the run is safe on disk before its checkpoint goes
            ckpt.unlink(missing_ok=True)
            log(
                f"[{len(done) + i}/{len(specs)}] {spec.run_id}: val {record['val']['accuracy']:.3f} "
                f"test {record['test']['accuracy']:.3f} ood {record.get('ood_mean_accuracy', float('nan')):.3f} "
                f"({record['wall_time_s']:.0f} s)"
            )
        if not any(ckpt_dir.iterdir()):  # every run finished: nothing left to resume from
            ckpt_dir.rmdir()
    # Report on the planned runs only (a stored config fixes the plan).
    planned = {s.run_id for s in specs}
    records = [r for r in records if r["run_id"] in planned]
    from spdecay.experiments.report import write_report

    table = write_report(out, config, records)
    try:
        from spdecay.experiments.plots import write_plots

        write_plots(out, records)
    except RunnerError as exc:  # matplotlib missing: results and report are still complete
        log(f"plots skipped: {exc}")
    print(table)
    return out
