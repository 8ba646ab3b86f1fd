"""Per-example predictions: every run's class scores on validation, ID test and every OOD set,
stored next to its record as ``<out>/predictions/<run_id>.npz`` (compressed numpy arrays,
written atomically by the runner's single writer, read back with ``allow_pickle=False``).

Keys of one file: ``<set>.scores`` (float32, N x classes: logits, or the llm task's label
log-likelihoods) and ``<set>.labels`` (int32, N) for ``<set>`` in ``val``, ``test`` and
``ood.<name>``. The rows are in the split's stored order, the same for every run of a study
(the evaluation sets never depend on the seed), so files of two runs pair example by example:
the paired bootstrap over examples (``reporting/inference.py``) reads them.

While a record travels from the evaluation to the writer its scores sit under the private key
``"_predictions"`` (numpy arrays; popped before the record is written as JSON).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from spdecay.experiments.errors import RunnerError

KEY = "_predictions"
FOLDER = "predictions"


def attach(record: dict, scores: dict, data) -> None:
    """Put the scores (``{"val": tensor, "test": ..., "ood.<name>": ...}``) and the matching
    labels on ``record`` for the writer; nothing when the model gave no scores."""
    if not scores:
        return
    splits = {"val": data.val, "test": data.test, **{f"ood.{n}": s for n, s in data.ood.items()}}
    arrays: dict[str, np.ndarray] = {}
    for key, value in scores.items():
        arrays[f"{key}.scores"] = value.detach().float().cpu().numpy().astype(np.float32, copy=False)
        arrays[f"{key}.labels"] = splits[key].labels.cpu().numpy().astype(np.int32)
    record[KEY] = arrays


def path_of(out: Path, run_id: str) -> Path:
    return Path(out) / FOLDER / f"{run_id}.npz"


def store(out: Path, record: dict) -> Path | None:
    """Write (atomically) and drop the record's ``"_predictions"``; returns the file written."""
    from spdecay.experiments.reporting.results_io import atomic_write_bytes

    arrays = record.pop(KEY, None)
    if not arrays:
        return None
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = path_of(out, record["run_id"])
    atomic_write_bytes(path, buffer.getvalue())
    return path


def strip(record: dict) -> dict:
    """The record without its in-flight scores (e.g. before JSON)."""
    record.pop(KEY, None)
    return record


def load(out: Path, run_id: str) -> dict[str, np.ndarray] | None:
    """The stored arrays of ``run_id`` (None if the run stored none); never unpickles."""
    path = path_of(out, run_id)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise RunnerError(f"{path}: not a readable predictions file ({exc}); delete it or rerun that run") from None


def correct(arrays: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(correct: bool N, labels: int N) of one split (``val``, ``test``, ``ood.<name>``)."""
    scores, labels = arrays[f"{split}.scores"], arrays[f"{split}.labels"]
    return scores.argmax(-1) == labels, labels


def copy_predictions(folders, records: list[dict], out: Path) -> int:
    """merge_runs: copy each kept record's predictions file from the first folder holding it
    into ``out`` (atomically); returns how many were copied."""
    from spdecay.experiments.reporting.results_io import atomic_write_bytes

    copied = 0
    for record in records:
        target = path_of(out, record["run_id"])
        for folder in folders:
            source = path_of(Path(folder), record["run_id"])
            if source.is_file():
                if source.resolve() != target.resolve():
                    atomic_write_bytes(target, source.read_bytes())
                copied += 1
                break
    return copied
