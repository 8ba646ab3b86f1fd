"""Bring your own segmentation data and model: image folders with parallel mask folders and a
local Hugging Face semantic-segmentation model (``AutoModelForSemanticSegmentation``, e.g. a
SegFormer or UperNet folder; ``trust_remote_code=False``).

``--train IMAGES --masks MASKS`` (and ``--val``/``--test``/``--ood NAME=IMAGES`` with
``--masks val=DIR``, ``--masks test=DIR``, ``--masks NAME=DIR``): every image has a mask with
the same file stem. Masks are single-channel class-index PNGs (mode L, P, I or 1: the pixel
value is the class); ``--ignore-index`` (default 255) marks pixels that count nowhere. The
classes are 0 .. the largest index in the training masks. Images are resized to the model's
input size (bilinear), masks to the same size (nearest); the model's logits are upsampled to
the mask size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import Split, TaskData, permutation
from spdecay.experiments.errors import RunnerError, require

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MASK_MODES = ("L", "P", "I", "I;16", "1")  # single-channel modes whose values are class indices
DEFAULT_IGNORE_INDEX = 255


def _files(folder: Path, option: str, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise RunnerError(f"{option} {folder}: no such {what} folder")
    files = {f.stem: f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES}
    if not files:
        raise RunnerError(f"{option} {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def pairs(images: str, masks: str, option: str, mask_option: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths matched by file stem; a one-line error names unmatched stems."""
    imgs = _files(Path(images).expanduser(), option, "image")
    msks = _files(Path(masks).expanduser(), mask_option, "mask")
    no_mask = sorted(set(imgs) - set(msks))
    no_image = sorted(set(msks) - set(imgs))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) without a mask of the same stem ({', '.join(no_mask[:3])}"
                         f"{', ...' if len(no_mask) > 3 else ''})")
        if no_image:
            parts.append(f"{len(no_image)} mask(s) without an image ({', '.join(no_image[:3])}"
                         f"{', ...' if len(no_image) > 3 else ''})")
        raise RunnerError(f"{option} {images} and {mask_option} {masks}: file stems differ: {'; '.join(parts)}")
    return [(imgs[s], msks[s]) for s in sorted(imgs)]


def load_pairs(items: list[tuple[Path, Path]], size: int, mask_option: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 3 x size x size in [0, 1]) and masks (N x size x size, int64)."""
    image_mod = require("PIL.Image", "reading image and mask folders")
    import numpy as np

    images = torch.empty(len(items), 3, size, size)
    masks = torch.empty(len(items), size, size, dtype=torch.long)
    for i, (img_path, mask_path) in enumerate(items):
        with image_mod.open(mask_path) as m:
            if m.mode not in MASK_MODES:
                raise RunnerError(f"{mask_option}: mask {mask_path.name} has mode {m.mode}; expected a single-channel "
                                  f"class-index image (mode {', '.join(MASK_MODES)}), not colours")
            with image_mod.open(img_path) as im:
                if im.size != m.size:
                    raise RunnerError(f"{mask_option}: mask {mask_path.name} is {m.size[0]}x{m.size[1]} but its image "
                                      f"is {im.size[0]}x{im.size[1]}; a mask must match its image's size")
                im = im.convert("RGB").resize((size, size), image_mod.BILINEAR)
                images[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
            m = m.resize((size, size), image_mod.NEAREST)
            masks[i] = torch.from_numpy(np.asarray(m).astype(np.int64))
    return images, masks


def _unknown(labels: torch.Tensor, n_classes: int, ignore_index: int | None) -> list[int]:
    values = labels.unique()
    if ignore_index is not None:
        values = values[values != ignore_index]
    return [int(v) for v in values if v < 0 or v >= n_classes]


def load_custom_segmentation(config: CompareConfig, image_size: int, train_size: int | None) -> TaskData:
    """The user's splits; without --val (or --test) 10% of the training images each."""
    ignore = config.ignore_index if config.ignore_index is not None else DEFAULT_IGNORE_INDEX
    masks = config.masks

    def read(name: str, option: str, path: str) -> Split:
        if name not in masks:
            key = "" if name == "train" else f"{name}="
            raise RunnerError(f"{option} {path}: needs its masks: --masks {key}MASK_FOLDER")
        mask_option = f"--masks {'' if name == 'train' else name + '='}{masks[name]}"
        images, labels = load_pairs(pairs(path, masks[name], option, mask_option), image_size, mask_option)
        return Split(name, images, labels)

    full = read("train", "--train", config.train)
    known = full.labels[full.labels != ignore]
    if known.numel() == 0:
        raise RunnerError(f"--masks {masks['train']}: every training pixel is the ignore index {ignore}")
    if int(known.min()) < 0:
        raise RunnerError(f"--masks {masks['train']}: negative class values")
    n_classes = max(2, int(known.max()) + 1)
    classes = [str(c) for c in range(n_classes)]
    given = {"train", *config.ood} | {n for n, p in (("val", config.val), ("test", config.test)) if p}
    extra = sorted(set(masks) - given)
    if extra:
        raise RunnerError(f"--masks {extra[0]}={masks[extra[0]]}: no images to go with it "
                          f"(give --{extra[0]} IMAGES or --ood {extra[0]}=IMAGES)")
    perm = permutation(len(full))
    n_hold = max(1, len(full) // 10)
    held = 0
    splits: dict[str, Split] = {}
    for name, path in (("val", config.val), ("test", config.test)):
        if path is None:
            splits[name] = full.subset(perm[held : held + n_hold], name)
            held += n_hold
        else:
            splits[name] = read(name, f"--{name}", path)
    rest = perm[held:]
    if train_size is not None:
        rest = rest[:train_size]
    train = full.subset(rest, "train")
    if len(train) == 0:
        raise RunnerError(f"--train {config.train}: too few images to hold out validation and test images; "
                          "give --val and --test")
    ood = {name: read(name, f"--ood {name}=", path) for name, path in config.ood.items()}
    for split in (splits["val"], splits["test"], *ood.values()):
        unknown = _unknown(split.labels, n_classes, ignore)
        if unknown:
            raise RunnerError(f"--masks {split.name}={masks.get(split.name, masks['train'])}: class values "
                              f"{unknown[:5]} never occur in the training masks (classes 0..{n_classes - 1}, "
                              f"ignore index {ignore})")
    return TaskData("segmentation", classes, train, splits["val"], splits["test"], ood)


def load_hf_segmentation(path: str, num_labels: int, image_size: int | None, device, ignore_index: int,
                         probe_steps: int, option: str = "--model"):
    """A local ``AutoModelForSemanticSegmentation`` folder with ``num_labels`` classes (a decode
    head of another size, or none, is newly initialised)."""
    from spdecay.experiments.models import (
        _check_folder,
        _check_model_type,
        _first_line,
        _head_modules,
        _quiet_transformers,
    )
    from spdecay.experiments.tasks.segmentation.model import SegmentationModel

    transformers = _quiet_transformers()
    folder = _check_folder(path, option)
    _check_model_type(transformers, path, option, "SEMANTIC_SEGMENTATION", "semantic-segmentation")
    try:
        model, info = transformers.AutoModelForSemanticSegmentation.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True,
            trust_remote_code=False,
        )
    except (ValueError, KeyError, OSError) as exc:
        raise RunnerError(f"{option} {path}: not a Hugging Face semantic-segmentation model ({_first_line(exc)})") from exc
    head = _head_modules(model, info)
    if not head:  # the checkpoint's decoder already has this many classes: its classifier is the new head
        names = dict(model.named_modules())
        head = ["decode_head.classifier"] if "decode_head.classifier" in names else ["decode_head"]
    proc = {}
    if (folder / "preprocessor_config.json").is_file():
        proc = json.loads((folder / "preprocessor_config.json").read_text())
    size = image_size or input_size(proc)
    task_model = SegmentationModel(model, head, device, image_size=size, mean=proc.get("image_mean", [0.5] * 3),
                                   std=proc.get("image_std", [0.5] * 3), hf=True, ignore_index=ignore_index,
                                   probe_steps=probe_steps)
    task_model.name = Path(path).name
    task_model.freeze_unused()
    return task_model


def input_size(proc: dict, default: int = 512) -> int:
    size = proc.get("size", default)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default
    return int(size)


def model_input_size(path: str) -> int:
    file = Path(path).expanduser() / "preprocessor_config.json"
    try:
        return input_size(json.loads(file.read_text())) if file.is_file() else 512
    except (OSError, ValueError):
        return 512


def build_custom(config: CompareConfig, d, device):
    from spdecay.experiments.tasks.segmentation import probe_steps

    image_size = config.image_size or model_input_size(config.model)
    data = load_custom_segmentation(config, image_size, d.train)
    ignore = config.ignore_index if config.ignore_index is not None else DEFAULT_IGNORE_INDEX
    model = load_hf_segmentation(config.model, len(data.classes), image_size, device, ignore,
                                 probe_steps(config, d, len(data.train)))
    return data, model
