"""Atomic files: results (JSONL + CSV) and training checkpoints.

Every write goes to a temporary file in the same folder and is then ``os.replace``d over the
target, so an interrupted run leaves either the old or the new complete file, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); results are ordinary files (0666 - umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_records(path: Path) -> list[dict]:
    """The records of ``path`` (JSON lines); a damaged file is a one-line error naming it and the line."""
    from spdecay.experiments.errors import RunnerError

    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise RunnerError(f"{path}: line {number} is not a complete JSON record ({exc.msg}); the file is "
                              "truncated or corrupt: restore it or remove that line") from None
        if not isinstance(record, dict) or "run_id" not in record:
            raise RunnerError(f"{path}: line {number} is not a result record of spdecay compare")
        records.append(record)
    return records


def flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted columns; per-layer lists are left out of the CSV."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif not isinstance(value, list):
            out[name] = value
    return out


def write_records(out_dir: Path, records: list[dict]) -> None:
    """results.jsonl (complete records) and results.csv (scalar columns), both atomically."""
    atomic_write_text(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    rows = [flatten(r) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", buffer.getvalue())
