"""Backends: the Adam update plus the per-tensor SPD sums, nothing else.

``single_tensor`` (readable, one tensor at a time), ``multi_tensor`` (torch ``_foreach`` ops),
``fused_c`` (the C/OpenMP kernel, the CPU default) and ``fused_triton`` (CUDA). Each offers

* ``covers(lists, i) -> bool``: whether it takes tensor ``i``;
* ``adam_and_sums(lists, hyper) -> PartialStep | None``: the Adam update in place, plus the
  sums in input order (None without ``hyper.with_sums``: a plain Adam(W) step);
* ``measure(lists) -> PartialStep``: the add-on's sums of tensors as they are (no update),
  with a projector. ``fused_c`` measures in C; the others share the single-tensor torch code.

``spdecay.spd.plan`` decides which backend takes which tensor; ``spdecay.spd.driver`` decides
and projects.
"""
