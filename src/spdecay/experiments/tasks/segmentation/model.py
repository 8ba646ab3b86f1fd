"""``SegmentationModel``: the ``TaskModel`` of dense prediction (the embedded EfficientNet + FPN
and Hugging Face semantic-segmentation models alike).

A split's ``inputs`` are N x C x H x W images in [0, 1] and its ``labels`` N x h x w class-index
masks (int64; ``ignore_index`` pixels count nowhere). The model's logits (often at a lower
resolution: 1/2 for the embedded net, 1/4 for SegFormer) are upsampled bilinearly to the mask
size for the loss and for prediction. The training loop's "accuracy" is pixel accuracy.

The probe row of this task is a **decoder probe**: the pre-trained backbone is frozen (eval
mode: its BatchNorm statistics stay the checkpoint's) and only the new decoder trains, with
AdamW, for as many steps as a fine-tuning run.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdecay.experiments.data import Split
from spdecay.experiments.models import ImageModel
from spdecay.experiments.tasks.segmentation.metrics import segmentation_metrics


class SegmentationModel(ImageModel):
    """Inputs (resizing, normalisation, batches) and logits as ``ImageModel``; the loss,
    prediction and metrics are per pixel."""

    kind = "segmentation"

    def __init__(self, base: nn.Module, head_modules: list[str], device: torch.device, *, image_size: int,
                 mean, std, hf: bool, ignore_index: int | None = None, probe_steps: int = 100):
        super().__init__(base, image_size, mean, std, head_modules, device, hf)
        self.ignore_index = ignore_index
        self.probe_steps = probe_steps
        self.reading = "its per-pixel logits, upsampled bilinearly to the mask size"

    @staticmethod
    def upsampled(logits: Tensor, size) -> Tensor:
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    # -- loss, prediction, metrics ---------------------------------------------------------------
    def loss(self, model, inputs, labels):
        """Pixel cross-entropy (ignore index honoured) and the batch's pixel accuracy times its
        number of images (so the loop's running "accuracy" is pixel accuracy)."""
        logits = self.upsampled(self.logits(model, inputs), labels.shape[-2:])
        ignore = self.ignore_index if self.ignore_index is not None else -100
        loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore)
        with torch.no_grad():
            keep = labels != ignore
            right = ((logits.argmax(1) == labels) & keep).sum()
            fraction = float(right) / max(1, int(keep.sum()))
        return loss, fraction * len(labels)

    def predict(self, model, split: Split, batch_size: int) -> Tensor:
        """The predicted class map of every image, at its mask's size (uint8 / int16 / int64 by
        the number of classes, to keep large splits small)."""
        was_training = model.training
        model.eval()
        n_classes = None
        out = None
        with torch.inference_mode():
            start = 0
            for inputs, labels in self.batches(split, batch_size):
                logits = self.upsampled(self.logits(model, inputs), labels.shape[-2:])
                if out is None:
                    n_classes = logits.shape[1]
                    dtype = torch.uint8 if n_classes <= 255 else torch.int16 if n_classes < 2**15 else torch.int64
                    out = torch.empty((len(split), *labels.shape[-2:]), dtype=dtype)
                pred = logits.argmax(1).cpu()
                out[start : start + len(pred)] = pred.to(out.dtype)
                start += len(pred)
        model.train(was_training)
        return out

    def metrics(self, pred: Tensor, labels: Tensor, n_classes: int) -> dict:
        return segmentation_metrics(pred, labels, n_classes, self.ignore_index)

    # -- the probe: a frozen backbone, only the decoder trains ------------------------------------
    def probe_record(self, spec, data, batch_size: int, eval_batch_size: int) -> dict:
        from spdecay.experiments.training.deviation import no_deviation
        from spdecay.experiments.training.evaluate import evaluate_all
        from spdecay.experiments.training.loop import diverged_record
        from spdecay.experiments.training.schedule import epoch_order, lr_lambda

        t0 = time.perf_counter()
        model = self.new_model(spec.seed)
        head = [p for n, p in model.named_parameters() if self.is_head(n)]
        for n, p in model.named_parameters():
            if not self.is_head(n):
                p.requires_grad_(False)
        opt = torch.optim.AdamW(head, lr=spec.lr, weight_decay=spec.weight_decay)
        total = self.probe_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, "cosine"))
        torch.manual_seed(spec.seed)
        model.train()
        for name, module in model.named_modules():
            if name and not self.is_head(name):
                module.eval()  # the frozen backbone: checkpoint BatchNorm statistics, no dropout
        n_train = len(data.train)
        per_epoch = max(1, n_train // batch_size)
        loss_sum, correct, seen = 0.0, 0.0, 0
        batches: list[Tensor] = []
        for step in range(total):
            epoch, pos = divmod(step, per_epoch)
            if pos == 0:
                batches = self.epoch_batches(data.train, epoch_order(spec.seed, epoch, n_train), batch_size)
            inputs, labels = next(iter(self.batches(data.train, batch_size, batches[pos % len(batches)])))
            loss, right = self.loss(model, inputs, labels)
            value = float(loss.detach())
            if not math.isfinite(value):
                return diverged_record(spec, data, step, value, total, batch_size)
            loss.backward()
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += value
            correct += right
            seen += len(labels)
        record = evaluate_all(model, data, self, eval_batch_size)
        record.update(
            **no_deviation(), spd=None,  # the backbone is frozen by construction
            run_id=spec.run_id, optimizer=spec.optimizer, seed=spec.seed, hparams=spec.hparams,
            steps=total, batch_size=batch_size, train_loss=loss_sum / max(1, total),
            train_accuracy=correct / max(1, seen), wall_time_s=time.perf_counter() - t0,
        )
        return record
