"""The full description of a comparison run (stored as config.json, reused by --resume)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTIMIZERS = ("adamw", "l2sp", "adamspd", "sgdspd")
DEFAULT_OPTIMIZERS = ("adamw", "l2sp", "adamspd")
TASKS = ("sentiment", "digits", "custom")


@dataclass
class CompareConfig:
    """Everything that determines the results of ``spdecay compare``.

    ``None`` fields take the task's defaults (see :mod:`spdecay.experiments.tasks`); ``quick``
    selects the task's small smoke-test sizes.
    """

    task: str = "sentiment"
    optimizers: list[str] = field(default_factory=lambda: list(DEFAULT_OPTIMIZERS))
    seeds: int = 1
    lr: dict[str, float] = field(default_factory=dict)  # per optimizer; missing -> task default
    sweep: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # opt -> hp -> values
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    quick: bool = False
    device: str = "auto"
    checkpoint_every: int | None = None
    # bring your own model and data
    model: str | None = None
    train: str | None = None
    val: str | None = None
    test: str | None = None
    ood: dict[str, str] = field(default_factory=dict)
    text_column: str = "text"
    label_column: str = "label"
    lora_rank: int = 0
    max_length: int | None = None
    image_size: int | None = None
    train_size: int | None = None  # subsample the ID training set (None: task default)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, path: Path) -> CompareConfig:
        return cls.from_dict(json.loads(path.read_text()))
