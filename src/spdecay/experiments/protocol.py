"""The experimental protocol: which runs to make, and which hyper-parameters to report.

Each method gets a grid of regularisation strengths (``weight_decay``) and optionally
learning rates, all grids of the same size (the same tuning budget for every method). For every
seed each grid point is trained once; per method the grid point with the best mean ID
*validation* balanced accuracy over seeds is reported (test and OOD numbers never influence the
choice). A derived method (``wise_ft``) has its base method's grid: each of its points is made
from that run. The grids, default learning rates and kinds are the method table's
(``spdecay.experiments.methods``).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.methods import METHODS, optimizer_names, order

SWEEPABLE = ("weight_decay", "lr")
SELECTION_METRIC = "balanced_accuracy"


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    seed: int
    weight_decay: float
    lr: float
    alpha: float | None = None  # WiSE-FT's mixing weight where it is swept (evaluation only)

    @property
    def run_id(self) -> str:
        tail = "" if self.alpha is None else f"-alpha{self.alpha:g}"
        return f"{self.optimizer}-seed{self.seed}-wd{self.weight_decay:g}-lr{self.lr:g}{tail}"

    @property
    def hparams(self) -> dict[str, float]:
        out = {"weight_decay": self.weight_decay, "lr": self.lr}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        return out


def parse_optimizers(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise RunnerError(f"--optimizers {text!r}: give at least one of {', '.join(optimizer_names())}")
    for n in names:
        if n not in optimizer_names():
            raise RunnerError(f"--optimizers: unknown optimizer {n!r}; expected some of {', '.join(optimizer_names())}")
    if len(set(names)) != len(names):
        raise RunnerError(f"--optimizers {text!r}: an optimizer is listed twice")
    for n in names:
        base = METHODS[n].derived_from
        if base is not None and base not in names:
            raise RunnerError(f"--optimizers: {n} is made from {METHODS[base].label}'s fine-tuned models; "
                              f"add {base} to the list")
    return names


def _floats(option: str, text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise RunnerError(f"{option}: {part.strip()!r} is not a number") from None
        if not math.isfinite(values[-1]):
            raise RunnerError(f"{option}: {part.strip()!r} is not a finite number")
    if any(v < 0 for v in values) or not values:
        raise RunnerError(f"{option}: values must be non-negative numbers, got {text!r}")
    return values


def parse_sweeps(items: list[str], optimizers: list[str]) -> dict[str, dict[str, list[float]]]:
    """``weight_decay=0.5,1,2`` (every optimizer), ``adamspd.weight_decay=0.5,1`` (one), or
    ``default`` (each method's ``sweep`` grid in the method table)."""
    out: dict[str, dict[str, list[float]]] = {}
    for item in items:
        if item.strip() == "default":
            for name in optimizers:
                if "sweep" in METHODS[name].grids:
                    out.setdefault(name, {})["weight_decay"] = METHODS[name].grid("sweep")
            continue
        match = re.fullmatch(r"\s*(?:(\w+)\.)?(\w+)\s*=\s*(.+)", item)
        if not match:
            raise RunnerError(f"--sweep {item!r}: expected NAME=V1,V2,... (e.g. weight_decay=0.5,1,2)")
        opt, key, values = match.groups()
        if opt in METHODS and METHODS[opt].derived_from:
            base = METHODS[opt].derived_from
            raise RunnerError(f"--sweep {item!r}: {opt} takes {base}'s grid (it is made from those runs); "
                              f"sweep {base} instead")
        if key not in SWEEPABLE:
            raise RunnerError(f"--sweep {item!r}: unknown hyper-parameter {key!r}; can sweep {', '.join(SWEEPABLE)}")
        if opt is not None and opt not in optimizers:
            raise RunnerError(f"--sweep {item!r}: optimizer {opt!r} is not among --optimizers {','.join(optimizers)}")
        parsed = _floats(f"--sweep {item}", values)
        if key == "lr" and any(v == 0 for v in parsed):
            raise RunnerError(f"--sweep {item!r}: a learning rate must be positive")
        for name in [opt] if opt else [n for n in optimizers if not METHODS[n].derived_from]:
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
        if name and name.strip() not in optimizer_names():
            raise RunnerError(f"--lr {text!r}: unknown optimizer {name.strip()!r}")
        lr = _floats("--lr", value)[0]
        if lr <= 0:
            raise RunnerError(f"--lr {text!r}: a learning rate must be positive")
        for t in targets:
            out[t] = lr
    return out


def default_grids(grid: str, names) -> dict[str, list[float]]:
    """Each method's strengths under the grid ``grid`` of the method table (``single``,
    ``sweep``, ``evidence``)."""
    return {n: METHODS[n].grid(grid) for n in names if METHODS[n].grids}


def default_lrs(lr_adam: float, lr_sgd: float, names=None) -> dict[str, float]:
    """Each method's default learning rate: its table entry's number, or the task's rate of
    its family (``adam`` / ``sgd``)."""
    out = {}
    for n in names if names is not None else METHODS:
        lr = METHODS[n].lr
        out[n] = lr_adam if lr == "adam" else lr_sgd if lr == "sgd" else float(lr)
    return out


def grids(config: CompareConfig, default_grids: dict[str, list[float]], default_lr: dict[str, float],
          references=(), lr_grids: dict[str, list[float]] | None = None,
          alphas: dict[str, list[float]] | None = None) -> dict[str, list[tuple]]:
    """Per method, the (weight_decay, lr) points to try; the trained methods' grids all the
    same length (a derived method takes its base's points, times its ``alphas`` where it sweeps
    them at evaluation only: ``(weight_decay, lr, alpha)``; a reference row has one point).
    ``lr_grids``: the learning rates a method sweeps by default (unless --lr/--sweep lr)."""
    lr_grids, alphas = lr_grids or {}, alphas or {}
    out: dict[str, list[tuple]] = {n: [(0.0, 0.0)] for n in references}
    names = [n for n in config.optimizers if n not in out]
    for name in names:
        if METHODS[name].derived_from:
            continue
        sweep = config.sweep.get(name, {})
        wds = sweep.get("weight_decay", default_grids[name])
        if "lr" in sweep:
            lrs = sweep["lr"]
        elif name in config.lr or name not in lr_grids:
            lrs = [config.lr.get(name, default_lr[name])]
        else:
            lrs = list(lr_grids[name])
        out[name] = list(itertools.product(wds, lrs))
    for name in names:
        base = METHODS[name].derived_from
        if base:
            out[name] = [(*p, a) for p in out[base] for a in alphas[name]] if alphas.get(name) else list(out[base])
    sizes = {name: len(out[name]) for name in names if not METHODS[name].derived_from}
    if len(set(sizes.values())) > 1:
        raise RunnerError(
            f"--sweep: every optimizer needs the same number of settings (equal tuning budget), got {sizes}"
        )
    return {name: out[name] for name in [*references, *names]}


def plan(config: CompareConfig, default_grids, default_lr, references=(), lr_grids=None, alphas=None) -> list[RunSpec]:
    """Every run of the study, seed by seed: the task's reference rows first, then the methods
    in ``--optimizers`` order, each over its grid."""
    points = grids(config, default_grids, default_lr, references, lr_grids, alphas)
    return [
        RunSpec(name, seed, *point)
        for seed in range(config.first_seed, config.first_seed + config.seeds)
        for name in points
        for point in points[name]
    ]


# -- selection seeds and confirmatory seeds (--select-seeds K) ---------------------------------
def selection_seeds(config: CompareConfig) -> list[int]:
    """The seeds that choose each method's setting: the first K seeds of the study under
    --select-seeds K, the first K of the pilot's under --select-from (so a confirmatory study
    split over processes by --first-seed shares one selection); all seeds otherwise."""
    k = getattr(config, "select_seeds", 0)
    if k and getattr(config, "select_from", None):
        first = _pilot_first_seed(str(config.select_from))
        return list(range(first, first + k))
    k = k or config.seeds
    return list(range(config.first_seed, config.first_seed + min(k, config.seeds)))


@functools.lru_cache(maxsize=8)
def _pilot_first_seed(folder: str) -> int:
    from pathlib import Path

    return CompareConfig.load(Path(folder) / "config.json").first_seed


def seed_role(config: CompareConfig, seed: int) -> str:
    """``selection`` (the seed chooses settings) or ``confirmation`` (it only measures)."""
    return "selection" if seed in selection_seeds(config) else "confirmation"


def setting_key(r: dict) -> tuple:
    """(method, weight_decay, lr, alpha) of a record: one grid point."""
    h = r["hparams"]
    return (r["optimizer"], h["weight_decay"], h["lr"], h.get("alpha"))


def confirmatory_plan(config: CompareConfig, specs: list[RunSpec], records: list[dict]) -> list[RunSpec]:
    """--select-seeds K: the selection seeds run every grid point; once they are all done, each
    confirmatory seed runs only the setting its method chose on the selection seeds' ID
    validation (a method whose selection runs all diverged is not measured)."""
    chosen_by = set(selection_seeds(config))
    first = [s for s in specs if s.seed in chosen_by]
    done = {r["run_id"] for r in records}
    if any(s.run_id not in done for s in first):
        return first  # the confirmatory runs are planned once the selection is complete
    best = select([{**r, "role": "selection"} for r in records if r["seed"] in chosen_by])
    wanted = {(n, c["weight_decay"], c["lr"], c.get("alpha")) for n, c in best.items()}
    rest = [s for s in specs if s.seed not in chosen_by
            and (s.optimizer, s.weight_decay, s.lr, s.alpha) in wanted]
    return first + rest


@dataclass(frozen=True)
class RunUnit:
    """The smallest independent piece of work an executor runs: one run (``spec``), and the
    rows derived from its trained model (WiSE-FT from AdamW). ``spec_wanted`` is False when
    the run's own row is already on disk and it is only retrained for a derived row."""

    spec: RunSpec
    derived: tuple[RunSpec, ...] = ()
    spec_wanted: bool = True

    @property
    def run_ids(self) -> list[str]:
        return ([self.spec.run_id] if self.spec_wanted else []) + [d.run_id for d in self.derived]


def units(todo: list[RunSpec]) -> list[RunUnit]:
    """Group the runs still to do into units: a derived row goes with the run it is made from
    (which is trained again if only the derived row is missing)."""
    pending = {s.run_id for s in todo}
    derived_by_base: dict[str, list[RunSpec]] = {}
    for s in todo:
        base = METHODS[s.optimizer].derived_from
        if base:
            derived_by_base.setdefault(RunSpec(base, s.seed, s.weight_decay, s.lr).run_id, []).append(s)
    out, placed = [], set()
    for s in todo:
        base = METHODS[s.optimizer].derived_from
        spec = RunSpec(base, s.seed, s.weight_decay, s.lr) if base else s
        if spec.run_id in placed:
            continue
        placed.add(spec.run_id)
        out.append(RunUnit(spec, tuple(derived_by_base.get(spec.run_id, ())), spec.run_id in pending))
    return out


def select(records: list[dict], metric: str | None = None) -> dict[str, dict]:
    """Per optimizer: the hyper-parameters with the best mean ID-validation ``metric`` (default:
    the task's headline, e.g. balanced accuracy or mIoU) over seeds (ties: the first grid point),
    and that setting's records, in the method table's order. Diverged runs are left out.

    Records with a ``role`` (--select-seeds): only ``selection`` records choose; the chosen
    setting's ``confirmation`` records are the ones reported (``records``; those that chose are
    ``selection_records``). Until a confirmatory run exists the selection records are reported
    (``confirmed`` False)."""
    if metric is None:
        from spdecay.experiments.headline import headline_for

        metric = headline_for(records).key
    by_key: dict[tuple, list[dict]] = {}
    confirm: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("diverged"):  # a non-finite loss: no result to select or average
            continue
        (confirm if r.get("role") == "confirmation" else by_key).setdefault(setting_key(r), []).append(r)
    best: dict[str, dict] = {}
    for (name, wd, lr, alpha), recs in by_key.items():  # insertion order = grid order
        score = sum(r["val"][metric] for r in recs) / len(recs)
        if name not in best or score > best[name]["val_score"]:
            best[name] = {"weight_decay": wd, "lr": lr, "alpha": alpha, "val_score": score, "records": recs,
                          "selection_records": recs, "confirmed": False}
    for name, choice in best.items():
        measured = confirm.get((name, choice["weight_decay"], choice["lr"], choice["alpha"]))
        if measured:
            choice.update(records=measured, confirmed=True)
    return {name: best[name] for name in order(best)}  # the method table's order: reports line up
