"""The task registry: every ``--task`` is one ``Task`` record, registered by its module.

A task declares its defaults per preset (``TaskDefaults``), how to build its data and model
(``build(config, defaults, device) -> (TaskData, TaskModel)``), which methods it supports, the
reference rows it adds to every plan, option checks made before anything loads, and an optional
report section. The runner reads nothing else about a task: it has no task-specific branch.

A new task is a module (or package) under ``spdecay/experiments/tasks/`` that calls
``register(Task(...))`` at import, plus its module name in ``BUILTIN``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError

if TYPE_CHECKING:
    import torch

    from spdecay.experiments.data import TaskData
    from spdecay.experiments.models import TaskModel

# The built-in tasks' modules, imported (cheaply: heavy imports happen inside ``build``) the
# first time the registry is read.
BUILTIN = ("sentiment", "digits", "custom", "llm", "segmentation")

SMOKE = ("This is a smoke-scale run: a handful of steps on small subsets. It checks that the "
         "pipeline works; its numbers say nothing about which method is better.")
FIRST_LOOK = ("A first look: one short epoch with the learning rate decaying to zero, so the model "
              "barely moves from its pre-trained weights; use `--preset evidence` to compare methods.")
EVIDENCE = ("The evidence preset: a small training set for many epochs at a high learning rate "
            "(warm-up, then cosine decay to 10% of the peak), the regime where plain fine-tuning "
            "drifts; three strengths per method, chosen by mean ID-validation balanced accuracy.")


@dataclass(frozen=True)
class TaskDefaults:
    """A task's settings under one preset (command-line options override them)."""

    train: int | None  # training rows (None: all)
    val: int
    test: int
    ood: int | None  # rows per OOD set (None: all)
    batch_size: int
    epochs: float | None
    steps: int | None
    lr_adam: float  # default learning rate of the Adam-family methods (the method table's "adam")
    lr_sgd: float  # ... and of SGD + SPD ("sgd")
    max_length: int = 64
    image_size: int = 64
    eval_batch_size: int = 256
    checkpoint_every: int = 50
    schedule: str = "linear"  # linear: warm-up then linear decay to zero; cosine: to a floor
    seeds: int = 1
    grid: str = "single"  # which grid of every method's table entry: single, sweep or evidence
    statement: str = ""  # said at the top of the report
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific settings (llm: LoRA rank, ...)


@dataclass(frozen=True)
class Headline:
    """A task's headline metric (``spdecay.experiments.headline`` reads it off the records' task).

    ``key``: the field of every split's metrics dict; ``label``: its name in sentences;
    ``short``: its name in table columns; ``secondary``: (key, short name) of the columns shown
    after it; ``definition``: the protocol sentence that says what it is; ``brief``: its name in
    the log line of a finished run."""

    key: str
    label: str
    short: str
    secondary: tuple[tuple[str, str], ...] = ()
    definition: str = ""
    brief: str = ""  # its name in the one-line log of a finished run


BALANCED_ACCURACY = Headline(
    "balanced_accuracy", "balanced accuracy", "bal. acc", (("accuracy", "acc"),),
    "Balanced accuracy (mean recall over the classes) is the headline for validation, ID test and every OOD "
    "set; plain accuracy is a secondary column (OOD sets can be imbalanced).", "bal",
)

MIOU = Headline(
    "miou", "mIoU", "mIoU", (("accuracy", "pixel acc"),),  # a segmentation split's "accuracy" is per pixel
    "mIoU (per class, intersection over union of the predicted and true pixels over the whole split, "
    "averaged over the classes present in the split's labels or predictions) is the headline for "
    "validation, ID test and every OOD set; pixel accuracy is a secondary column (the background class "
    "dominates it).", "mIoU",
)


Builder = Callable[[CompareConfig, TaskDefaults, "torch.device"], tuple["TaskData", "TaskModel"]]


@dataclass(frozen=True)
class Task:
    """One ``--task``.

    ``presets``: its ``TaskDefaults`` per preset name (a preset it lacks is refused up front).
    ``methods``: the method names it supports (None: every method of the table whose needs it
    meets). ``references``: reference rows added to every plan (``pretrained``). ``check``:
    option checks run before anything loads. ``defaults``: adjusts the preset's defaults to the
    config (e.g. ``--max-length``). ``report_section(config, records) -> markdown`` goes after
    the comparison table; ``statement(config, defaults)`` replaces the preset's statement.
    """

    name: str
    summary: str  # one line for --task help
    presets: dict[str, TaskDefaults]
    build: Builder
    has_head: bool = True  # it trains a new classification head (LP-FT needs one)
    files: bool = False  # it takes --model/--train/--val/--test/--ood (otherwise its data is embedded)
    backbones: tuple[str, ...] = ()  # the --backbone names it accepts
    methods: tuple[str, ...] | None = None
    references: tuple[str, ...] = ()
    check: Callable[[CompareConfig], None] | None = None
    defaults: Callable[[CompareConfig, TaskDefaults], TaskDefaults] | None = None
    report_section: Callable[[CompareConfig, list[dict]], str] | None = None
    statement: Callable[[CompareConfig, TaskDefaults], str] | None = None
    method_notes: dict[str, str] = field(default_factory=dict)  # task-specific "what it regularises"
    resample_train: bool = False  # its build sets ``TaskData.train_pool`` (--resample-train works)
    headline: Headline = BALANCED_ACCURACY  # the metric selection, paired differences and plots use

    def supports(self, method_name: str) -> bool:
        from spdecay.experiments.methods import METHODS

        if self.methods is not None:
            return method_name in self.methods
        return not METHODS[method_name].needs_head or self.has_head


_TASKS: dict[str, Task] = {}
_loaded = False


def register(task: Task) -> Task:
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN:
            importlib.import_module(f"spdecay.experiments.tasks.{name}")


def task_names() -> list[str]:
    _load()
    return list(_TASKS)


def get_task(name: str) -> Task:
    _load()
    if name not in _TASKS:
        raise RunnerError(f"--task {name!r}: unknown task; expected one of {', '.join(_TASKS)}")
    return _TASKS[name]


def task_defaults(config: CompareConfig) -> TaskDefaults:
    """The preset's defaults for the config's task, with the options that change them applied."""
    task = get_task(config.task)
    if config.preset not in task.presets:
        raise RunnerError(f"--preset {config.preset}: not defined for --task {config.task} "
                          f"(it has {', '.join(task.presets)})")
    base = task.presets[config.preset]
    if config.train_size is not None:
        base = replace(base, train=config.train_size)
    for option, name in (("val_size", "val"), ("test_size", "test"), ("ood_size", "ood")):
        if getattr(config, option, None) is not None:  # --val-size / --test-size / --ood-size
            base = replace(base, **{name: getattr(config, option)})
    if task.defaults is not None:
        base = task.defaults(config, base)
    return base


def check_config(config: CompareConfig) -> None:
    """Everything about the task that can be refused before anything loads."""
    task = get_task(config.task)
    if config.preset not in task.presets:
        raise RunnerError(f"--preset {config.preset}: not defined for --task {config.task} "
                          f"(it has {', '.join(task.presets)})")
    unsupported = [m for m in config.optimizers if not task.supports(m)]
    if unsupported:
        raise RunnerError(f"--optimizers {','.join(unsupported)}: not available for --task {config.task}"
                          + ("" if task.has_head else " (it trains no new head)"))
    if getattr(config, "resample_train", False) and not task.resample_train:
        raise RunnerError(f"--resample-train: --task {config.task} has no training pool to draw from per seed")
    if task.check is not None:
        task.check(config)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunnerError(f"--device {name}: not a torch device (expected cpu, cuda, cuda:N, mps or auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunnerError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunnerError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RunnerError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RunnerError(f"--device {name}: not supported (expected cpu, cuda, cuda:N, mps or auto)")
    return device


def build_task(config: CompareConfig, device: torch.device) -> tuple[TaskData, TaskModel]:
    """Load the data first (cheap, fails fast on bad files), then the model."""
    return get_task(config.task).build(config, task_defaults(config), device)
