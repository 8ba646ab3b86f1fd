"""Checks made before a run says or writes anything: every file option names something that
exists, the device is there, the task's own checks (a model folder of the right kind) pass.
``spdecay compare`` runs them before its banner and before it creates the output folder, so a
failed start is one line on stderr and leaves no ``runs/<task>-<timestamp>/`` behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.outdir import LOCK_FILE


def check_paths(*, model: str | None = None, train: str | None = None, val: str | None = None,
                test: str | None = None, ood: dict[str, str] | None = None) -> None:
    """A file or folder option that names nothing is the first thing said (before any remark on
    how the options combine)."""
    if model is not None and not Path(model).expanduser().exists():
        raise RunnerError(f"--model {model}: no such model folder")
    named = [("--train", train), ("--val", val), ("--test", test)]
    named += [(f"--ood {name}=", path) for name, path in (ood or {}).items()]
    for option, path in named:
        if path is not None and not Path(path).expanduser().exists():
            sep = "" if option.endswith("=") else " "
            raise RunnerError(f"{option}{sep}{path}: no such file or folder")


def check_device(name: str) -> None:
    """The device exists on this machine (``resolve_device`` raises the one-line error)."""
    from spdecay.experiments.tasks.registry import resolve_device

    resolve_device(name)


def preflight(config: CompareConfig, device: bool = True) -> None:
    """Everything that can be refused before the banner and the output folder. ``device``:
    check ``config.device`` on this machine (False where an executor runs the units on other
    machines and checks their devices itself, e.g. Ray)."""
    from spdecay.experiments.tasks.registry import check_config

    check_paths(model=config.model, train=config.train, val=config.val, test=config.test, ood=config.ood)
    if device:
        check_device(config.device)
    check_config(config)


# What a start that failed before its first result leaves behind (and nothing else).
_START_FILES = {"config.json", "run_notes.json", LOCK_FILE}


def first_missing(out: Path) -> Path | None:
    """The outermost of ``out`` and its parents that does not exist yet (None: ``out`` exists):
    what a start will create."""
    missing = None
    for path in (out, *out.parents):
        if path.exists():
            break
        missing = path
    return missing


def remove_failed_start(out: Path, created: Path | None = None) -> bool:
    """Delete ``out`` (a folder this process created) if it holds only what a start writes: the
    stored config, run notes, the lock and an empty checkpoints folder. Anything else (a result,
    a checkpoint) keeps it. Empty parents up to ``created`` (the outermost folder the start
    made, e.g. ``runs/``) go too. Returns whether ``out`` was removed."""
    if not out.is_dir():
        return False
    for entry in out.iterdir():
        if entry.name in _START_FILES and entry.is_file():
            continue
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        return False
    shutil.rmtree(out, ignore_errors=True)
    if created is not None and created != out and created in out.parents:
        for parent in out.parents:
            try:
                parent.rmdir()  # only an empty folder goes
            except OSError:
                break
            if parent == created:
                break
    return True
