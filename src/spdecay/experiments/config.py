"""The full description of a comparison run (stored as config.json, reused by --resume)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spdecay.experiments.methods import DEFAULT_OPTIMIZERS

# The methods (and which run by default) are the method table's (``methods.py``); the tasks are
# the registry's (``tasks/registry.py``).
PRESETS = ("default", "quick", "evidence", "powered", "powered-long")
# `--backbone` of the sentiment task: the sentence encoders shipped as PyPI wheels.
BACKBONES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}
SCHEDULES = ("linear", "cosine", "constant")


# The fields of the first stored configurations: always part of the fingerprint (fields added
# since count only when set, see ``fingerprint``).
_HASHED_ALWAYS = frozenset((
    "task", "optimizers", "seeds", "first_seed", "lr", "sweep", "steps", "epochs", "batch_size", "quick", "preset",
    "schedule", "device", "checkpoint_every", "model", "train", "val", "test", "ood", "text_column", "label_column",
    "lora_rank", "max_length", "image_size", "train_size", "backbone"))


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
    masks: dict[str, str] = field(default_factory=dict)  # segmentation: split name -> mask folder
    ignore_index: int | None = None  # segmentation masks: the value that counts nowhere (None: 255)
    lora_rank: int = 0
    max_length: int | None = None
    image_size: int | None = None
    train_size: int | None = None  # subsample the ID training set (None: task default)
    backbone: str | None = None  # sentiment task: "minilm" (None: the default) or "mpnet"
    # evaluation-set sizes (None: the preset's); see the task's presets
    val_size: int | None = None
    test_size: int | None = None
    ood_size: int | None = None
    resample_train: bool = False  # each seed draws its own training subset (the same for every method)
    select_seeds: int = 0  # > 0: the first K seeds choose each method's setting, the rest only measure
    select_from: str | None = None  # a pilot folder whose runs of those K seeds are reused (pilot.py)

    def __post_init__(self) -> None:
        if self.quick:
            self.preset = "quick"
        self.quick = self.preset == "quick"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def fingerprint(self) -> str:
        """A short hash of every field: checkpoints carry it, so a run never continues from
        the state of a run made under other settings. A field added later counts only when it
        differs from its default, so adding an option never orphans the checkpoints of a study
        that does not use it (its fingerprint stays the one it was started with)."""
        data = dataclasses.asdict(self)
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(self)}
        kept = {k: v for k, v in data.items() if k in _HASHED_ALWAYS or v != defaults[k]}
        return hashlib.sha256(json.dumps(kept, indent=2, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, path: Path) -> CompareConfig:
        """The configuration stored in ``path``; a damaged file is a one-line error naming it."""
        from spdecay.experiments.errors import RunnerError

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunnerError(f"{path}: not found (not an output folder of spdecay compare)") from None
        except ValueError as exc:
            raise RunnerError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupt") from None
        if not isinstance(data, dict):
            raise RunnerError(f"{path}: not a configuration of spdecay compare")
        try:
            return cls.from_dict(data)
        except TypeError as exc:
            raise RunnerError(f"{path}: not a configuration of spdecay compare ({exc})") from None


def config_differences(a: CompareConfig, b: CompareConfig) -> list[str]:
    """What two configurations of one study may not differ in: everything but the seeds and the
    methods (per-method ``--lr``/``--sweep`` are compared on the methods both ran)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = []
    for key in da:
        if key in ("seeds", "first_seed", "optimizers", "select_from"):
            continue
        if key in ("lr", "sweep"):
            common = set(a.optimizers) & set(b.optimizers)
            va = {m: v for m, v in da[key].items() if m in common}
            vb = {m: v for m, v in db[key].items() if m in common}
        else:
            va, vb = da[key], db[key]
        if va != vb:
            out.append(f"{key} ({va!r} vs {vb!r})")
    return out
