"""Turn command-line options into a validated ``CompareConfig`` (before anything heavy
is loaded, so bad options fail in well under a second)."""

from __future__ import annotations

import math

from spdecay.experiments.config import BACKBONES, PRESETS, SCHEDULES, CompareConfig
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.protocol import parse_lr, parse_optimizers, parse_sweeps


def _positive(option: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is not None and not math.isfinite(value):
        raise RunnerError(f"{option} {value}: must be a finite number")
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


def _mask_pairs(items: list[str]) -> dict[str, str]:
    """``--masks DIR`` (the training images' masks) or ``--masks SPLIT=DIR`` (val, test or an OOD name)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = (name.strip(), path.strip()) if sep else ("train", item.strip())
        if not name or not path:
            raise RunnerError(f"--masks {item!r}: expected DIR (training masks) or SPLIT=DIR")
        if name in out:
            raise RunnerError(f"--masks {item!r}: masks for {name!r} are given twice")
        out[name] = path
    return out


def config_from_options(*, task, optimizers, lr, steps, epochs, batch_size, seeds, sweep, quick, device,
                        model, train, val, test, ood, text_column, label_column, lora_rank, max_length,
                        image_size, train_size, checkpoint_every, preset=None, schedule=None,
                        threads=None, first_seed=0, backbone=None, val_size=None, test_size=None,
                        ood_size=None, resample_train=False, select_seeds=0, select_from=None,
                        masks=None, ignore_index=None) -> CompareConfig:
    from spdecay.experiments.methods import DEFAULT_OPTIMIZERS, EVIDENCE_OPTIMIZERS
    from spdecay.experiments.preflight import check_paths
    from spdecay.experiments.tasks.registry import check_config, get_task, task_names

    ood_paths = _ood_pairs(ood)
    check_paths(model=model, train=train, val=val, test=test, ood=ood_paths)  # a missing file is said first
    if preset is not None and preset not in PRESETS:
        raise RunnerError(f"--preset {preset!r}: unknown preset; expected one of {', '.join(PRESETS)}")
    if quick and preset not in (None, "quick"):
        raise RunnerError(f"--quick is --preset quick; it cannot be combined with --preset {preset}")
    preset = "quick" if quick else (preset or "default")
    if schedule is not None and schedule not in SCHEDULES:
        raise RunnerError(f"--schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    _positive("--threads", threads)
    _positive("--first-seed", first_seed, allow_zero=True)
    mask_paths = _mask_pairs(masks or [])
    if mask_paths and task in (None, "custom"):
        task = "segmentation"  # --task custom with --masks: bring-your-own segmentation (its headline: mIoU)
    if (mask_paths or ignore_index is not None) and task != "segmentation":
        raise RunnerError(f"--masks/--ignore-index are for segmentation data (--task custom or segmentation), "
                          f"not --task {task}")
    _positive("--ignore-index", ignore_index, allow_zero=True)
    if task is None:
        task = "custom" if model is not None or train is not None else "sentiment"
    if task not in task_names():
        raise RunnerError(f"--task {task!r}: unknown task; expected one of {', '.join(task_names())}")
    spec = get_task(task)
    if not spec.files and (model or train or val or test or ood):
        raise RunnerError(f"--task {task} uses its embedded model and data; --model/--train/--val/--test/--ood need --task custom")
    if backbone is not None:
        if backbone not in BACKBONES:
            raise RunnerError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
        if backbone not in spec.backbones:
            raise RunnerError(f"--backbone chooses the sentiment task's encoder; --task {task} has its own model")
    if steps is not None and epochs is not None:
        raise RunnerError("give either --steps or --epochs, not both")
    for option, value in (("--steps", steps), ("--epochs", epochs), ("--batch-size", batch_size),
                          ("--seeds", seeds), ("--max-length", max_length), ("--image-size", image_size),
                          ("--train-size", train_size), ("--checkpoint-every", checkpoint_every),
                          ("--val-size", val_size), ("--test-size", test_size), ("--ood-size", ood_size)):
        _positive(option, value)
    _positive("--select-seeds", select_seeds, allow_zero=True)
    _positive("--lora-rank", lora_rank, allow_zero=True)
    if preset not in spec.presets:
        raise RunnerError(f"--preset {preset}: not defined for --task {task} (it has {', '.join(spec.presets)})")
    if optimizers is None:
        full = preset == "evidence" or preset.startswith("powered")
        names = [n for n in (EVIDENCE_OPTIMIZERS if full else DEFAULT_OPTIMIZERS) if spec.supports(n)]
    else:
        names = parse_optimizers(optimizers)
    if seeds is None:
        seeds = spec.presets[preset].seeds
    if select_from is not None:
        from pathlib import Path

        if not select_seeds:
            raise RunnerError("--select-from needs --select-seeds K (the pilot's first K seeds choose)")
        if not (Path(select_from) / "config.json").is_file():
            raise RunnerError(f"--select-from {select_from}: not an output folder of spdecay compare "
                              "(no config.json)")
    if select_seeds and select_from is None and select_seeds >= seeds:
        raise RunnerError(f"--select-seeds {select_seeds}: must be below --seeds {seeds} (the seeds after the "
                          "first K measure; with none left nothing would be confirmed)")
    config = CompareConfig(
        task=task, optimizers=names, seeds=seeds, first_seed=first_seed, preset=preset, schedule=schedule,
        lr=parse_lr(lr, names), sweep=parse_sweeps(sweep, names),
        steps=steps, epochs=epochs, batch_size=batch_size, device=device,
        checkpoint_every=checkpoint_every, model=model, train=train, val=val, test=test,
        ood=ood_paths, text_column=text_column, label_column=label_column, lora_rank=lora_rank,
        max_length=max_length, image_size=image_size, train_size=train_size,
        backbone=None if backbone == "minilm" else backbone, val_size=val_size, test_size=test_size,
        ood_size=ood_size, resample_train=bool(resample_train), select_seeds=select_seeds or 0,
        select_from=None if select_from is None else str(select_from),
        masks=mask_paths, ignore_index=ignore_index,
    )
    check_config(config)  # the device is checked by run_compare (an executor may run elsewhere)
    return config
