"""The full description of a comparison run (stored as config.json, reused by --resume)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Methods with their own optimizer run, and reference rows built from other runs or features:
# probe (frozen features, only the head trains), wise_ft (AdamW's result interpolated with the
# pre-trained weights) and lpft (linear probe, then fine-tune everything, with AdamW).
OPTIMIZERS = ("adamw", "l2sp", "adamspd", "sgdspd", "probe", "wise_ft", "lpft")
DEFAULT_OPTIMIZERS = ("adamw", "l2sp", "adamspd", "probe", "wise_ft")
# The evidence preset adds LP-FT (one more training per grid point; one seed still fits the
# 25-minute budget on 2 CPU cores, measured in docs/results/evidence).
EVIDENCE_OPTIMIZERS = ("adamw", "l2sp", "adamspd", "probe", "wise_ft", "lpft")
PRESETS = ("default", "quick", "evidence")
# `--backbone` of the sentiment task: the sentence encoders shipped as PyPI wheels.
BACKBONES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}
SCHEDULES = ("linear", "cosine", "constant")
# Registered tasks; a new task adds its name here and its defaults/builder in tasks.py.
TASKS = ["sentiment", "digits", "custom", "llm"]


@dataclass
class CompareConfig:
    """Everything that determines the results of ``spdecay compare``.

    ``None`` fields take the preset's defaults for the task (see ``spdecay.experiments.tasks``).
    """

    task: str = "sentiment"
    optimizers: list[str] = field(default_factory=lambda: list(DEFAULT_OPTIMIZERS))
    seeds: int = 1
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (split one study over processes)
    lr: dict[str, float] = field(default_factory=dict)  # per optimizer; missing -> task default
    sweep: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # opt -> hp -> values
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    quick: bool = False  # the old spelling of preset="quick" (kept so stored configs load)
    preset: str = "default"
    schedule: str | None = None  # linear | cosine | constant (None: the preset's)
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
    backbone: str | None = None  # sentiment task: "minilm" (None: the default) or "mpnet"

    def __post_init__(self) -> None:
        if self.quick:
            self.preset = "quick"
        self.quick = self.preset == "quick"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def fingerprint(self) -> str:
        """A short hash of every field: checkpoints carry it, so a run never continues from
        the state of a run made under other settings."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, path: Path) -> CompareConfig:
        return cls.from_dict(json.loads(path.read_text()))
