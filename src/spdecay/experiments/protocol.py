"""The experimental protocol: which runs to make, and which hyper-parameters to report.

Each method gets a grid of regularisation strengths (``weight_decay``) and optionally
learning rates, all grids of the same size (the same tuning budget for every method). For every
seed each grid point is trained once; per method the grid point with the best mean ID
*validation* balanced accuracy over seeds is reported (test and OOD numbers never influence the
choice). ``wise_ft`` has AdamW's grid: each of its points interpolates that AdamW run.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from spdecay.experiments.config import OPTIMIZERS, CompareConfig
from spdecay.experiments.errors import RunnerError

SWEEPABLE = ("weight_decay", "lr")
# `--sweep default`: two strengths per method around each one's usual value (AdamW decoupled
# decay, L2-SP penalty weight, SPD projection strength).
SWEEP_GRIDS: dict[str, list[float]] = {
    "adamw": [0.01, 0.1],
    "l2sp": [0.1, 1.0],
    "adamspd": [0.5, 1.0],
    "sgdspd": [0.5, 1.0],
    "probe": [0.01, 0.1],
    "lpft": [0.01, 0.1],
}
PROBE_LR = 1e-3  # the probe trains a linear head on fixed features: a larger rate than fine-tuning
SELECTION_METRIC = "balanced_accuracy"


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    seed: int
    weight_decay: float
    lr: float

    @property
    def run_id(self) -> str:
        return f"{self.optimizer}-seed{self.seed}-wd{self.weight_decay:g}-lr{self.lr:g}"

    @property
    def hparams(self) -> dict[str, float]:
        return {"weight_decay": self.weight_decay, "lr": self.lr}


def parse_optimizers(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise RunnerError(f"--optimizers {text!r}: give at least one of {', '.join(OPTIMIZERS)}")
    for n in names:
        if n not in OPTIMIZERS:
            raise RunnerError(f"--optimizers: unknown optimizer {n!r}; expected some of {', '.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise RunnerError(f"--optimizers {text!r}: an optimizer is listed twice")
    if "wise_ft" in names and "adamw" not in names:
        raise RunnerError("--optimizers: wise_ft interpolates AdamW's fine-tuned models; add adamw to the list")
    return names


def _floats(option: str, text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise RunnerError(f"{option}: {part.strip()!r} is not a number") from None
    if any(v < 0 for v in values) or not values:
        raise RunnerError(f"{option}: values must be non-negative numbers, got {text!r}")
    return values


def parse_sweeps(items: list[str], optimizers: list[str]) -> dict[str, dict[str, list[float]]]:
    """``weight_decay=0.5,1,2`` (every optimizer), ``adamspd.weight_decay=0.5,1`` (one), or
    ``default`` (``SWEEP_GRIDS``)."""
    out: dict[str, dict[str, list[float]]] = {}
    for item in items:
        if item.strip() == "default":
            for name in optimizers:
                if name in SWEEP_GRIDS:
                    out.setdefault(name, {})["weight_decay"] = list(SWEEP_GRIDS[name])
            continue
        match = re.fullmatch(r"\s*(?:(\w+)\.)?(\w+)\s*=\s*(.+)", item)
        if not match:
            raise RunnerError(f"--sweep {item!r}: expected NAME=V1,V2,... (e.g. weight_decay=0.5,1,2)")
        opt, key, values = match.groups()
        if opt == "wise_ft":
            raise RunnerError(f"--sweep {item!r}: wise_ft takes AdamW's grid (it interpolates those runs); sweep adamw instead")
        if key not in SWEEPABLE:
            raise RunnerError(f"--sweep {item!r}: unknown hyper-parameter {key!r}; can sweep {', '.join(SWEEPABLE)}")
        if opt is not None and opt not in optimizers:
            raise RunnerError(f"--sweep {item!r}: optimizer {opt!r} is not among --optimizers {','.join(optimizers)}")
        parsed = _floats(f"--sweep {item}", values)
        if key == "lr" and any(v == 0 for v in parsed):
            raise RunnerError(f"--sweep {item!r}: a learning rate must be positive")
        for name in [opt] if opt else [n for n in optimizers if n != "wise_ft"]:
            out.setdefault(name, {})[key] = parsed
    return out


def parse_lr(text: str | None, optimizers: list[str]) -> dict[str, float]:
    """``--lr 1e-4`` (every optimizer) or ``--lr adamw=1e-4,sgdspd=0.02``."""
    if text is None:
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.rpartition("=")
        targets = [name.strip()] if name else optimizers
        if name and name.strip() not in OPTIMIZERS:
            raise RunnerError(f"--lr {text!r}: unknown optimizer {name.strip()!r}")
        lr = _floats("--lr", value)[0]
        if lr <= 0:
            raise RunnerError(f"--lr {text!r}: a learning rate must be positive")
        for t in targets:
            out[t] = lr
    return out


def grids(config: CompareConfig, default_grids: dict[str, list[float]], default_lr: dict[str, float]) -> dict[str, list[tuple[float, float]]]:
    """Per optimizer, the (weight_decay, lr) points to try; all the same length."""
    out = {}
    for name in config.optimizers:
        if name == "wise_ft":
            continue
        sweep = config.sweep.get(name, {})
        wds = sweep.get("weight_decay", default_grids[name])
        lrs = sweep.get("lr", [config.lr.get(name, default_lr[name])])
        out[name] = list(itertools.product(wds, lrs))
    if "wise_ft" in config.optimizers:
        out["wise_ft"] = list(out["adamw"])
    out = {name: out[name] for name in config.optimizers}
    sizes = {name: len(points) for name, points in out.items()}
    if len(set(sizes.values())) > 1:
        raise RunnerError(
            f"--sweep: every optimizer needs the same number of settings (equal tuning budget), got {sizes}"
        )
    return out


def plan(config: CompareConfig, default_grids, default_lr) -> list[RunSpec]:
    points = grids(config, default_grids, default_lr)
    return [
        RunSpec(name, seed, wd, lr)
        for seed in range(config.first_seed, config.first_seed + config.seeds)
        for name in config.optimizers
        for wd, lr in points[name]
    ]


def select(records: list[dict], metric: str = SELECTION_METRIC) -> dict[str, dict]:
    """Per optimizer: the hyper-parameters with the best mean ID-validation ``metric`` (balanced
    accuracy) over seeds (ties: the first grid point), and that setting's records."""
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["optimizer"], r["hparams"]["weight_decay"], r["hparams"]["lr"])
        by_key.setdefault(key, []).append(r)
    best: dict[str, dict] = {}
    for (name, wd, lr), recs in by_key.items():  # insertion order = grid order
        score = sum(r["val"][metric] for r in recs) / len(recs)
        if name not in best or score > best[name]["val_score"]:
            best[name] = {"weight_decay": wd, "lr": lr, "val_score": score, "records": recs}
    return best
