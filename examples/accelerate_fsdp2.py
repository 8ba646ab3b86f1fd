"""AdamSPD under accelerate with FSDP2 (``fully_shard``), anchors captured after sharding.

The optimizer is built from the full model *before* ``accelerator.prepare``; accelerate then
shards the model and swaps the optimizer's parameters for the sharded DTensors. AdamSPD captures
its anchors lazily at the first step, so they are the sharded pre-trained weights, and its
whole-tensor reductions keep every rank's SPD decision equal to the single-process one.

    torchrun --nproc_per_node=2 examples/accelerate_fsdp2.py --steps 10   # CPU: gloo

At the end rank 0 compares the gathered weights with a single-process AdamSPD run on the same
batches and prints the largest difference.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from spdecay import AdamSPD, param_groups

DIM, BATCH = 16, 8


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM), nn.LayerNorm(DIM),
        nn.Linear(DIM, 2),  # the new head: 2 rows, fewer than 3 ranks
    ).double()


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH * 3, DIM, dtype=torch.float64, generator=g)
    y = (x[:, 0] > 0).long()
    per = len(x) // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def make_optimizer(model: nn.Module) -> AdamSPD:
    return AdamSPD(param_groups(model, head="4", weight_decay=1.0), lr=3e-2)


def single_process(steps: int) -> dict[str, torch.Tensor]:
    model = tiny_model()
    opt = make_optimizer(model)
    for t in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(batch(t)[0]), batch(t)[1]).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def main(argv: list[str] | None = None) -> float | None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate enables FSDP only for accelerator devices and would silently fall back to
        # DDP on CPU; for this CPU demo we switch its state to FSDP2 by hand.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    model = tiny_model()
    opt = make_optimizer(model)  # built on the full model; accelerate swaps its parameters
    model, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    inner = opt.optimizer  # accelerate's AcceleratedOptimizer wraps our AdamSPD
    fired = 0  # becomes a device tensor: no host sync per step
    for t in range(args.steps):
        opt.zero_grad()
        x, y = batch(t, rank, world)
        accelerator.backward(F.cross_entropy(model(x.to(accelerator.device)), y.to(accelerator.device)))
        opt.step()
        fired = fired + inner.spd_stats().fired.sum()  # SPD decisions that fired, all steps
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters()}
    # accelerate swapped the optimizer's parameters for the model's sharded ones; the anchors
    # were captured at the first step from those: gathered, they are the initial weights.
    swapped = {id(p) for g in inner.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}
    anchors = {n: inner.state[p]["anchor"] for n, p in model.named_parameters()
               if "anchor" in inner.state[p]}
    params = dict(model.named_parameters())
    sharded_alike = all(getattr(a, "placements", None) == getattr(params[n], "placements", None)
                        for n, a in anchors.items())
    anchors = {n: (a.full_tensor() if hasattr(a, "full_tensor") else a).cpu() for n, a in anchors.items()}
    diff = None
    if accelerator.is_main_process:
        init = dict(tiny_model().named_parameters())
        anchor_diff = max((a - init[n.removeprefix("module.")]).abs().max().item()
                          for n, a in anchors.items())
        ref = single_process(args.steps)
        diff = max((full[n.removeprefix("module.")] - ref[n.removeprefix("module.")]).abs().max().item()
                   for n in full)
        kind = type(next(model.parameters())).__name__
        print(f"{world} processes, {kind} parameters, optimizer swapped: {swapped}, "
              f"{len(anchors)} anchors (sharded alike: {sharded_alike}, max |anchor - "
              f"initial| {anchor_diff:.3g}), SPD fired "
              f"{int(fired)} times; max |difference| to one process: {diff:.3g}")
    # Tear the process group down on every rank, after rank 0 is done: a rank that exits with
    # gloo still up can abort ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group
    return diff


if __name__ == "__main__":
    main()
