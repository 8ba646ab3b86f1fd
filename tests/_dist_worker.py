"""Worker for tests/test_distributed.py: run in each process by torch.multiprocessing.spawn.

Every check trains a tiny float64 transformer-like model for a few steps on the gloo backend and
compares the gathered parameters with a single-process run on the same global batches. Rank 0
writes the measured numbers to ``<out>/results_<world>.json``; the test asserts on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ, CLASSES, BATCH = 13, 8, 5, 2, 6  # BATCH divides by 2 and 3 ranks
STEPS = 20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, 2, DIM // 2).unbind(2)  # 2 heads
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / (DIM // 2) ** 0.5, -1)
        x = x + self.proj(torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, DIM))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token embedding (13 rows: uneven shards), a 2-row segment embedding (fewer rows than 3
    ranks: one rank holds an empty shard), one attention block, a LoRA-like adapter anchored at
    zero and a 2-row head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.segment = nn.Embedding(2, DIM)  # like BERT's token_type_embeddings
        self.block = Block()
        self.adapter = nn.Linear(DIM, DIM, bias=False)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.block(self.embed(tokens) + self.segment(tokens % 2))
        x = x + self.adapter(x)
        return self.head(x.mean(1))


def make_model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    model = TinyTransformer().double()
    with torch.no_grad():
        model.adapter.weight.mul_(0.1)
    return model


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Backbone: SPD to the initial value; adapter: SPD to zero; head and norms: AdamW."""
    backbone, adapter, rest = [], [], []
    for name, p in model.named_parameters():
        if "adapter" in name:
            adapter.append(p)
        elif name.startswith("head") or ".ln" in name:
            rest.append(p)
        else:
            backbone.append(p)
    return [
        {"params": backbone, "weight_decay": 1.0},
        {"params": adapter, "anchor": "zero", "weight_decay": 0.5},
        {"params": rest, "spd": False, "weight_decay": 0.01},
    ]


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    per = BATCH // world
    return tokens[rank * per : (rank + 1) * per], labels[rank * per : (rank + 1) * per]


def adam_spd(model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
    from spdecay import AdamSPD

    return AdamSPD(groups(model), lr=2e-2, **kw)


def adam_with_addon(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    from spdecay import SelectiveProjectionDecay

    gs = groups(model)
    for g in gs:  # the add-on reads its own keys; the base Adam has no decay in SPD groups
        g["spd_weight_decay"] = g.pop("weight_decay") if g.get("spd", True) else 0.0
    base = torch.optim.Adam(gs, lr=2e-2, foreach=False)
    return base, SelectiveProjectionDecay(base, weight_decay=1.0)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0,
          world: int = 1) -> None:
    for t in steps:
        opt.zero_grad(set_to_none=True)
        tokens, labels = batch(t, rank, world)
        F.cross_entropy(model(tokens), labels).backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from spdecay._sharding import is_dtensor

    return {
        n: (p.full_tensor() if is_dtensor(p) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def single_process(make_opt: Callable[[nn.Module], Any], steps: int, seed: int = 0):
    model = make_model(seed)
    opt = make_opt(model)
    opt = opt[0] if isinstance(opt, tuple) else opt
    snapshots = {}
    for t in range(steps):
        train(model, opt, range(t, t + 1))
        snapshots[t + 1] = full_params(model)
    return snapshots


def fsdp2(seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    fully_shard(model.block)
    fully_shard(model)
    return model


@contextmanager
def count_all_reduce(counter: list[int]):
    real = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = real


def run_fsdp2(make_opt: Callable[[nn.Module], Any], rank: int, world: int, steps: int = STEPS):
    model = fsdp2()
    opt = make_opt(model)
    opt = opt[0] if isinstance(opt, tuple) else opt
    calls = [0]
    with count_all_reduce(calls):
        train(model, opt, range(steps), rank, world)
    return model, opt, calls[0] / steps


def fired_per_rank(opt: Any) -> list[list[bool]]:
    stats = opt.spd_stats() if hasattr(opt, "spd_stats") else opt.stats()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, stats.fired.tolist())
    return out


def check_reduce_layouts(rank: int, world: int) -> dict[str, float]:
    """reduce_partial_sums on hand-made DTensors: Shard(0), Shard(1), Replicate, uneven and
    empty shards, 1-D and 2-D meshes, mixed with a plain tensor; compared with whole sums."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from spdecay._sharding import reduce_partial_sums, to_local

    g = torch.Generator().manual_seed(7)
    fulls = [torch.randn(s, dtype=torch.float64, generator=g) for s in [(5, 4), (1, 3), (2, 7), (4,)]]
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("r", "s"))
    mesh3 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("r", "s"))
    layouts = {  # (1, 3) and (5, 4) have empty shards; (2, 7) and (4,) uneven ones on 3 ranks
        "1d": [(mesh1, [Shard(0)]), (mesh1, [Shard(0)]), (mesh1, [Shard(1)]), (mesh1, [Replicate()])],
        "2d": [(mesh2, [Replicate(), Shard(0)]), (mesh2, [Shard(0), Shard(0)]),
               (mesh2, [Shard(0), Replicate()]), (mesh2, [Replicate(), Replicate()])],
        # replicated over a mesh dimension of size `world`, mixed with a second mesh
        "2d_replicated": [(mesh3, [Replicate(), Shard(0)]), (mesh3, [Shard(0), Shard(0)]),
                          (mesh1, [Shard(1)]), (mesh3, [Replicate(), Shard(0)])],
    }
    if world == 3:  # meshes over ranks 0 and 1 only (as for one pipeline stage): rank 2 idles
        from torch.distributed.device_mesh import DeviceMesh

        sub1 = DeviceMesh("cpu", [0, 1])
        sub2 = DeviceMesh("cpu", [[0], [1]], mesh_dim_names=("a", "b"))
        layouts["sub_world"] = [(sub2, [Shard(0), Replicate()]), (sub2, [Replicate(), Shard(1)]),
                                (sub1, [Shard(0)]), (sub2, [Shard(0), Shard(0)])]
    errors: dict[str, float] = {}
    for name, layout in layouts.items():
        params: list[torch.Tensor] = [
            distribute_tensor(f, m, pl) for f, (m, pl) in zip(fulls, layout)
        ]
        params.append(torch.full((3,), float(rank + 1), dtype=torch.float64))  # plain, per rank
        local = [to_local(p) for p in params]
        sums = torch.stack([torch.stack([(x * x).sum(), x.sum()]) for x in local], dim=1)
        calls = [0]
        with count_all_reduce(calls):
            out = reduce_partial_sums(sums, params)
        want = torch.stack(
            [torch.stack([(x * x).sum(), x.sum()]) for x in [*fulls, local[-1]]], dim=1
        )
        if layout[0][0].get_coordinate() is None:  # not in the mesh: nothing is reduced
            want = sums
        errors[f"layout_{name}"] = (out - want).abs().max().item()
        errors[f"layout_{name}_collectives"] = calls[0]
    from torch.distributed.tensor import DTensor, Partial

    partial = DTensor.from_local(torch.ones(2, dtype=torch.float64), mesh1, [Partial()])
    try:
        reduce_partial_sums(torch.zeros(1, 1, dtype=torch.float64), [partial])
        errors["partial_rejected"] = False
    except ValueError as e:
        errors["partial_rejected"] = "Partial" in str(e)
    return errors


def worker(rank: int, world: int, port: int, out: str, ckpt: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = _checks(rank, world, Path(ckpt))
        if rank == 0:
            (Path(out) / f"results_{world}.json").write_text(json.dumps(results, indent=1))
    finally:
        dist.destroy_process_group()


def _checks(rank: int, world: int, ckpt: Path) -> dict[str, Any]:
    import spdecay._functional as SF

    res: dict[str, Any] = check_reduce_layouts(rank, world)
    ref = single_process(adam_spd, STEPS)

    # AdamSPD under FSDP2, multi-tensor (default) and single-tensor paths.
    model, opt, calls = run_fsdp2(adam_spd, rank, world)
    res["fsdp2_foreach"] = max_diff(full_params(model), ref[STEPS])
    res["fsdp2_collectives_per_step"] = calls
    ranks_fired = fired_per_rank(opt)
    res["fsdp2_ranks_agree"] = all(f == ranks_fired[0] for f in ranks_fired)
    model, opt, calls = run_fsdp2(lambda m: adam_spd(m, foreach=False), rank, world)
    res["fsdp2_single_tensor"] = max_diff(full_params(model), ref[STEPS])

    # The naive per-shard rule (no reduction) must visibly differ.
    real = SF.reduce_partial_sums
    SF.reduce_partial_sums = lambda sums, params: sums
    try:
        model, opt, _ = run_fsdp2(adam_spd, rank, world)
        res["naive_per_shard"] = max_diff(full_params(model), ref[STEPS])
        ranks_fired = fired_per_rank(opt)
        res["naive_ranks_agree"] = all(f == ranks_fired[0] for f in ranks_fired)
    finally:
        SF.reduce_partial_sums = real

    # The foreach (CUDA) phase-1 path, forced on CPU.
    real_sliced = SF._sliced_phase1
    SF._sliced_phase1 = SF._foreach_phase1
    try:
        model, _, _ = run_fsdp2(adam_spd, rank, world, steps=5)
        res["fsdp2_foreach_phase1"] = max_diff(full_params(model), ref[5])
    except Exception as e:  # recorded so that the report can say what breaks
        res["fsdp2_foreach_phase1"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        SF._sliced_phase1 = real_sliced

    # The SPD add-on on torch's Adam under FSDP2.
    ref_addon = single_process(adam_with_addon, STEPS)
    model, _, _ = run_fsdp2(adam_with_addon, rank, world)
    res["fsdp2_addon"] = max_diff(full_params(model), ref_addon[STEPS])

    # DDP: replicated plain tensors, nothing to reduce.
    ddp = nn.parallel.DistributedDataParallel(make_model())
    opt = adam_spd(ddp.module)
    train(ddp, opt, range(STEPS), rank, world)
    res["ddp"] = max_diff(full_params(ddp.module), ref[STEPS])

    # torch.distributed.checkpoint: save at step 10 with 2 processes, load with 3, continue.
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = STEPS // 2
    if world == 2:
        model = fsdp2()
        opt = adam_spd(model)
        train(model, opt, range(half), rank, world)
        msd, osd = get_state_dict(model, opt)
        save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    elif (ckpt / ".metadata").exists():
        model = fsdp2(seed=123)  # other initial values: the anchors must come from the file
        opt = adam_spd(model)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        load(state, checkpoint_id=str(ckpt))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        init = make_model()
        anchors = {
            n: opt.state[p]["anchor"].full_tensor() for n, p in model.named_parameters()
            if "anchor" in opt.state[p]
        }
        res["resume_anchors"] = max_diff(anchors, {n: init.get_parameter(n).detach() for n in anchors})
        res["resume_anchor_count"] = len(anchors)
        res["resume_at_load"] = max_diff(full_params(model), ref[half])
        train(model, opt, range(half, STEPS), rank, world)
        res["resume"] = max_diff(full_params(model), ref[STEPS])
    return res
