"""Orchestrates ``spdecay compare`` for every task alike: prepare the output folder, plan the
runs (task registry + method table), hand the units still to do to an executor (skipping
finished ones on --resume), write results atomically after every unit, then the report (with
the task's section) and the plots. Nothing here depends on which task runs."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spdecay.experiments.config import CompareConfig, config_differences
from spdecay.experiments.errors import RunnerError, RunsFailed
from spdecay.experiments.executors import Executor, RunFailure, Worker, sequential
from spdecay.experiments.outdir import out_lock
from spdecay.experiments.preflight import first_missing, preflight, remove_failed_start
from spdecay.experiments.protocol import RunSpec, RunUnit, plan, units
from spdecay.experiments.reporting.closing import closing_block
from spdecay.experiments.reporting.markdown import count
from spdecay.experiments.reporting.results_io import atomic_write_text, read_records, write_records
from spdecay.experiments.tasks.registry import check_config, get_task, task_defaults


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
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", config.to_json())
    except OSError as exc:
        raise RunnerError(f"--out {out}: cannot write to this folder ({exc.strerror or exc})") from None
    return config, out


def run_summary(index: int, total: int, record: dict) -> str:
    """The log line of a finished run: the task's headline metric first (balanced accuracy,
    mIoU, ...); OOD only where there is one."""
    if record.get("diverged"):
        d = record["diverged"]
        return (f"[{index}/{total}] {record['run_id']}: DIVERGED (loss {d['loss']} at step {d['step']}); "
                "excluded from every mean, selection and paired difference")
    from spdecay.experiments.headline import headline_for

    h = headline_for([record])  # the task's headline metric
    text = (f"[{index}/{total}] {record['run_id']}: val {h.brief} {record['val'][h.key]:.3f} "
            f"test {h.brief} {record['test'][h.key]:.3f}")
    if record.get("ood"):
        text += f" ood {h.brief} {record[f'ood_mean_{h.key}']:.3f}"
    return text + f" (acc: test {record['test']['accuracy']:.3f}) ({record['wall_time_s']:.0f} s)"


def selection_text(config: CompareConfig) -> str:
    from spdecay.experiments.protocol import selection_seeds

    return ", ".join(map(str, selection_seeds(config)))


def plan_for(config: CompareConfig, records: list[dict] | None = None) -> list[RunSpec]:
    """Every run of the study ``config`` describes (the task's reference rows included). With
    --select-seeds the confirmatory seeds' runs follow the selection made on ``records``: they
    are planned once the selection seeds are done."""
    from spdecay.experiments.methods import METHODS
    from spdecay.experiments.protocol import confirmatory_plan, default_grids, default_lrs

    task = get_task(config.task)
    d = task_defaults(config)
    names = [*task.references, *config.optimizers]
    lr_grids = {n: list(METHODS[n].lr_grids[d.grid]) for n in names if d.grid in METHODS[n].lr_grids}
    alphas = {n: list(METHODS[n].eval_grids[d.grid]) for n in names if d.grid in METHODS[n].eval_grids}
    specs = plan(config, default_grids(d.grid, names), default_lrs(d.lr_adam, d.lr_sgd, names), task.references,
                 lr_grids, alphas)
    if getattr(config, "select_seeds", 0):
        specs = confirmatory_plan(config, specs, records or [])
    return specs


def run_compare(
    config: CompareConfig,
    out: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    threads: int | None = None,
    interrupt: Callable[[RunSpec, int], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    executor: Executor = sequential,
) -> Path:
    """Run (or continue) a comparison; returns the output folder. ``executor`` runs the units
    of work (``spdecay.experiments.executors``; default: one after the other, here). The output
    folder is locked for the whole run: a second process into it is refused."""
    if resume and (out is None or not (out / "config.json").is_file()):
        return prepare_out_dir(config, out, resume)[1]  # raises the one-line error
    out = out or default_out_dir(config.task)
    check_out_path(out)
    if not resume:
        # Files, device, model kind: before the banner and before the folder exists (an executor
        # with its own driver device, e.g. Ray, runs the units elsewhere and checks their device).
        preflight(config, device=getattr(executor, "driver_device", None) is None)
    created = first_missing(out)
    try:
        with out_lock(out):
            return _run_compare(config, out, resume=resume, progress=progress, threads=threads,
                                interrupt=interrupt, log=log, executor=executor)
    except Exception:
        if created is not None:  # a start that failed before its first result leaves no folder behind
            remove_failed_start(out, created)
        raise


def class_counts(data) -> dict[str, list[int]]:
    """Examples per class of the ID test set ("test") and of every OOD set (by name), where the
    labels are class indices."""
    out = {}
    for name, split in (("test", data.test), *data.ood.items()):
        labels = getattr(split, "labels", None)
        if isinstance(labels, torch.Tensor) and labels.ndim == 1 and not labels.is_floating_point():
            out[name] = torch.bincount(labels.cpu(), minlength=len(data.classes)).tolist()
    return out


def _run_compare(config: CompareConfig, out: Path, *, resume: bool, progress: bool, threads: int | None,
                 interrupt: Callable[[RunSpec, int], None] | None, log: Callable[[str], None],
                 executor: Executor) -> Path:
    started = time.perf_counter()
    config, out = prepare_out_dir(config, out, resume)
    check_config(config)
    records = read_records(out / "results.jsonl")
    if getattr(config, "select_from", None) and not resume and not records:
        from spdecay.experiments.pilot import import_selection

        records = import_selection(config, out, log)  # the pilot's selection runs, not trained again
    specs = plan_for(config, records)
    done_ids = {r["run_id"] for r in records}
    todo = units([s for s in specs if s.run_id not in done_ids])
    notes_file = out / "run_notes.json"
    notes: dict = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
    ckpt_dir = out / "checkpoints"
    # An executor may name the device of this process's own session (Ray: cpu, the GPUs are the runs').
    worker = Worker(config, ckpt_dir, getattr(executor, "driver_device", None), threads=threads, progress=progress,
                    interrupt=interrupt)
    failed: list[RunFailure] = []
    n_done = sum(1 for s in specs if s.run_id in done_ids)
    if not todo:
        log(f"spdecay compare: task {config.task}, preset {config.preset}, {count(len(specs), 'run')} "
            f"({n_done} already done), output {out}")
    else:
        session = worker.session()  # this process's data and model (an executor may build more)
        s = session.settings
        log(f"spdecay compare: task {config.task}, preset {config.preset}, {count(len(specs), 'run')} "
            f"({n_done} already done), output {out}, {count(session.threads, 'thread')}")
        notes = session.notes
        notes["class_counts"] = class_counts(session.data)  # the closing block's sampling error
        atomic_write_text(notes_file, json.dumps(notes, indent=2))
        data, task_model = session.data, session.task_model
        log(
            f"data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}"
            + "".join(f", {k} {len(v)}" for k, v in data.ood.items())
            + f"; {s.total_steps} steps of batch {s.batch_size} per run ({s.schedule} schedule) on {session.device}"
        )
        for what, n in notes["dropped_rows"].items():
            log(f"data: {what}: {n} rows with a missing text or label were skipped")
        if task_model.name:
            log(f"model: {task_model.name}, read through {task_model.reading}")
        if task_model.unused:
            log(f"model: {len(task_model.unused)} weights the forward pass never uses are frozen "
                f"({', '.join(task_model.unused[:4])}{', ...' if len(task_model.unused) > 4 else ''})")
        ckpt_dir.mkdir(exist_ok=True)
        finished = [n_done]
        earlier, by_unit = list(records), {}
        unit_rank = {u.spec.run_id: i for i, u in enumerate(todo)}

        def done(unit: RunUnit, new: list[dict]) -> None:
            from spdecay.experiments.training.predictions import store

            for record in new:  # per-example scores first: a record on disk always has its file
                store(out, record)
            by_unit[unit_rank[unit.spec.run_id]] = new  # plan order, whichever unit finished first
            records[:] = earlier + [r for i in sorted(by_unit) for r in by_unit[i]]
            write_records(out, records)  # the runs are safe on disk before their checkpoint goes
            (ckpt_dir / f"{unit.spec.run_id}.pt").unlink(missing_ok=True)
            for record in new:
                finished[0] += 1
                log(run_summary(finished[0], len(specs), record))

        failed = executor(todo, worker, done) or []
        while getattr(config, "select_seeds", 0):  # the confirmatory runs, once the selection is made
            more = plan_for(config, records)
            have = {r["run_id"] for r in records}
            extra = units([x for x in more if x.run_id not in have])
            specs, grew = more, len(more) > len(specs)
            if not extra or not grew:
                break
            log(f"--select-seeds: settings chosen on seeds {selection_text(config)}; "
                f"{len(extra)} confirmatory units to run")
            earlier, by_unit = list(records), {}  # done() orders this stage's units among themselves
            unit_rank = {u.spec.run_id: i for i, u in enumerate(extra)}
            failed += executor(extra, worker, done) or []
        for failure in failed:
            log(f"FAILED {', '.join(failure.unit.run_ids)}: {failure.reason}")
        if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):  # every run finished: nothing to resume
            ckpt_dir.rmdir()
    # Report on the planned runs only (a stored config fixes the plan).
    planned = {s.run_id for s in specs}
    # (--select-from: the pilot's selection runs stay, whichever seeds this process measures)
    records = [r for r in records if r["run_id"] in planned or r.get("role") == "selection"]
    write_outputs(out, config, records, notes, log, note=failure_note(failed, out))
    # The terminal gets a short table, what came out, the resolution and the report's path (the
    # full table is in report.md; every line fits in 100 columns).
    print(closing_block(out, records, seconds=time.perf_counter() - started, config=config,
                        class_counts=notes.get("class_counts")))
    if failed:
        ids = [i for f in failed for i in f.unit.run_ids]
        raise RunsFailed(f"{len(ids)} run(s) failed ({', '.join(ids)}); results and report hold the other "
                         f"{len(records)}; retry the failed ones with: spdecay compare --resume --out {out}")
    return out


def failure_note(failed: list[RunFailure], out: Path) -> str | None:
    """The report's paragraph naming the runs an executor could not finish (None: there are none)."""
    if not failed:
        return None
    lines = [f"**Incomplete study: {sum(len(f.unit.run_ids) for f in failed)} run(s) failed** and are missing "
             f"from every table below; `spdecay compare --resume --out {out}` retries them:", ""]
    lines += [f"- {', '.join(f.unit.run_ids)}: {f.reason}" for f in failed]
    return "\n".join(lines)


def write_outputs(out: Path, config: CompareConfig, records: list[dict], notes: dict,
                  log: Callable[[str], None], note: str | None = None) -> str:
    """report.md (with the task's section) and the plots; returns the comparison table."""
    from spdecay.experiments.reporting.report import write_report

    table = write_report(out, config, records, data_notes=notes, note=note)
    try:
        from spdecay.experiments.reporting.plots import write_plots

        write_plots(out, records)
    except RunnerError as exc:  # matplotlib missing: results and report are still complete
        log(f"plots skipped: {exc}")
    return table


def merge_runs(folders: list[Path], out: Path, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
               keep: Callable[[dict], bool] | None = None, note: str | None = None) -> Path:
    """Combine runs of one study split over processes (different ``--first-seed`` or
    ``--optimizers`` subsets) into ``out``: one config, one results file, one report with paired
    statistics. The folders' configurations must agree on everything but the seeds and the
    methods (a difference is refused, named); the merged grids must give every method the same
    tuning budget. A run present in several folders (the same deterministic run) is kept once.
    ``keep(record)`` filters the records."""
    import dataclasses

    from spdecay.experiments.methods import order

    if not folders:
        raise RunnerError("merge_runs: no folders given")
    configs = [CompareConfig.load(Path(f) / "config.json") for f in folders]
    for folder, c in zip(folders, configs):
        diff = config_differences(configs[0], c)
        if diff:
            raise RunnerError(f"merge_runs: {folder} was made with other settings than {folders[0]}: "
                              f"{'; '.join(diff)}")
    records: list[dict] = []
    seen: set[str] = set()
    for folder in folders:
        for r in read_records(Path(folder) / "results.jsonl"):
            if r["run_id"] not in seen and (keep is None or keep(r)):
                seen.add(r["run_id"])
                records.append(r)
    methods = order({n for c in configs for n in c.optimizers})
    rank = {n: i for i, n in enumerate(order({r["optimizer"] for r in records}))}
    records.sort(key=lambda r: (r["seed"], rank[r["optimizer"]]))
    seeds = sorted({r["seed"] for r in records})
    config = dataclasses.replace(
        configs[0], first_seed=seeds[0] if seeds else 0, seeds=len(seeds), optimizers=methods,
        lr={k: v for c in configs for k, v in c.lr.items()}, sweep={k: v for c in configs for k, v in c.sweep.items()},
    )
    try:
        plan_for(config)  # the merged grids: the same number of settings for every method
    except RunnerError as exc:
        raise RunnerError(f"merge_runs: the folders' grids do not form one study: {exc}") from None
    with out_lock(out, option="merge_runs out"):
        atomic_write_text(out / "config.json", config.to_json())
        from spdecay.experiments.training.predictions import copy_predictions

        copy_predictions(folders, records, out)  # each run's per-example scores beside its record
        write_records(out, records)
        notes_file = Path(folders[0]) / "run_notes.json"
        notes = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
        if notes:
            atomic_write_text(out / "run_notes.json", json.dumps(notes, indent=2))
        write_outputs(out, config, records, notes, log, note=note)
    return out
