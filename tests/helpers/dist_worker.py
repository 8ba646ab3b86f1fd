"""Distributed checks for tests/integrations/test_distributed.py, run in each process by
torch.multiprocessing.spawn (gloo, CPU).

Every check trains a tiny float64 transformer-like model for 20 steps and compares the gathered
parameters with a single-process run on the same global batches. Rank 0 writes the measured
numbers to ``<out>/results_<world>.json``; the test asserts on them. Run this file directly to
print the table of max differences of README's "Distributed" section:

    .venv/bin/python -m tests.helpers.dist_worker
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


def adam_with_addon(model: nn.Module, fused: bool = False) -> tuple[torch.optim.Optimizer, Any]:
    from spdecay import SelectiveProjectionDecay

    gs = groups(model)
    for g in gs:  # the add-on reads its own keys; the base Adam has no decay in SPD groups
        g["spd_weight_decay"] = g.pop("weight_decay") if g.get("spd", True) else 0.0
    base = torch.optim.Adam(gs, lr=2e-2, foreach=False)
    return base, SelectiveProjectionDecay(base, weight_decay=1.0, fused=fused)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0,
          world: int = 1) -> None:
    for t in steps:
        opt.zero_grad(set_to_none=True)
        tokens, labels = batch(t, rank, world)
        F.cross_entropy(model(tokens), labels).backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from spdecay.spd.reduce import is_dtensor

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
    """Train the FSDP2 model; returns it, what ``make_opt`` made, SPD all-reduces per step."""
    model = fsdp2()
    made = make_opt(model)
    opt = made[0] if isinstance(made, tuple) else made
    calls = [0]
    with count_all_reduce(calls):  # FSDP2 itself uses all-gather / reduce-scatter only
        train(model, opt, range(steps), rank, world)
    return model, made, calls[0] / steps


def check_reduce_layouts(rank: int, world: int) -> dict[str, float]:
    """reduce_partial_sums on hand-made DTensors: Shard(0), Shard(1), Replicate, uneven and
    empty shards, 1-D and 2-D meshes, mixed with a plain tensor; compared with whole sums."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from spdecay.spd.reduce import reduce_partial_sums, to_local

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
    errors["plan_uses_own_group"] = _plan_follows_mesh_group(world)
    from torch.distributed.tensor import DTensor, Partial

    partial = DTensor.from_local(torch.ones(2, dtype=torch.float64), mesh1, [Partial()])
    try:
        reduce_partial_sums(torch.zeros(1, 1, dtype=torch.float64), [partial])
        errors["partial_rejected"] = False
    except ValueError as e:
        errors["partial_rejected"] = "Partial" in str(e)
    return errors




def _plan_follows_mesh_group(world: int) -> bool:
    """An equal mesh on another process group (DeviceMesh compares equal regardless of its
    group, as after destroy/init_process_group) must be reduced over its own group."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from spdecay.spd.reduce import reduce_partial_sums

    full = torch.arange(6.0, dtype=torch.float64)
    groups = []
    real = dist.all_reduce

    def record(tensor: torch.Tensor, *args: Any, group: Any = None, **kwargs: Any) -> Any:
        groups.append(group)
        return real(tensor, *args, group=group, **kwargs)

    mesh_a = init_device_mesh("cpu", (world,))
    mesh_b = DeviceMesh.from_group(dist.new_group(list(range(world))), "cpu")
    assert mesh_a == mesh_b
    dist.all_reduce = record
    try:
        for mesh in (mesh_a, mesh_b):
            p = distribute_tensor(full, mesh, [Shard(0)])
            reduce_partial_sums(p.to_local().sum().view(1, 1), [p])
    finally:
        dist.all_reduce = real
    return groups == [mesh_a.get_group(0), mesh_b.get_group(0)] and groups[0] is not groups[1]


def _plans_hold_no_groups() -> bool:
    """The cached reduction plans must not keep ProcessGroups alive past destroy_process_group:
    torn down at interpreter exit, gloo's threads can abort the process."""
    import spdecay.spd.reduce as S

    plans = [plan for _, plan in S._PLAN_CACHE.values() if plan is not None]
    return bool(plans) and not any(
        isinstance(x, dist.ProcessGroup) for plan in plans for step in plan.steps for x in step
    )


# ------------------------------------------------------------------------------- trajectories


def _agree(values: Any) -> bool:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return all(v == out[0] for v in out)


def sharding_facts(model: nn.Module, opt: torch.optim.Optimizer, key: str) -> dict[str, Any]:
    """Anchors are DTensors laid out like their parameters; which tensors have an empty local
    shard on some rank (more ranks than rows)."""
    from spdecay.spd.reduce import is_dtensor

    alike, count, empty = True, 0, []
    for name, p in model.named_parameters():
        a = opt.state[p].get(key)
        if a is not None:
            count += 1
            alike &= (is_dtensor(a) and a.device_mesh == p.device_mesh
                      and a.placements == p.placements and a.to_local().shape == p.to_local().shape)
        if p.to_local().numel() == 0:
            empty.append(name)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, empty)
    return {"anchors_sharded_like_params": alike, "anchor_count": count,
            "empty_shards": sorted({n for names in gathered for n in names})}


def check_adam_spd_fsdp2(rank: int, world: int, ref: dict) -> dict[str, Any]:
    import spdecay.spd.backends.multi_tensor as MT
    import spdecay.spd.driver as D

    res: dict[str, Any] = {}
    # the default (the C kernel on CPU, on the local shards)
    model, opt, calls = run_fsdp2(adam_spd, rank, world)
    res["fsdp2"] = max_diff(full_params(model), ref[STEPS])
    res["fsdp2_collectives_per_step"] = calls
    res["fsdp2_ranks_agree"] = _agree(opt.spd_stats().fired.tolist())
    res.update({f"fsdp2_{k}": v for k, v in sharding_facts(model, opt, "anchor").items()})
    # single-tensor reference path
    model, opt, _ = run_fsdp2(lambda m: adam_spd(m, foreach=False), rank, world)
    res["fsdp2_single_tensor"] = max_diff(full_params(model), ref[STEPS])
    # torch multi-tensor path (its sums go through the same reduction)
    model, _, _ = run_fsdp2(lambda m: adam_spd(m, foreach=True), rank, world)
    res["fsdp2_multi_tensor"] = max_diff(full_params(model), ref[STEPS])
    # fused CPU kernel on the local shards, asked for explicitly
    model, opt, _ = run_fsdp2(lambda m: adam_spd(m, fused=True), rank, world)
    res["fsdp2_fused"] = max_diff(full_params(model), ref[STEPS])
    res["fsdp2_fused_ranks_agree"] = _agree(opt.spd_stats().fired.tolist())
    # the foreach phase 1 that CUDA tensors take, forced on CPU
    real_sliced = MT._walk_in_slices
    MT._walk_in_slices = lambda device: False
    try:
        model, _, _ = run_fsdp2(lambda m: adam_spd(m, foreach=True), rank, world, steps=5)
        res["fsdp2_foreach_phase1"] = max_diff(full_params(model), ref[5])
    except Exception as e:  # recorded so that the report says what breaks
        res["fsdp2_foreach_phase1"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        MT._walk_in_slices = real_sliced
    # The naive per-shard rule (no reduction) must visibly differ: the test can fail.
    real = D.reduce_columns  # the driver reduces the sums of all groups of a step
    D.reduce_columns = lambda sums, sources: sums
    try:
        model, opt, _ = run_fsdp2(adam_spd, rank, world)  # the default path, without reduction
        res["naive_fsdp2"] = max_diff(full_params(model), ref[STEPS])
        res["naive_fsdp2_ranks_agree"] = _agree(opt.spd_stats().fired.tolist())
    finally:
        D.reduce_columns = real
    return res


def check_addon_fsdp2(rank: int, world: int, ref: dict) -> dict[str, Any]:
    """SelectiveProjectionDecay on torch's Adam under FSDP2, and its naive per-shard twin."""
    import spdecay.spd.driver as D

    res: dict[str, Any] = {}
    model, (base, spd), calls = run_fsdp2(adam_with_addon, rank, world)
    res["addon_fsdp2"] = max_diff(full_params(model), ref[STEPS])
    res["addon_fsdp2_collectives_per_step"] = calls
    res["addon_fsdp2_ranks_agree"] = _agree(spd.spd_stats().fired.tolist())
    res.update({f"addon_fsdp2_{k}": v for k, v in sharding_facts(model, base, "anchor").items()})
    model, (base, spd), _ = run_fsdp2(lambda m: adam_with_addon(m, fused=True), rank, world)
    res["addon_fsdp2_fused"] = max_diff(full_params(model), ref[STEPS])
    res["addon_fsdp2_fused_ranks_agree"] = _agree(spd.spd_stats().fired.tolist())
    real = D.reduce_columns
    D.reduce_columns = lambda sums, sources: sums
    try:
        model, _, _ = run_fsdp2(adam_with_addon, rank, world, steps=10)
        res["naive_addon_fsdp2"] = max_diff(full_params(model), ref[10])
    finally:
        D.reduce_columns = real
    return res


def check_ddp(rank: int, world: int, ref: dict, ref_addon: dict) -> dict[str, Any]:
    """DDP: every rank holds whole plain tensors, so SPD reduces nothing and needs nothing."""
    res: dict[str, Any] = {}
    for name, make_opt, want in (("ddp", adam_spd, ref), ("addon_ddp", adam_with_addon, ref_addon)):
        ddp = nn.parallel.DistributedDataParallel(make_model())
        opt = make_opt(ddp.module)
        opt = opt[0] if isinstance(opt, tuple) else opt
        calls = [0]
        with count_all_reduce(calls):
            train(ddp, opt, range(STEPS), rank, world)
        res[name] = max_diff(full_params(ddp.module), want[STEPS])
        res[f"{name}_spd_collectives"] = calls[0]
    return res


def check_checkpoint(rank: int, world: int, ckpt: Path, ref: dict, ref_addon: dict) -> dict[str, Any]:
    """torch.distributed.checkpoint: save at step 10 with 2 processes; with 3, load into a model
    initialised from another seed (so anchors can only come from the file) and continue."""
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = STEPS // 2
    res: dict[str, Any] = {}
    runs = (("resume", adam_spd, "anchor", ref), ("addon_resume", adam_with_addon, "anchor", ref_addon))
    for name, make_opt, key, want in runs:
        path = str(ckpt / name)
        if world == 2:
            model = fsdp2()
            opt = make_opt(model)
            opt = opt[0] if isinstance(opt, tuple) else opt
            train(model, opt, range(half), rank, world)
            msd, osd = get_state_dict(model, opt)
            save({"model": msd, "optim": osd}, checkpoint_id=path)
        elif (ckpt / name / ".metadata").exists():
            model = fsdp2(seed=123)
            made = make_opt(model)  # the add-on must stay alive: its hooks do the projection
            opt = made[0] if isinstance(made, tuple) else made
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            load(state, checkpoint_id=path)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            init = make_model()
            anchors = {n: opt.state[p][key].full_tensor() for n, p in model.named_parameters()
                       if key in opt.state[p]}
            res[f"{name}_anchors"] = max_diff(anchors, {n: init.get_parameter(n).detach() for n in anchors})
            res[f"{name}_anchor_count"] = len(anchors)
            res[f"{name}_at_load"] = max_diff(full_params(model), want[half])
            train(model, opt, range(half, STEPS), rank, world)
            res[name] = max_diff(full_params(model), want[STEPS])
    return res


def worker(rank: int, world: int, port: int, out: str, ckpt: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res: dict[str, Any] = check_reduce_layouts(rank, world)
        ref = single_process(adam_spd, STEPS)
        ref_addon = single_process(adam_with_addon, STEPS)
        res.update(check_adam_spd_fsdp2(rank, world, ref))
        res.update(check_addon_fsdp2(rank, world, ref_addon))
        res.update(check_ddp(rank, world, ref, ref_addon))
        res.update(check_checkpoint(rank, world, Path(ckpt), ref, ref_addon))
        res["plans_hold_no_groups"] = _plans_hold_no_groups()
        if rank == 0:
            (Path(out) / f"results_{world}.json").write_text(json.dumps(res, indent=1))
    finally:
        dist.destroy_process_group()


def spawn(world: int, out: Path, ckpt: Path) -> dict[str, Any]:
    """Run :func:`worker` in ``world`` processes (torch.multiprocessing); rank 0's numbers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, str(out), str(ckpt)), nprocs=world)
    return json.loads((out / f"results_{world}.json").read_text())


ROWS = [  # (setting, result key, world sizes)
    ("AdamSPD, FSDP2 (multi-tensor path)", "fsdp2", (2, 3)),
    ("AdamSPD, FSDP2 (single-tensor path)", "fsdp2_single_tensor", (2, 3)),
    ("AdamSPD, FSDP2 (fused CPU kernel)", "fsdp2_fused", (2, 3)),
    ("AdamSPD, FSDP2 (CUDA's foreach phase 1, on CPU; 5 steps)", "fsdp2_foreach_phase1", (2, 3)),
    ("SPD add-on on torch Adam, FSDP2", "addon_fsdp2", (2, 3)),
    ("SPD add-on (fused=True) on torch Adam, FSDP2", "addon_fsdp2_fused", (2, 3)),
    ("AdamSPD, DDP", "ddp", (2, 3)),
    ("SPD add-on on torch Adam, DDP", "addon_ddp", (2, 3)),
    ("AdamSPD, DCP saved by 2 at step 10, loaded by 3, to step 20", "resume", (3,)),
    ("SPD add-on, DCP saved by 2, loaded by 3, to step 20", "addon_resume", (3,)),
    ("naive per-shard AdamSPD (no reduction), FSDP2", "naive_fsdp2", (2, 3)),
    ("naive per-shard add-on, FSDP2 (10 steps)", "naive_addon_fsdp2", (2, 3)),
]


def main() -> None:
    """Print the max |difference| to the single-process run per setting (README table)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = {w: spawn(w, Path(tmp), Path(tmp) / "ckpt") for w in (2, 3)}
    print("| setting | 2 processes | 3 processes |\n|---|---|---|")
    for label, key, worlds in ROWS:
        cells = [f"{results[w][key]:.1e}" if w in worlds else "-" for w in (2, 3)]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
