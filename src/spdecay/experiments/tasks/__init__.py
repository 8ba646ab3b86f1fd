"""The tasks of ``spdecay compare``: one module (or package) per task, each registering a
``Task`` record in ``registry`` (defaults per preset, builder, supported methods, report hook)."""

from spdecay.experiments.tasks.registry import (
    Task,
    TaskDefaults,
    build_task,
    check_config,
    get_task,
    register,
    task_defaults,
    task_names,
)

__all__ = ["Task", "TaskDefaults", "build_task", "check_config", "get_task", "register", "task_defaults",
           "task_names"]
