"""Turn command-line options into a validated ``CompareConfig`` (before anything heavy
is loaded, so bad options fail in well under a second)."""

from __future__ import annotations

from spdecay.experiments.config import BACKBONES, PRESETS, SCHEDULES, TASKS, CompareConfig
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.protocol import parse_lr, parse_optimizers, parse_sweeps


def _positive(option: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise RunnerError(f"{option} {value}: must be {'non-negative' if allow_zero else 'positive'}")


def _ood_pairs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise RunnerError(f"--ood {item!r}: expected NAME=PATH")
        if name.strip() in out:
            raise RunnerError(f"--ood {item!r}: the name {name.strip()!r} is used twice")
        out[name.strip()] = path.strip()
    return out


def config_from_options(*, task, optimizers, lr, steps, epochs, batch_size, seeds, sweep, quick, device,
                        model, train, val, test, ood, text_column, label_column, lora_rank, max_length,
                        image_size, train_size, checkpoint_every, preset=None, schedule=None,
                        threads=None, first_seed=0, backbone=None) -> CompareConfig:
    if preset is not None and preset not in PRESETS:
        raise RunnerError(f"--preset {preset!r}: unknown preset; expected one of {', '.join(PRESETS)}")
    if quick and preset not in (None, "quick"):
        raise RunnerError(f"--quick is --preset quick; it cannot be combined with --preset {preset}")
    preset = "quick" if quick else (preset or "default")
    if schedule is not None and schedule not in SCHEDULES:
        raise RunnerError(f"--schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    _positive("--threads", threads)
    _positive("--first-seed", first_seed, allow_zero=True)
    if task is None:
        task = "custom" if model is not None else "sentiment"
    if task not in TASKS:
        raise RunnerError(f"--task {task!r}: unknown task; expected one of {', '.join(TASKS)}")
    if task != "custom" and (model or train or val or test or ood):
        raise RunnerError(f"--task {task} uses its embedded model and data; --model/--train/--val/--test/--ood need --task custom")
    if task == "custom" and (model is None or train is None):
        raise RunnerError("--task custom needs --model PATH and --train FILE_OR_FOLDER")
    if backbone is not None:
        if backbone not in BACKBONES:
            raise RunnerError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
        if task != "sentiment":
            raise RunnerError(f"--backbone chooses the sentiment task's encoder; --task {task} has its own model")
    if steps is not None and epochs is not None:
        raise RunnerError("give either --steps or --epochs, not both")
    for option, value in (("--steps", steps), ("--epochs", epochs), ("--batch-size", batch_size),
                          ("--seeds", seeds), ("--max-length", max_length), ("--image-size", image_size),
                          ("--train-size", train_size), ("--checkpoint-every", checkpoint_every)):
        _positive(option, value)
    _positive("--lora-rank", lora_rank, allow_zero=True)
    from spdecay.experiments.config import DEFAULT_OPTIMIZERS, EVIDENCE_OPTIMIZERS
    from spdecay.experiments.tasks import PRESET_DEFAULTS

    if optimizers is None:
        optimizers = ",".join(EVIDENCE_OPTIMIZERS if preset == "evidence" else DEFAULT_OPTIMIZERS)
    if seeds is None:
        seeds = PRESET_DEFAULTS[preset][task].seeds if task in PRESET_DEFAULTS[preset] else 1
    names = parse_optimizers(optimizers)
    return CompareConfig(
        task=task, optimizers=names, seeds=seeds, first_seed=first_seed, preset=preset, schedule=schedule, lr=parse_lr(lr, names), sweep=parse_sweeps(sweep, names),
        steps=steps, epochs=epochs, batch_size=batch_size, device=device,
        checkpoint_every=checkpoint_every, model=model, train=train, val=val, test=test,
        ood=_ood_pairs(ood), text_column=text_column, label_column=label_column, lora_rank=lora_rank,
        max_length=max_length, image_size=image_size, train_size=train_size,
        backbone=None if backbone == "minilm" else backbone,
    )
