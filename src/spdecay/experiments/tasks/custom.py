"""The `custom` task: bring your own model (a local Hugging Face folder) and data (CSV/JSONL text
files or class-per-folder image directories).

Text files need a text column and a label column (names configurable). Image data is a folder
with one sub-folder per class. Classes are the training labels, sorted; validation, test and OOD
labels must be among them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import Split, TaskData, permutation
from spdecay.experiments.errors import RunnerError, require
from spdecay.experiments.tasks.registry import (
    EVIDENCE,
    FIRST_LOOK,
    SMOKE,
    Task,
    TaskDefaults,
    register,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _read_table(path: Path, option: str, text_col: str, label_col: str,
                dropped: dict[str, int] | None = None) -> tuple[list[str], list[str]]:
    pd = require("pandas", f"reading {option} {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".tsv":
            frame = pd.read_csv(path, sep="\t")
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        else:
            raise RunnerError(f"{option} {path}: expected a .csv, .tsv or .jsonl file or an image folder")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise RunnerError(f"{option} {path}: cannot be parsed ({exc})") from exc
    missing = [c for c in (text_col, label_col) if c not in frame.columns]
    if missing:
        raise RunnerError(
            f"{option} {path}: expected columns '{text_col}' and '{label_col}' "
            f"(--text-column/--label-column), found {list(map(str, frame.columns))}"
        )
    kept = frame.dropna(subset=[text_col, label_col])
    if dropped is not None and len(kept) < len(frame):
        dropped[f"{option} {path}"] = len(frame) - len(kept)
    frame = kept
    return frame[text_col].astype(str).tolist(), frame[label_col].astype(str).tolist()


def _read_image_folder(path: Path, option: str) -> tuple[list[Path], list[str]]:
    files, labels = [], []
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not class_dirs:
        raise RunnerError(f"{option} {path}: expected one sub-folder per class, found none")
    for class_dir in class_dirs:
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(class_dir.name)
    return files, labels


def _load_images(files: list[Path], size: int) -> torch.Tensor:
    image_mod = require("PIL.Image", "reading image folders")
    out = torch.empty(len(files), 3, size, size)
    for i, f in enumerate(files):
        with image_mod.open(f) as im:
            im = im.convert("RGB").resize((size, size), image_mod.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            out[i] = data.reshape(size, size, 3).permute(2, 0, 1).float() / 255.0
    return out


def _read(path_str: str, option: str, kind: str, cfg_cols: tuple[str, str], image_size: int,
          dropped: dict[str, int] | None = None):
    path = Path(path_str).expanduser()
    if not path.exists():
        raise RunnerError(f"{option} {path}: no such file or folder")
    if kind == "image":
        if not path.is_dir():
            raise RunnerError(f"{option} {path}: an image model needs a class-per-folder directory")
        files, labels = _read_image_folder(path, option)
        return files, labels
    if path.is_dir():
        raise RunnerError(f"{option} {path}: a text model needs a .csv or .jsonl file, got a folder")
    return _read_table(path, option, *cfg_cols, dropped)


def load_custom(
    kind: str,
    train: str,
    val: str | None,
    test: str | None,
    ood: dict[str, str],
    text_column: str = "text",
    label_column: str = "label",
    image_size: int = 224,
    train_size: int | None = None,
) -> TaskData:
    """Load user data. Without --val (or --test), 10% of the training rows are held out for each."""
    cols = (text_column, label_column)
    dropped: dict[str, int] = {}
    tr_inputs, tr_labels = _read(train, "--train", kind, cols, image_size, dropped)
    if not tr_labels:
        raise RunnerError(f"--train {train}: no rows")
    classes = sorted(set(tr_labels))
    if len(classes) < 2:
        raise RunnerError(f"--train {train}: need at least 2 classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}

    def make(name: str, option: str, inputs: list, labels: list[str]) -> Split:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise RunnerError(
                f"{option}: labels {unknown[:5]} never occur in the training data (classes: {classes[:10]})"
            )
        if not labels:
            raise RunnerError(f"{option}: the '{name}' split is empty")
        if kind == "image":
            inputs = _load_images(inputs, image_size)
        return Split(name, inputs, torch.tensor([index[c] for c in labels], dtype=torch.long))

    full = make("train", f"--train {train}", tr_inputs, tr_labels)
    perm = permutation(len(full))
    n_hold = max(1, len(full) // 10)
    held = 0
    splits = {}
    for name, path in (("val", val), ("test", test)):
        if path is None:
            splits[name] = full.subset(perm[held : held + n_hold], name)
            held += n_hold
        else:
            splits[name] = make(name, f"--{name} {path}", *_read(path, f"--{name}", kind, cols, image_size, dropped))
    rest = perm[held:]
    if train_size is not None:
        rest = rest[:train_size]
    train_split = full.subset(rest, "train")
    ood_splits = {}
    for name, path in ood.items():
        ood_splits[name] = make(name, f"--ood {name}={path}", *_read(path, "--ood", kind, cols, image_size, dropped))
    data = TaskData(kind, classes, train_split, splits["val"], splits["test"], ood_splits, dropped)
    data.check()
    return data


def check(config: CompareConfig) -> None:
    """Before anything loads: both options given, the model folder readable as a text or image
    classification model, and the data of the kind that model reads (a file or a folder)."""
    from spdecay.experiments.models import check_model_folder
    from spdecay.experiments.preflight import check_paths

    if config.model is None or config.train is None:
        raise RunnerError("--task custom needs --model PATH and --train FILE_OR_FOLDER")
    check_paths(model=config.model, train=config.train, val=config.val, test=config.test, ood=config.ood)
    kind = check_model_folder(config.model)
    for option, path in (("--train", config.train), ("--val", config.val), ("--test", config.test),
                         *((f"--ood {n}={p}", p) for n, p in config.ood.items())):
        if path is None:
            continue
        folder = Path(path).expanduser().is_dir()
        shown = option if option.startswith("--ood") else f"{option} {path}"
        if kind == "image" and not folder:
            raise RunnerError(f"{shown}: an image model needs a class-per-folder directory")
        if kind == "text" and folder:
            raise RunnerError(f"{shown}: a text model needs a .csv, .tsv or .jsonl file, got a folder")


def build(config: CompareConfig, d: TaskDefaults, device):
    import json

    from spdecay.experiments.models import load_hf_image, load_hf_text, model_kind

    check(config)
    kind = model_kind(config.model)
    image_size = config.image_size
    if kind == "image" and image_size is None:
        size = json.loads((Path(config.model) / "preprocessor_config.json").read_text()).get("size", 224)
        image_size = int(size.get("height") or size.get("shortest_edge") or 224) if isinstance(size, dict) else int(size)
    data = load_custom(
        kind, config.train, config.val, config.test, config.ood,
        config.text_column, config.label_column, image_size or 224, d.train,
    )
    if kind == "text":
        model = load_hf_text(config.model, len(data.classes), config.max_length or d.max_length, device, config.lora_rank)
    else:
        model = load_hf_image(config.model, len(data.classes), image_size, device, config.lora_rank)
    return data, model


TASK = register(Task(
    "custom", "your own --model and --train/--val/--test/--ood data",
    presets={
        "default": TaskDefaults(None, 0, 0, None, 32, 1.0, None, 5e-5, 1e-2, image_size=224, statement=FIRST_LOOK),
        "quick": TaskDefaults(128, 0, 0, 96, 16, None, 6, 5e-5, 1e-2, max_length=32, image_size=64,
                              checkpoint_every=3, statement=SMOKE),
        "evidence": TaskDefaults(None, 0, 0, None, 32, 8.0, None, 3e-4, 1e-2, image_size=224, schedule="cosine",
                                 checkpoint_every=40, seeds=3, grid="evidence", statement=EVIDENCE),
    },
    build=build, check=check, files=True,
))
