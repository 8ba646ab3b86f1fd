"""The SPD core: one decision, one projection, one driver, backends that only do Adam and sums.

* ``decision``: ``spd_ratio`` (the rule) and ``project_`` (its projection, torch form);
* ``driver``: ``PartialStep`` (what a backend returns) and ``finish`` (reduce, decide,
  project, stats);
* ``plan``: which backend steps each tensor;
* ``backends``: the Adam update plus per-tensor sums (reference, multi-tensor, C, Triton);
* ``layout``, ``engines``, ``reduce``: flat engine partitions, engine checks and
  sums over shards.
"""

from spdecay.spd.layout import FlatLayout

__all__ = ["FlatLayout"]
