"""The SPD core: one decision, one projection, one driver, backends that only do Adam and sums.

* ``decision``: ``spd_ratio`` (the rule) and ``project_`` (its projection, torch form);
* ``driver``: ``step_groups`` (validate, plan, run the backends) and ``finish`` (reduce,
  decide with each group's strength, project);
* ``interface``: what a backend is given (``AdamHyper``, ``TensorLists``) and returns
  (``PartialStep``);
* ``plan``: which backend steps each tensor;
* ``backends``: the Adam update plus per-tensor sums (``single_tensor``, ``multi_tensor``,
  ``fused_c``, ``fused_triton``);
* ``layout``, ``reduce``, ``dtensor``: flat engine partitions (and the check that refuses
  flattened groups without one), sums over shards;
* ``cache``: the one small memo of host-built index tensors.
"""

from spdecay.spd.layout import FlatLayout

__all__ = ["FlatLayout"]
