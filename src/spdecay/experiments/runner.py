"""Orchestrates ``spdecay compare``: plan the runs, train each (skipping finished ones on
--resume), write results atomically after every run, then the report and the plots."""

from __future__ import annotations

import json
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


def check_out_path(out: Path) -> None:
    """--out must be a folder (or not exist yet); a file there, or a file as one of its parents,
    is a one-line error naming the option."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"lies under the file {path}"
            raise RunnerError(f"--out {out}: {where}; give a folder")


def prepare_out_dir(config: CompareConfig, out: Path | None, resume: bool) -> tuple[CompareConfig, Path]:
    """Resume: reuse the stored config of ``out``. Fresh: refuse a folder that holds another
    run's results or state (a checkpoint of another configuration must never be continued)."""
    if resume:
        if out is None:
            raise RunnerError("--resume needs --out DIR: the folder of the run to continue")
        check_out_path(out)
        stored = out / "config.json"
        if not stored.is_file():
            raise RunnerError(f"--resume: {stored} not found; nothing to resume in --out {out}")
        # The stored config fixes the plan (the CLI refuses options given with --resume).
        return CompareConfig.load(stored), out
    out = out or default_out_dir(config.task)
    check_out_path(out)
    if (out / "results.jsonl").exists():
        raise RunnerError(f"--out {out}: already holds results; continue it with --resume or choose another folder")
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        stored = out / "config.json"
        same = stored.is_file() and CompareConfig.load(stored).fingerprint() == config.fingerprint()
        hint = "continue it with --resume" if same else "it was made with other settings"
        raise RunnerError(f"--out {out}: holds checkpoints of an unfinished run ({hint}); "
                          "choose another folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.to_json())
    return config, out


def thread_count(threads: int | None = None) -> int:
    """--threads, else OMP_NUM_THREADS, else the cores this process may use."""
    if threads is not None:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            if int(env) > 0:
                return int(env)
        except ValueError:
            pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(device: torch.device, threads: int | None = None) -> int:
    n = thread_count(threads)
    if device.type == "cpu" or threads is not None:
        torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def run_summary(index: int, total: int, record: dict) -> str:
    """The log line of a finished run: balanced accuracies first; OOD only where there is one."""
    text = (f"[{index}/{total}] {record['run_id']}: val bal {record['val']['balanced_accuracy']:.3f} "
            f"test bal {record['test']['balanced_accuracy']:.3f}")
    if record.get("ood"):
        text += f" ood bal {record['ood_mean_balanced_accuracy']:.3f}"
    return text + f" (acc: test {record['test']['accuracy']:.3f}) ({record['wall_time_s']:.0f} s)"


def default_lrs(d) -> dict[str, float]:
    from spdecay.experiments.protocol import PROBE_LR

    lrs = {n: d.lr_adam for n in ("adamw", "l2sp", "adamspd", "lpft", "wise_ft")}
    return {**lrs, "sgdspd": d.lr_sgd, "probe": PROBE_LR}


def run_compare(
    config: CompareConfig,
    out: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    threads: int | None = None,
    interrupt: Callable[[RunSpec, int], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Path:
    """Run (or continue) a comparison; returns the output folder."""
    config, out = prepare_out_dir(config, out, resume)
    if config.task == "llm":  # LoRA instruction tuning with label-word scoring: its own loop
        from spdecay.experiments.llm_task import run_llm_compare

        return run_llm_compare(config, out, progress=progress, threads=threads, prepared=True, log=log)
    d = task_defaults(config)
    specs = plan(config, d.grids, default_lrs(d))
    device = resolve_device(config.device)
    n_threads = set_threads(device, threads)

    records = read_records(out / "results.jsonl")
    done = {r["run_id"] for r in records}
    todo = [s for s in specs if s.run_id not in done]
    log(f"spdecay compare: task {config.task}, preset {config.preset}, {len(specs)} runs "
        f"({len(specs) - len(todo)} already done), output {out}, {n_threads} threads")
    notes_file = out / "run_notes.json"
    notes: dict = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
    if todo:
        data, task_model = build_task(config, device)
        from spdecay.experiments.batch_norm import batch_norm_layers
        from spdecay.experiments.train import (
            total_steps_for,
            train_probe,
            train_run,
            wise_ft_record,
        )

        batch_size = config.batch_size or d.batch_size
        steps = config.steps if config.steps is not None else (None if config.epochs is not None else d.steps)
        epochs = config.epochs if config.epochs is not None else d.epochs
        total = total_steps_for(len(data.train), batch_size, steps, epochs)
        schedule = config.schedule or d.schedule
        notes = {"dropped_rows": dict(getattr(data, "dropped", {}) or {}),
                 "model_reading": task_model.reading, "model_name": task_model.name, "unused_weights": list(task_model.unused),
                 "batch_norm_layers": len(batch_norm_layers(task_model.base))}
        atomic_write_text(notes_file, json.dumps(notes, indent=2))
        log(
            f"data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}"
            + "".join(f", {k} {len(v)}" for k, v in data.ood.items())
            + f"; {total} steps of batch {batch_size} per run ({schedule} schedule) on {device}"
        )
        for what, n in notes["dropped_rows"].items():
            log(f"data: {what}: {n} rows with a missing text or label were skipped")
        if task_model.name:
            log(f"model: {task_model.name}, read through {task_model.reading}")
        if task_model.unused:
            log(f"model: {len(task_model.unused)} weights the forward pass never uses are frozen "
                f"({', '.join(task_model.unused[:4])}{', ...' if len(task_model.unused) > 4 else ''})")
        ckpt_dir = out / "checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        pending = {s.run_id for s in todo}
        finished = len(specs) - len(todo)
        for spec in todo:
            if spec.run_id not in pending:
                continue  # a WiSE-FT row already made from its AdamW run
            t_start = time.perf_counter()
            new: list[dict] = []
            if spec.optimizer == "probe":
                new.append(train_probe(spec, data, task_model, batch_size=batch_size,
                                       eval_batch_size=d.eval_batch_size))
            else:
                base_spec = spec if spec.optimizer != "wise_ft" else RunSpec("adamw", spec.seed, spec.weight_decay, spec.lr)
                twin = RunSpec("wise_ft", spec.seed, spec.weight_decay, spec.lr)
                wants_twin = base_spec.optimizer == "adamw" and twin.run_id in pending
                ckpt = ckpt_dir / f"{base_spec.run_id}.pt"
                record = train_run(
                    base_spec, data, task_model, total_steps=total, batch_size=batch_size,
                    eval_batch_size=d.eval_batch_size, checkpoint_path=ckpt,
                    checkpoint_every=config.checkpoint_every or d.checkpoint_every,
                    progress=progress, interrupt=interrupt, schedule=schedule,
                    fingerprint=config.fingerprint(), keep_model=wants_twin,
                )
                model = record.pop("_model", None)
                if base_spec.run_id in pending:
                    new.append(record)
                if wants_twin:
                    new.append(wise_ft_record(model, twin, record, data, task_model, d.eval_batch_size))
                del model
            for record in new:
                record["task"] = config.task
                record["preset"] = config.preset
                record["schedule"] = schedule
                record["threads"] = n_threads
                records.append(record)
                pending.discard(record["run_id"])
            write_records(out, records)  # the runs are safe on disk before their checkpoint goes
            if spec.optimizer != "probe":
                (ckpt_dir / f"{base_spec.run_id}.pt").unlink(missing_ok=True)
            for record in new:
                finished += 1
                log(run_summary(finished, len(specs), record))
            log(f"  ({time.perf_counter() - t_start:.0f} s wall)")
        if not any(ckpt_dir.iterdir()):  # every run finished: nothing left to resume from
            ckpt_dir.rmdir()
    # Report on the planned runs only (a stored config fixes the plan).
    planned = {s.run_id for s in specs}
    records = [r for r in records if r["run_id"] in planned]
    from spdecay.experiments.report import write_report

    table = write_report(out, config, records, data_notes=notes)
    try:
        from spdecay.experiments.plots import write_plots

        write_plots(out, records)
    except RunnerError as exc:  # matplotlib missing: results and report are still complete
        log(f"plots skipped: {exc}")
    print(table)
    return out


def merge_runs(folders: list[Path], out: Path, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
               keep: Callable[[dict], bool] | None = None, note: str | None = None) -> Path:
    """Combine runs of one study split over processes (different ``--first-seed`` or
    ``--optimizers`` subsets) into ``out``: one config, one results file, one report with paired
    statistics. The folders' configurations must agree on everything but the seeds, the methods
    and the grids (``--sweep`` subsets of one study's grid); a run present in several folders
    (the same deterministic run) is kept once. ``keep(record)`` filters the records."""
    import dataclasses

    from spdecay.experiments.config import OPTIMIZERS

    configs = [CompareConfig.load(Path(f) / "config.json") for f in folders]
    if not configs:
        raise RunnerError("merge_runs: no folders given")

    def settings(c: CompareConfig) -> dict:
        # Seeds, methods and grid subsets may differ; records carry their own hyper-parameters.
        return {k: v for k, v in dataclasses.asdict(c).items()
                if k not in ("seeds", "first_seed", "optimizers", "sweep")}

    for folder, c in zip(folders, configs):
        if settings(c) != settings(configs[0]):
            raise RunnerError(f"merge_runs: {folder} was made with other settings than {folders[0]}")
    records: list[dict] = []
    seen: set[str] = set()
    for folder in folders:
        for r in read_records(Path(folder) / "results.jsonl"):
            if r["run_id"] not in seen and (keep is None or keep(r)):
                seen.add(r["run_id"])
                records.append(r)
    methods = {n for c in configs for n in c.optimizers}
    order = [n for n in OPTIMIZERS if n in methods]
    # The llm task also records the untouched pre-trained model ("pretrained") in every folder.
    rank = {"pretrained": -1} | {n: i for i, n in enumerate(order)}
    records.sort(key=lambda r: (r["seed"], rank.get(r["optimizer"], len(rank))))
    seeds = sorted({r["seed"] for r in records})
    config = dataclasses.replace(configs[0], first_seed=seeds[0] if seeds else 0, seeds=len(seeds), optimizers=order)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.to_json())
    write_records(out, records)
    notes_file = Path(folders[0]) / "run_notes.json"
    notes = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
    if notes:
        atomic_write_text(out / "run_notes.json", json.dumps(notes, indent=2))
    if config.task == "llm":  # its own report: the forgetting section beside the common one
        from spdecay.experiments.llm_report import write_llm_report

        write_llm_report(out, config, records, log=log, notes=notes, note=note)
        return out
    from spdecay.experiments.report import write_report

    write_report(out, config, records, data_notes=notes, note=note)
    try:
        from spdecay.experiments.plots import write_plots

        write_plots(out, records)
    except RunnerError as exc:
        log(f"plots skipped: {exc}")
    return out
