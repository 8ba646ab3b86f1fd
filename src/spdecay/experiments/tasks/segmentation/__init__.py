"""The embedded `segmentation` task: EfficientNet-Lite0 (ImageNet) with a new FPN decoder on a
**composed** dense-labelling set (handwritten digits pasted on textured backgrounds, per-pixel
masks; see ``scenes.py``). ID: clean test scenes; OOD: the paper's corruptions of them (fog,
defocus blur, Gaussian noise, brightness, at fixed severities) and a source shift (scenes of
scikit-learn's digits instead of MNIST's). Headline metric: mIoU (selection on ID-validation
mIoU); pixel accuracy and per-class IoU are secondary.

The bring-your-own path (image folder + mask folder + a local Hugging Face semantic-segmentation
model) is ``--task custom --masks ...`` (``files.py``).
"""

from __future__ import annotations

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import Split, TaskData
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.tasks.registry import MIOU, SMOKE, Task, TaskDefaults, register

COMPOSED = ("The data are **composed**, not a real segmentation benchmark: scenes of 2-3 handwritten "
            "digits (MNIST) pasted at random sizes, positions and colours on textured two-colour "
            "backgrounds, with per-pixel masks (5 classes: background and the digits 0, 1, 4, 7). OOD: the "
            "ID test scenes under fog, defocus blur, Gaussian noise and brightness, and scenes composed "
            "from a different source (scikit-learn's 8x8 digits).")
DEFAULT = ("A short run: 3 epochs over 800 scenes at 64 px (75 steps) with the learning rate "
           "decaying to zero; one seed says little about which method is better (use several seeds, "
           "or `--preset evidence`).")
OWN = ("Your own segmentation data and model: one short epoch with the learning rate decaying to zero; "
       "a first look, not evidence about which method is better.")
OWN_EVIDENCE = ("The evidence preset on your data: 8 epochs (warm-up, then cosine decay to 10% of the peak), "
                "three strengths per method, chosen by mean ID-validation mIoU over 3 seeds.")
EVIDENCE = ("The evidence preset: 480 training scenes for 8 epochs (warm-up, then cosine decay to 10% "
            "of the peak), three strengths per method, chosen by mean ID-validation mIoU over 3 seeds.")

METHOD_NOTES = {
    "probe": "a **decoder probe**: the pre-trained backbone is **frozen** (its BatchNorm statistics "
             "stay the checkpoint's); only the new decoder trains, with AdamW decay, for as many steps "
             "as a fine-tuning run",
    "lpft": "the new decoder trained alone for the first 25% of steps (`spdecay.LPFT`, backbone frozen), "
            "then AdamW on everything (decay towards zero)",
}


def check_masks(data: TaskData, ignore_index: int | None = None) -> None:
    """Every split non-empty, masks of the image's batch shape, every label a class or ignored."""
    n = len(data.classes)
    for split in (data.train, data.val, data.test, *data.ood.values()):
        if len(split) == 0:
            raise RunnerError(f"data split '{split.name}' is empty")
        labels = split.labels
        if ignore_index is not None:
            labels = labels[labels != ignore_index]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise RunnerError(f"data split '{split.name}' has mask values outside 0..{n - 1}")


# Gaussian noise at the digits task's sigma 0.3 leaves every pixel classifier at chance (a trial
# AdamW run: mIoU 0.013, pixel accuracy 0.03 against 0.41-0.44 on the other shifts), so it
# measured nothing; this task uses sigma 0.12. The other corruptions keep the digits severities.
NOISE_SIGMA = 0.12


def corruptions() -> dict:
    from functools import partial

    from spdecay.experiments.tasks.corruptions import CORRUPTIONS, gaussian_noise

    return {**CORRUPTIONS, "gaussian_noise": partial(gaussian_noise, sigma=NOISE_SIGMA)}


def load_segmentation_task(train: int | None, val: int, test: int, ood: int | None) -> TaskData:
    from spdecay.experiments.tasks.segmentation.scenes import CLASSES, load_scenes

    splits = load_scenes(train, val, test, ood)
    test_s = splits["test"]
    if ood is not None and ood < len(test_s):
        base = test_s.subset(range(ood))
    else:
        base = test_s
    ood_sets = {"sklearn_digits": splits["sklearn_digits"]}
    for name, corrupt in corruptions().items():
        ood_sets[name] = Split(name, corrupt(base.inputs), base.labels.clone())
    data = TaskData("segmentation", list(CLASSES), splits["train"], splits["val"], test_s, ood_sets)
    check_masks(data)
    return data


def own_data(config: CompareConfig) -> bool:
    """Bring your own (``--model`` + ``--train`` + ``--masks``) rather than the embedded scenes."""
    return bool(config.model or config.train or config.masks)


def check(config: CompareConfig) -> None:
    if own_data(config):
        if not (config.model and config.train and config.masks.get("train")):
            raise RunnerError("segmentation with your own data needs --model HF_FOLDER, --train IMAGES and "
                              "--masks MASKS (class-index PNGs with the images' file stems)")
        if config.lora_rank:
            raise RunnerError("--lora-rank is not supported for segmentation models")
        from pathlib import Path

        for name, folder in config.masks.items():  # before any output folder is made
            if not Path(folder).expanduser().is_dir():
                key = "" if name == "train" else f"{name}="
                raise RunnerError(f"--masks {key}{folder}: no such mask folder")
        return
    if config.lora_rank:
        raise RunnerError("--lora-rank needs a Hugging Face model (--task custom --model PATH); "
                          "the segmentation task uses EfficientNet")


def defaults(config: CompareConfig, d: TaskDefaults) -> TaskDefaults:
    """Your own data: every training image (or --train-size), 10% held out for validation and
    test unless given, every OOD image; the model's input size unless --image-size."""
    from dataclasses import replace

    if not own_data(config):
        return d
    return replace(d, train=config.train_size, val=0, test=0, ood=None, image_size=config.image_size or 0,
                   lr_adam=6e-5, epochs=1.0 if config.preset == "default" else d.epochs)


def probe_steps(config: CompareConfig, d: TaskDefaults, n_train: int) -> int:
    """The decoder probe trains as many steps as a fine-tuning run of this configuration."""
    from spdecay.experiments.training.schedule import total_steps_for

    batch = config.batch_size or d.batch_size
    steps = config.steps if config.steps is not None else (None if config.epochs is not None else d.steps)
    epochs = config.epochs if config.epochs is not None else d.epochs
    return total_steps_for(n_train, batch, steps, epochs)


def build(config: CompareConfig, d: TaskDefaults, device):
    from spdecay.experiments.tasks.segmentation.model import SegmentationModel
    from spdecay.experiments.tasks.segmentation.network import efficientnet_lite0_segmentation
    from spdecay.experiments.tasks.segmentation.scenes import SIZE

    check(config)
    if own_data(config):
        from spdecay.experiments.tasks.segmentation.files import build_custom

        return build_custom(config, d, device)
    data = load_segmentation_task(d.train, d.val, d.test, d.ood)
    image_size = config.image_size or d.image_size or SIZE
    net = efficientnet_lite0_segmentation(len(data.classes), image_size)
    # The weights expect inputs (x * 255 - 127) / 128, i.e. mean 127/255 and std 128/255.
    model = SegmentationModel(net, ["decode_head"], device, image_size=image_size, mean=[127 / 255] * 3,
                              std=[128 / 255] * 3, hf=False, probe_steps=probe_steps(config, d, len(data.train)))
    model.name = "EfficientNet-Lite0 (ImageNet) + new FPN decoder"
    model.reading = "a new FPN decoder over five backbone stages; logits upsampled bilinearly to the mask size"
    return data, model


def statement(config: CompareConfig, d: TaskDefaults) -> str:
    if own_data(config):
        return {"default": OWN, "evidence": OWN_EVIDENCE}.get(config.preset, d.statement)
    return f"{d.statement}\n\n{COMPOSED}"


def report_section(config: CompareConfig, records: list[dict]) -> str:
    from spdecay.experiments.tasks.segmentation.report import per_class_section
    from spdecay.experiments.tasks.segmentation.scenes import CLASSES

    return per_class_section(records, None if own_data(config) else CLASSES)


TASK = register(Task(
    "segmentation", "EfficientNet-Lite0 + new FPN decoder on composed digit scenes (mIoU) -> corruptions + source shift",
    presets={
        "default": TaskDefaults(800, 200, 300, 300, 32, 3.0, None, 2e-3, 2e-2, image_size=64, eval_batch_size=100,
                                checkpoint_every=50, statement=DEFAULT),
        "quick": TaskDefaults(96, 32, 32, 32, 16, None, 6, 1e-3, 2e-2, image_size=64, eval_batch_size=64,
                              checkpoint_every=3, statement=SMOKE),
        "evidence": TaskDefaults(480, 300, 300, 300, 32, 8.0, None, 1e-3, 2e-2, image_size=64, eval_batch_size=100,
                                 schedule="cosine", checkpoint_every=40, seeds=3, grid="evidence", statement=EVIDENCE),
    },
    build=build, check=check, defaults=defaults, statement=statement, report_section=report_section,
    method_notes=METHOD_NOTES, headline=MIOU, files=True,
))
