"""DeepSpeed ZeRO (stages 1, 2, 3): tell the SPD optimizer which layers its flat partitions hold.

ZeRO flattens the parameters and hands the client optimizer one flat fp32 tensor per param group
(stages 1/2: the group's tensors laid end to end and cut evenly across the data-parallel ranks;
stage 3: every tensor partitioned on its own, the pieces of a sub-group laid end to end). SPD
decides per layer, so after ``deepspeed.initialize`` call::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=AdamSPD(...), config=cfg)
    spdecay.integrations.deepspeed.attach(engine)

[`attach`][spdecay.integrations.deepspeed.attach] computes, for every flat partition, which
slice of which original tensor each segment is (a [`FlatLayout`][spdecay.FlatLayout]) and gives
it to the optimizer ([`AdamSPD`][spdecay.AdamSPD], or the
[`SelectiveProjectionDecay`][spdecay.SelectiveProjectionDecay] add-on around a
torch optimizer). SPD then sums per segment, all-reduces the per-layer sums over the data-parallel
process group and decides per original tensor, as on one process. Without the call the optimizer
refuses to step the flat buffers. With the Hugging Face Trainer use
[`attach_to_trainer`][spdecay.integrations.deepspeed.attach_to_trainer].

Refused with an error naming the problem: optimizer or parameter offload (ZeRO-Offload),
ZenFlow, Muon, MoE expert groups, ZeRO++ hierarchical partitioning, the BF16/FP16 wrappers
DeepSpeed uses without ZeRO (they flatten too), and client optimizers that are neither AdamSPD
nor carry the SPD add-on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from spdecay.spd.layout import FlatLayout

__all__ = ["attach", "attach_to_trainer", "zero3_layouts", "zero_layouts"]


def attach(engine: Any, addon: Any = None) -> list[FlatLayout]:
    """Give the SPD optimizer of a DeepSpeed ``engine`` the layout of its flat partitions.

    Call it once on every rank, right after ``deepspeed.initialize`` (before training and before
    ``engine.load_checkpoint``).

    Args:
        engine: the engine returned by ``deepspeed.initialize``.
        addon: the [`SelectiveProjectionDecay`][spdecay.SelectiveProjectionDecay] around the
            client optimizer (found automatically when omitted).

    Returns:
        The layouts, one per param group (ZeRO-3: one per sub-group). Without ZeRO (stage 0,
            fp32) DeepSpeed keeps the original tensors and there is nothing to attach: an empty
            list.

    Raises:
        TypeError: ``engine`` has no optimizer; the client optimizer is neither an AdamSPD nor
            wrapped by exactly one add-on; or ``addon`` is not a ``SelectiveProjectionDecay``.
        ValueError: ``addon`` does not wrap the engine's client optimizer.
        NotImplementedError: an unsupported setting: DeepSpeed's BF16/FP16 wrapper without
            ZeRO, optimizer or parameter offload, ZenFlow, Muon, MoE expert groups, or ZeRO++
            hierarchical partitioning.
        RuntimeError: this DeepSpeed version lays partitions out differently from what spdecay
            supports.
    """
    wrapper = getattr(engine, "optimizer", None)
    if wrapper is None:
        raise TypeError(
            "spdecay.integrations.deepspeed.attach: expected the engine returned by "
            f"deepspeed.initialize(...) with an optimizer, got {type(engine).__name__}"
        )
    kind = type(wrapper).__name__
    client = getattr(wrapper, "optimizer", None)
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        return _attach_zero3(wrapper, _spd_target(client, addon, required=True))
    if kind != "DeepSpeedZeroOptimizer":
        import torch

        if isinstance(wrapper, torch.optim.Optimizer):  # the client optimizer itself (fp32, no
            _spd_target(wrapper, addon, required=True)  # ZeRO): DeepSpeed flattened nothing
            return []
        raise NotImplementedError(
            f"spdecay.integrations.deepspeed.attach: DeepSpeed wraps the optimizer in {kind} "
            "(e.g. its bf16/fp16 wrapper without ZeRO), which spdecay does not support. Use ZeRO "
            "stage 1, 2 or 3 (\"zero_optimization\": {\"stage\": 2}; bf16/fp16 work there), or "
            "fp32 without ZeRO."
        )
    for flag, what in (("cpu_offload", "optimizer offload (offload_optimizer)"),
                       ("zenflow", "ZenFlow"), ("has_moe_layers", "MoE expert groups")):
        if getattr(wrapper, flag, False):
            raise NotImplementedError(
                f"spdecay.integrations.deepspeed.attach: {what} is not supported with SPD; "
                "use ZeRO stage 1, 2 or 3 without it."
            )
    target = _spd_target(client, addon, required=True)
    layouts = zero_layouts(wrapper)
    for flat, layout in zip(wrapper.single_partition_of_fp32_groups, layouts):
        target.set_flat_layout(flat, layout)
    return layouts


def attach_to_trainer(trainer: Any) -> None:
    """Attach SPD to the DeepSpeed engine of a Hugging Face ``Trainer``.

    For ``TrainingArguments(deepspeed=config)``: registers a callback that calls
    [`attach`][spdecay.integrations.deepspeed.attach] on the DeepSpeed engine as soon as the
    Trainer has built it (at the start of every ``trainer.train()``, before the first step).
    Call it once, before ``train()``.

    Args:
        trainer: a ``transformers.Trainer``.

    Raises:
        RuntimeError: at the start of training, when the Trainer does not run under DeepSpeed;
            otherwise whatever [`attach`][spdecay.integrations.deepspeed.attach] raises.
    """
    from transformers import TrainerCallback

    class _AttachCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            engine = getattr(trainer, "model_wrapped", None)
            if type(engine).__name__ != "DeepSpeedEngine":
                raise RuntimeError(
                    "spdecay.integrations.deepspeed.attach_to_trainer: the Trainer does not run "
                    "under DeepSpeed (TrainingArguments(deepspeed=...) not set); remove the call"
                )
            attach(engine)

    trainer.add_callback(_AttachCallback())


def zero_layouts(zero: Any) -> list[FlatLayout]:
    """The [`FlatLayout`][spdecay.FlatLayout] of each param group's local fp32 partition of a
    ZeRO-1/2 optimizer, in group order.

    DeepSpeed lays a group out as its trainable tensors in (possibly round-robin reordered)
    order, each optionally padded to an alignment, the whole padded to a multiple of the
    data-parallel size, then cut into equal partitions; rank ``r`` holds
    ``[r * partition_size, (r + 1) * partition_size)``. Logical ids are the tensors' positions in
    the original param group, so they agree across ranks.

    Args:
        zero: the ZeRO-1/2 optimizer (``engine.optimizer``, a ``DeepSpeedZeroOptimizer``).

    Returns:
        One layout per param group, with the group's data-parallel process group.

    Raises:
        RuntimeError: a partition's shape or a tensor's place in the flat buffer differs from
            what spdecay computed (a DeepSpeed version with another layout).
    """
    import torch.distributed as dist

    from spdecay.spd.layout import FlatLayout

    layouts = []
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        group = zero.real_dp_process_group[i]
        rank = dist.get_rank(group=group)
        originals = zero.bit16_groups[i]
        ordered = zero.round_robin_bit16_groups[i]
        numels = [m.numel() for m in zero.round_robin_bit16_meta[i]] if hasattr(
            zero, "round_robin_bit16_meta") else [p.numel() for p in ordered]
        offsets = getattr(zero, "round_robin_bit16_offsets", None)
        offsets = offsets[i] if offsets is not None else _cumulative(numels)
        size = int(zero.partition_size[i])
        if flat.dim() != 1 or flat.numel() != size:
            raise RuntimeError(
                f"spdecay.integrations.deepspeed: param group {i}: the local partition has shape "
                f"{tuple(flat.shape)}, expected ({size},); this DeepSpeed version lays partitions "
                "out differently from what spdecay supports"
            )
        logical = {id(p): k for k, p in enumerate(originals)}
        start, end = rank * size, (rank + 1) * size
        segments = []
        for p, off, n in zip(ordered, offsets, numels):
            lo, hi = max(off, start), min(off + n, end)
            if lo < hi:
                segments.append((lo - start, hi - lo, logical[id(p)]))
        buffers = getattr(zero, "bit16_groups_flat", None)
        _check_placement(buffers[i] if buffers else None, [p.data for p in ordered], offsets,
                         f"param group {i}")
        names = _names(zero, originals)
        layouts.append(FlatLayout(
            offsets=tuple(s[0] for s in segments),
            lengths=tuple(s[1] for s in segments),
            logical_ids=tuple(s[2] for s in segments),
            num_logical=len(originals),
            process_group=group,
            names=names,
        ))
    return layouts


def zero3_layouts(zero: Any) -> list[FlatLayout]:
    """The [`FlatLayout`][spdecay.FlatLayout] of each sub-group's local fp32 partition of a
    ZeRO-3 optimizer, in sub-group order.

    ZeRO-3 partitions every tensor on its own: rank ``r`` holds elements
    ``[r * n, (r + 1) * n)`` of each flattened tensor (``n = ceil(numel / world)``, the last
    ranks' pieces padded), and a sub-group's fp32 partition is these pieces one after another.
    Logical ids are the tensors' positions in the sub-group, the same on every rank.

    Args:
        zero: the ZeRO-3 optimizer (``engine.optimizer``, a ``DeepSpeedZeroOptimizer_Stage3``).

    Returns:
        One layout per sub-group, with the sub-group's process group.

    Raises:
        NotImplementedError: a sub-group's tensors are partitioned over another process group
            (MoE/AutoEP).
        RuntimeError: a partition's shape or a tensor's place in the flat buffer differs from
            what spdecay computed (a DeepSpeed version with another layout).
    """
    import torch.distributed as dist

    from spdecay.spd.layout import FlatLayout

    names = getattr(zero, "param_names", None) or {}
    layouts = []
    for j, params in enumerate(zero.fp16_groups):
        flat = zero.fp32_partitioned_groups_flat[j]
        group = zero.sub_group_process_groups[j]
        if any(getattr(p, "ds_process_group", group) is not group for p in params):
            raise NotImplementedError(
                "spdecay.integrations.deepspeed.attach: ZeRO-3 sub-group whose tensors are "
                "partitioned over another process group (MoE/AutoEP) is not supported"
            )
        rank = dist.get_rank(group=group)
        offsets, lengths, at = [], [], 0
        for p in params:
            piece = int(p.ds_tensor.ds_numel)
            offsets.append(at)
            lengths.append(max(0, min(piece, int(p.ds_numel) - rank * piece)))
            at += piece
        if flat.dim() != 1 or flat.numel() != at:
            raise RuntimeError(
                f"spdecay.integrations.deepspeed: ZeRO-3 sub-group {j}: the local partition has "
                f"shape {tuple(flat.shape)}, expected ({at},); this DeepSpeed version lays "
                "partitions out differently from what spdecay supports"
            )
        buffers = getattr(zero, "fp16_partitioned_groups_flat", None)
        _check_placement(buffers[j] if buffers else None, [p.ds_tensor for p in params], offsets,
                         f"ZeRO-3 sub-group {j}")
        found = [names.get(p) for p in params]
        layouts.append(FlatLayout(
            offsets=tuple(offsets), lengths=tuple(lengths), logical_ids=tuple(range(len(params))),
            num_logical=len(params), process_group=group,
            names=tuple(found) if all(isinstance(n, str) for n in found) else None,
        ))
    return layouts


def _attach_zero3(zero: Any, target: Any) -> list[FlatLayout]:
    for flag, what in (("offload_optimizer", "optimizer offload (offload_optimizer)"),
                       ("offload_param", "parameter offload (offload_param)"),
                       ("zenflow", "ZenFlow"), ("use_muon", "Muon")):
        if getattr(zero, flag, False):
            raise NotImplementedError(
                f"spdecay.integrations.deepspeed.attach: {what} is not supported with SPD; "
                "use ZeRO stage 1, 2 or 3 without it."
            )
    if (getattr(zero, "zero_hpz_partition_size", 1) or 1) > 1:
        raise NotImplementedError(
            "spdecay.integrations.deepspeed.attach: ZeRO++ hierarchical partitioning "
            "(zero_hpz_partition_size > 1) is not supported with SPD"
        )
    layouts = zero3_layouts(zero)
    import torch

    groups = (target if isinstance(target, torch.optim.Optimizer) else target.optimizer).param_groups
    for j, layout in enumerate(layouts):
        # ZeRO-3 puts a sub-group's partition into its param group only while stepping it (and
        # while saving or loading state); do the same while handing over its layout.
        group = groups[zero.sub_group_to_group_id[j]]
        flat = zero.fp32_partitioned_groups_flat[j]
        saved = group["params"]
        group["params"] = [flat]
        try:
            target.set_flat_layout(flat, layout)
        finally:
            group["params"] = saved
    return layouts


def _cumulative(numels: list[int]) -> list[int]:
    out, pos = [], 0
    for n in numels:
        out.append(pos)
        pos += n
    return out


def _check_placement(buffer: Tensor | None, tensors: list[Tensor], offsets: list[int],
                     where: str) -> None:
    # Where each tensor's storage lies in the flat buffer DeepSpeed built is the ground truth of
    # the layout it steps: an independent check of the offsets read from its bookkeeping (its
    # own fragment map, ``_hp_mapping``, ignores round_robin_gradients' order).
    if buffer is None:
        return
    base = buffer.untyped_storage().data_ptr()
    for t, off in zip(tensors, offsets):
        if t.untyped_storage().data_ptr() != base:
            continue  # not a view of the buffer (moved or swapped): nothing to compare
        at = t.storage_offset() - buffer.storage_offset()
        if at != off:
            raise RuntimeError(
                f"spdecay.integrations.deepspeed: {where}: a tensor of {t.numel()} elements "
                f"lies at element {at} of DeepSpeed's flat buffer, spdecay computed {off}; this "
                "DeepSpeed version lays partitions out differently (not supported)"
            )


def _names(zero: Any, originals: list[Tensor]) -> tuple[str, ...] | None:
    names = getattr(zero, "param_names", None) or {}
    found = [names.get(p) for p in originals]
    return tuple(found) if all(isinstance(n, str) for n in found) else None


def _spd_target(optimizer: Any, addon: Any, required: bool) -> Any:
    """AdamSPD itself, or the SPD add-on hooked into a torch optimizer."""
    from spdecay import AdamSPD, SelectiveProjectionDecay

    if addon is not None:
        if not isinstance(addon, SelectiveProjectionDecay):
            raise TypeError(
                f"attach: addon must be a SelectiveProjectionDecay, got {type(addon).__name__}"
            )
        if addon.optimizer is not optimizer:
            raise ValueError("attach: the add-on does not wrap the engine's client optimizer")
        return addon
    if isinstance(optimizer, AdamSPD):
        return optimizer
    hooks = getattr(optimizer, "_optimizer_step_pre_hooks", {}) or {}
    found = [h.__self__ for h in hooks.values()
             if isinstance(getattr(h, "__self__", None), SelectiveProjectionDecay)]
    if len(found) == 1:
        return found[0]
    if required:
        raise TypeError(
            "spdecay.integrations.deepspeed.attach: the engine's client optimizer is "
            f"{type(optimizer).__name__} with {len(found)} SPD add-ons; expected spdecay.AdamSPD "
            "or a torch optimizer wrapped by one spdecay.SelectiveProjectionDecay (pass it as "
            "attach(engine, addon=...))"
        )
    return None
