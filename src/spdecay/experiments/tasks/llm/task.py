"""The llm task's model behind the runner's ``TaskModel`` interface: LoRA on a frozen causal LM,
trained as an instruction follower (chat prompt with the text, the answer word as the target)
and classifying by label-word log-likelihood (``scoring``).

The common loop trains it (``loss``), the common evaluation scores it (``predict``); what differs
from a classifier with a new head is here: the adapters' deviation (with the weight change
s·B·A they make), the probe (logistic regression on the frozen model's last prompt-position
hidden state), WiSE-FT in merged-weight space (``lora_B`` scaled by alpha), the untouched model
zero-shot (``pretrained``), and every record's ``retention``: the zero-shot BBC News score
before and after fine-tuning and the drop (``forgetting``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from spdecay.experiments.data import Split
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.metrics import accuracy_metrics, auroc
from spdecay.experiments.models import TaskModel
from spdecay.experiments.tasks.llm.data import RETENTION_SET, LLMData
from spdecay.experiments.tasks.llm.scoring import PromptEncoder, answer_loss, label_log_likelihoods
from spdecay.experiments.training.deviation import parameter_deviation
from spdecay.experiments.training.evaluate import ood_means

WISE_ALPHA = 0.5
PROBE_C = (0.01, 0.1, 1.0)  # inverse L2 strengths of the probe, chosen on ID validation


class LLMModel(TaskModel):
    """The frozen base model, its tokenizer, and the token ids of every split (built once)."""

    kind = "text"

    def __init__(self, base: nn.Module, tokenizer, data: LLMData, *, max_length: int, lora_rank: int,
                 probe_train: int, device: torch.device):
        super().__init__(base, [], device, 0)
        self.base = base.to(device).eval()
        self.tokenizer = tokenizer
        self.data = data
        self.rank = lora_rank
        self.probe_train = probe_train
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoders = {key: PromptEncoder(tokenizer, fmt, max_length) for key, fmt in data.prompts.items()}
        self.name = "SmolLM2-135M-Instruct"
        self.reading = (f"LoRA (r={lora_rank}) adapters, classification by the log-likelihood of each "
                        "label word after a chat prompt")
        self._ids: dict[str, list[list[int]]] = {}
        self._starts: dict[int, dict[str, Tensor]] = {}
        self._pre: tuple[dict, dict] | None = None

    # -- prompts -----------------------------------------------------------------------------
    def encoder(self, split_name: str) -> PromptEncoder:
        return self.encoders.get(split_name, self.encoders["id"])

    def ids(self, split: Split) -> list[list[int]]:
        if split.name not in self._ids:
            self._ids[split.name] = self.encoder(split.name).encode_all(split.inputs)
        return self._ids[split.name]

    # -- the TaskModel interface the common loop and evaluation use -------------------------
    def new_model(self, seed: int) -> nn.Module:
        from spdecay.experiments.tasks.llm.model import with_lora

        model = with_lora(self.base, self.rank, seed).to(self.device)
        self._starts[seed] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model

    def is_head(self, name: str) -> bool:
        return False

    def batches(self, split: Split, batch_size: int, order: Tensor | None = None):
        ids = self.ids(split)
        order = torch.arange(len(split)) if order is None else order
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield [ids[i] for i in index.tolist()], split.labels[index]

    def loss(self, model: nn.Module, inputs, labels: Tensor) -> tuple[Tensor, int]:
        answers = self.encoder("id").label_ids
        targets = [answers[label] for label in labels.tolist()]
        loss, token_accuracy = answer_loss(model, inputs, targets, self.pad_id)
        return loss, round(float(token_accuracy) * len(targets))

    def predict(self, model: nn.Module, split: Split, batch_size: int) -> Tensor:
        return self.scores(model, split, batch_size).argmax(-1)

    def deviation(self, model: nn.Module, start: dict[str, Tensor]) -> dict:
        return adapter_deviation(model, start)

    def checkpoint_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The adapters only: the frozen base (540 MB) is the same in every checkpoint."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise RunnerError(f"checkpoint: its adapters ({len(state)} tensors) do not match the model's "
                              f"({len(trainable)}); delete it or use a fresh --out")
        model.load_state_dict(state, strict=False)

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, model: nn.Module, split: Split, batch_size: int, with_features: bool = False):
        """(N, C) label log-likelihoods (and (N, H) features) in the split's order; batches of
        similar length to waste little on padding."""
        enc = self.encoder(split.name)
        ids = self.ids(split)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        was_training = model.training
        model.eval()
        scores = torch.empty(len(ids), len(enc.label_ids))
        feats = None
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            out = label_log_likelihoods(model, [ids[i] for i in index], enc.label_ids, self.pad_id,
                                        with_features=with_features)
            if with_features:
                out, f = out
                if feats is None:
                    feats = torch.empty(len(ids), f.shape[-1])
                feats[index] = f.float().cpu()
            scores[index] = out.float().cpu()
        model.train(was_training)
        return (scores, feats) if with_features else scores

    def pretrained(self, batch_size: int) -> tuple[dict, dict[str, Tensor]]:
        """The untouched model's metrics on every set and its features of the sentiment sets
        (computed once per process: deterministic)."""
        if self._pre is None:
            record: dict = {"ood": {}}
            feats: dict[str, Tensor] = {}
            for key, split in (("val", self.data.val), ("test", self.data.test), *self.data.ood.items()):
                want = key != RETENTION_SET
                out = self.scores(self.base, split, batch_size, with_features=want)
                scores = out[0] if want else out
                if want:
                    feats[key] = out[1]
                metrics = accuracy_metrics(scores.argmax(-1), split.labels, scores.shape[1])
                if scores.shape[1] == 2 and (value := auroc(scores, split.labels)) is not None:
                    metrics["auroc"] = value  # as for every trained row (training/evaluate.py)
                (record.__setitem__(key, metrics) if key in ("val", "test") else record["ood"].__setitem__(key, metrics))
            ood_means(record)
            self._pre = record, feats
        return self._pre

    # -- reference rows and the retention fields ---------------------------------------------
    def zero_shot_record(self, spec, data, eval_batch_size: int) -> dict:
        t0 = time.perf_counter()
        metrics, _ = self.pretrained(eval_batch_size)
        record = {**metrics, **no_deviation()}
        record.update(run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams, steps=0,
                      batch_size=0, spd=None, train_loss=None, train_accuracy=None,
                      wall_time_s=time.perf_counter() - t0)
        return record

    def probe_record(self, spec, data, batch_size: int, eval_batch_size: int) -> dict:
        """Logistic regression on frozen last-position features of ``probe_train`` training
        prompts; C picked on ID validation balanced accuracy. BBC News is scored by the
        untouched LM."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        t0 = time.perf_counter()
        pre, feats = self.pretrained(eval_batch_size)
        n = min(self.probe_train, len(data.train))
        train_split = data.train.subset(range(n), name="probe_train")
        self.encoders.setdefault("probe_train", self.encoder("id"))
        _, train_feats = self.scores(self.base, train_split, eval_batch_size, with_features=True)
        scaler = StandardScaler().fit(train_feats.numpy())
        best = None
        for c in PROBE_C:
            clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train_feats.numpy()),
                                                             train_split.labels.numpy())
            pred = torch.as_tensor(clf.predict(scaler.transform(feats["val"].numpy())))
            score = accuracy_metrics(pred, data.val.labels, 2)["balanced_accuracy"]
            if best is None or score > best[0]:
                best = (score, c, clf)
        _, c, clf = best
        record: dict = {"ood": {}}
        for key, split in (("val", data.val), ("test", data.test), *data.ood.items()):
            if key == RETENTION_SET:
                record["ood"][key] = dict(pre["ood"][RETENTION_SET])  # the LM is not changed
                continue
            pred = torch.as_tensor(clf.predict(scaler.transform(feats[key].numpy())))
            metrics = accuracy_metrics(pred, split.labels, 2)
            (record.__setitem__(key, metrics) if key in ("val", "test") else record["ood"].__setitem__(key, metrics))
        ood_means(record)
        record.update(no_deviation())
        record.update(
            run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams, probe_C=c,
            probe_train=n, steps=0, batch_size=0, spd=None, train_loss=None, train_accuracy=None,
            wall_time_s=time.perf_counter() - t0,
        )
        return record

    @torch.no_grad()
    def wise_ft_record(self, model: nn.Module, spec, base_record: dict, data, eval_batch_size: int,
                       alpha: float = WISE_ALPHA) -> dict:
        """WiSE-FT of a LoRA run in merged-weight space: (1 - a) W0 + a (W0 + s B A) = W0 + s (a B) A,
        i.e. the package's ``interpolate`` of each lora_B with its pre-trained value, zero."""
        from spdecay import interpolate
        from spdecay.experiments.training.evaluate import evaluate_all

        t0 = time.perf_counter()
        state = {n: p.detach() for n, p in model.named_parameters() if "lora_B" in n}
        mixed = interpolate({n: torch.zeros_like(p) for n, p in state.items()}, state, alpha)
        original = {n: p.clone() for n, p in state.items()}
        params = dict(model.named_parameters())
        for n, v in mixed.items():
            params[n].copy_(v)
        record = evaluate_all(model, data, self, eval_batch_size)
        start = self._starts.get(spec.seed)
        record.update(adapter_deviation(model, start) if start is not None else no_deviation())
        for n, v in original.items():  # leave the AdamW model as it was
            params[n].copy_(v)
        record.update(
            run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams,
            steps=base_record["steps"], batch_size=base_record["batch_size"], spd=None, alpha=alpha,
            train_loss=None, train_accuracy=None, wall_time_s=time.perf_counter() - t0,
        )
        return record

    def annotate(self, record: dict) -> None:
        """``retention``: the BBC News zero-shot score before (the untouched model) and after."""
        before = self.pretrained(self.eval_batch_size)[0]["ood"][RETENTION_SET]
        add_retention(record, before)

    eval_batch_size = 16  # prompts per evaluation forward pass (set by the builder)


def add_retention(record: dict, before: dict[str, float]) -> None:
    after = record["ood"][RETENTION_SET]
    record["retention"] = {
        RETENTION_SET: {
            "before_balanced_accuracy": before["balanced_accuracy"], "after_balanced_accuracy": after["balanced_accuracy"],
            "before_accuracy": before["accuracy"], "after_accuracy": after["accuracy"],
            "forgetting": before["balanced_accuracy"] - after["balanced_accuracy"],
        }
    }


@torch.no_grad()
def adapter_deviation(model: nn.Module, start: dict[str, Tensor]) -> dict:
    """||theta - theta0|| of the adapters (theta0: their initial values), per tensor and in total,
    and the size of the weight change they make, ||delta W|| = ||s B A|| summed over layers,
    relative to the pre-trained weights they modify."""
    out = parameter_deviation(model, start)
    delta_sq = base_sq = 0.0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            delta_sq += float((module.scaling["default"] * (b.double() @ a.double())).norm() ** 2)
            base_sq += float(module.base_layer.weight.double().norm() ** 2)
    out["deviation"]["weight_change"] = math.sqrt(delta_sq)
    out["deviation"]["weight_change_relative"] = math.sqrt(delta_sq / base_sq) if base_sq > 0 else float("nan")
    return out


def no_deviation() -> dict:
    return {"deviation": {"total": 0.0, "relative": 0.0, "weight_change": 0.0, "weight_change_relative": 0.0},
            "layers": {"names": [], "deviation": [], "relative": [], "ndim": []}}
