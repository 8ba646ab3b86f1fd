"""Backends: the Adam update plus the per-tensor SPD sums, nothing else.

Each module offers ``adam_and_sums(lists: TensorLists, hyper: AdamHyper) -> PartialStep | None``
(None where ``hyper.spd`` is False: plain Adam/AdamW, nothing to decide) and, for the add-on,
``measure``/``projector``. ``spdecay.spd.plan`` decides which backend takes which tensor.
"""
