"""DeepSpeed ZeRO checks for tests/integrations/test_deepspeed.py, run in each process by
torch.multiprocessing.spawn (gloo, CPU, float32).

Every check trains a small model of several tensors for 12 steps through a DeepSpeed engine and
compares the parameters with a single-process run on the same global batches. A *full* run does
every check; the other (the test's 3-process run) only the trajectories whose partitions depend
on the number of processes (ZeRO-1/2/3 and the add-on on ZeRO-2): resumes, refusals and controls
do not. Rank 0 writes the
measured numbers to ``<out>/ds_results_<world>.json``; the test asserts on them. Run this file
directly to print the table of max differences (docs, /work/notes/deepspeed.md):

    .venv/bin/python -m tests.helpers.ds_worker
"""

from __future__ import annotations

import faulthandler
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ, CLASSES, BATCH = 11, 4, 3, 3, 6  # BATCH divides by 2 and 3 ranks
STEPS, SAVE_AT = 12, 6
LR = 3e-2
HANG_S = int(os.environ.get("SPDECAY_DS_HANG_S", "480"))  # a run takes ~1 min (plus DeepSpeed's one-time op build)


class Net(nn.Module):
    """Backbone (anchored at the initial values): embedding 44 + fc1 28 + 7 + fc2 28 + 4 = 111
    elements, so ZeRO splits the embedding or fc1's weight across two ranks' partitions and
    every rank holds pieces of several tensors; an adapter anchored at zero; a 2-element gate
    in its own group (with 2 or 3 ranks some partitions hold only padding); head and norm
    without SPD."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, 7)
        self.fc2 = nn.Linear(7, DIM)
        self.adapter = nn.Linear(DIM, DIM, bias=False)
        self.gate = nn.Parameter(torch.tensor([1.0, 0.5]))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.gate[0] * self.fc2(F.gelu(self.fc1(x)))
        x = x + self.gate[1] * self.adapter(x)
        return self.head(self.norm(x).mean(1))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        model.adapter.weight.mul_(0.1)
    return model


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Backbone: SPD to the initial value; adapter: SPD to zero; gate: SPD; head, norm: AdamW."""
    backbone, adapter, gate, rest = [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith(("head", "norm")):
            rest.append(p)
        elif name.startswith("adapter"):
            adapter.append(p)
        elif name == "gate":
            gate.append(p)
        else:
            backbone.append(p)
    return [
        {"params": backbone, "weight_decay": 1.0},
        {"params": adapter, "anchor": "zero", "weight_decay": 0.5},
        {"params": gate, "weight_decay": 1.0},
        {"params": rest, "spd": False, "weight_decay": 0.01},
    ]


def adam_spd(model: nn.Module) -> tuple[torch.optim.Optimizer, None]:
    from spdecay import AdamSPD

    return AdamSPD(groups(model), lr=LR), None


def adamw_with_addon(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    from spdecay import SelectiveProjectionDecay

    gs = groups(model)
    for g in gs:  # the add-on reads its own keys; torch AdamW decays only the non-SPD group
        spd = g.get("spd", True)
        g["spd_weight_decay"] = g["weight_decay"] if spd else 0.0
        if spd:
            g["weight_decay"] = 0.0
    base = torch.optim.AdamW(gs, lr=LR, foreach=False)
    return base, SelectiveProjectionDecay(base, weight_decay=1.0)


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    per = BATCH // world
    return tokens[rank * per : (rank + 1) * per], labels[rank * per : (rank + 1) * per]


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):  # ZeRO-3: gather them first
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[n] - b[n]).abs().max().item() for n in a)


def fired_of(opt: torch.optim.Optimizer, addon: Any, model: nn.Module) -> dict[str, bool]:
    """{parameter name: fired} of the last step. Unnamed groups report "group{g}.param{i}";
    DeepSpeed runs report the layouts' names (the model's parameter names)."""
    stats = (addon or opt).spd_stats()
    names = {id(p): n for n, p in model.named_parameters()}
    by_index = {f"group{g}.param{i}": names[id(p)]
                for g, group in enumerate(groups(model)) for i, p in enumerate(group["params"])}
    return {by_index.get(n, n): bool(f) for n, f in zip(stats.names, stats.fired.tolist())}


def single_process(make_opt: Callable) -> tuple[dict[int, dict], list[dict[str, bool]]]:
    """Parameters after every step, and which SPD tensors fired at each step."""
    model = make_model()
    opt, addon = make_opt(model)
    snapshots, fired = {0: params_of(model)}, []
    for t in range(STEPS):
        opt.zero_grad(set_to_none=True)
        tokens, labels = batch(t)
        F.cross_entropy(model(tokens), labels).backward()
        opt.step()
        snapshots[t + 1] = params_of(model)
        fired.append(fired_of(opt, addon, model))
    return snapshots, fired


# ------------------------------------------------------------------------------ DeepSpeed runs
def config(world: int, stage: int, **zero: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # let offload keep the client optimizer
        "gradient_clipping": 0.0,  # DeepSpeed clips at norm 1.0 unless told otherwise
        "steps_per_print": 10**9,
    }


def engine_for(world: int, stage: int, make_opt: Callable, seed: int = 0,
               top: dict[str, Any] | None = None, **zero: Any):
    """An engine; ``top``: extra top-level config keys, ``zero``: extra zero_optimization keys."""
    import deepspeed

    model = make_model(seed)
    opt, addon = make_opt(model)
    cfg = {**config(world, stage, **zero), **(top or {})}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt, addon


def plain_adamw(model: nn.Module) -> tuple[torch.optim.Optimizer, None]:
    return torch.optim.AdamW(model.parameters(), lr=LR), None


def train(engine: Any, steps: range, rank: int, world: int, on_step: Callable | None = None) -> None:
    for t in steps:
        tokens, labels = batch(t, rank, world)
        engine.backward(F.cross_entropy(engine(tokens), labels))
        engine.step()
        if on_step is not None:
            on_step(t + 1)


def check_trajectory(rank: int, world: int, stage: int, make_opt: Callable, want: dict,
                     ckpt: Path | None = None, **zero: Any) -> dict[str, Any]:
    """attach() then 12 steps; with ``ckpt`` also save at step 6 and resume in a fresh engine
    built from another seed (its anchors can only come from the checkpoint)."""
    from spdecay.integrations.deepspeed import attach

    engine, opt, addon = engine_for(world, stage, make_opt, **zero)
    layouts = attach(engine)
    pieces: list[Any] = [None] * world  # per rank, per group: the logical ids of its segments
    dist.all_gather_object(pieces, [list(lay.logical_ids) for lay in layouts])
    res: dict[str, Any] = {"pieces": pieces}
    fired: list[dict[str, bool]] = []

    def on_step(t: int) -> None:
        fired.append(fired_of(opt, addon, engine.module))
        if ckpt is not None and t == SAVE_AT:
            engine.save_checkpoint(str(ckpt), tag=f"step{SAVE_AT}")

    train(engine, range(STEPS), rank, world, on_step)
    res["diff"] = max_diff(params_of(engine.module), want[STEPS])
    res["fired"] = fired
    if ckpt is not None:
        engine2, opt2, _ = engine_for(world, stage, make_opt, seed=123, **zero)
        attach(engine2)
        engine2.load_checkpoint(str(ckpt), tag=f"step{SAVE_AT}")
        res["resume_at_load"] = max_diff(params_of(engine2.module), want[SAVE_AT])
        train(engine2, range(SAVE_AT, STEPS), rank, world)
        res["resume"] = max_diff(params_of(engine2.module), want[STEPS])
    return res


def check_whole_partition_layout(rank: int, world: int, want: dict) -> float:
    """Control: a layout that calls each flat partition one layer (what AdamSPD did before
    layouts existed) must be far from the single-process run, or the comparison is blind."""
    from spdecay.spd.layout import FlatLayout

    engine, opt, _ = engine_for(world, 1, adam_spd)
    for flat in engine.optimizer.single_partition_of_fp32_groups:
        opt.set_flat_layout(flat, FlatLayout((0,), (flat.numel(),), (0,), 1, process_group=None))
    train(engine, range(STEPS), rank, world)
    return max_diff(params_of(engine.module), want[STEPS])


def check_refused(rank: int, world: int, stage: int, make_opt: Callable) -> dict[str, Any]:
    """Without attach() the first step must raise, leaving the partition untouched."""
    engine, opt, _ = engine_for(world, stage, make_opt)
    flats = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    try:
        train(engine, range(1), rank, world)
    except Exception as e:  # noqa: BLE001 - the test asserts on type and message
        after = [p.detach() for g in opt.param_groups for p in g["params"]]
        unchanged = all(torch.equal(a, b) for a, b in zip(flats, after))
        return {"error": f"{type(e).__name__}: {e}", "unchanged": unchanged}
    return {"error": None}


def check_attach_refused(world: int, stage: int, make_opt: Callable,
                         top: dict[str, Any] | None = None, **zero: Any) -> str | None:
    from spdecay.integrations.deepspeed import attach

    engine, _, _ = engine_for(world, stage, make_opt, top=top, **zero)
    try:
        attach(engine)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def run_all(rank: int, world: int, out: Path, full: bool = True) -> dict[str, Any]:
    ref, ref_fired = single_process(adam_spd)
    ref_addon, ref_addon_fired = single_process(adamw_with_addon)
    res: dict[str, Any] = {"ref_fired": ref_fired, "ref_addon_fired": ref_addon_fired}

    def guarded(key: str, fn: Callable, *args: Any, **kw: Any) -> None:
        # A crash on one rank would leave the others waiting in a collective: fail the run.
        start = time.perf_counter()
        try:
            res[key] = fn(*args, **kw)
            res.setdefault("seconds", {})[key] = round(time.perf_counter() - start, 2)
        except Exception as e:
            raise RuntimeError(f"rank {rank}: check {key!r} crashed") from e

    if not full:
        for stage in (1, 2, 3):
            guarded(f"s{stage}", check_trajectory, rank, world, stage, adam_spd, ref)
        guarded("addon_s2", check_trajectory, rank, world, 2, adamw_with_addon, ref_addon)
        return res
    for stage in (1, 2, 3):
        guarded(f"s{stage}", check_trajectory, rank, world, stage, adam_spd, ref,
                ckpt=out / f"ckpt_s{stage}_{world}")
        # the add-on's checkpoint and refusal paths do not depend on the stage: ZeRO-2 only
        guarded(f"addon_s{stage}", check_trajectory, rank, world, stage, adamw_with_addon,
                ref_addon, ckpt=out / f"ckpt_addon_s{stage}_{world}" if stage == 2 else None)
        guarded(f"no_attach_s{stage}", check_refused, rank, world, stage, adam_spd)
    guarded("addon_no_attach_s2", check_refused, rank, world, 2, adamw_with_addon)
    guarded("s0", check_trajectory, rank, world, 0, adam_spd, ref)  # no ZeRO: nothing flattened
    guarded("s2_round_robin_aligned", check_trajectory, rank, world, 2, adam_spd, ref,
            round_robin_gradients=True, parameter_alignment=True)
    guarded("whole_partition_layout", check_whole_partition_layout, rank, world, ref)
    guarded("attach_offload", check_attach_refused, world, 2, adam_spd,
            offload_optimizer={"device": "cpu"})
    guarded("attach_offload_s3", check_attach_refused, world, 3, adam_spd,
            offload_optimizer={"device": "cpu"})
    guarded("attach_param_offload_s3", check_attach_refused, world, 3, adam_spd,
            offload_param={"device": "cpu"})
    guarded("attach_bf16_no_zero", check_attach_refused, world, 0, adam_spd,
            top={"bf16": {"enabled": True}})
    guarded("attach_without_spd", check_attach_refused, world, 2, plain_adamw)
    return res


def worker(rank: int, world: int, port: int, out: str, full: bool = True) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A collective that some rank never joins would hang the test run: dump where and exit.
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    res = run_all(rank, world, Path(out), full)
    if rank == 0:
        (Path(out) / f"ds_results_{world}.json").write_text(json.dumps(res, indent=1))


def spawn(world: int, out: Path, full: bool = True) -> dict[str, Any]:
    """Run :func:`worker` in ``world`` processes (torch.multiprocessing); rank 0's numbers
    (``full``: every check, else the trajectories only)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, str(out), full), nprocs=world)
    return json.loads((out / f"ds_results_{world}.json").read_text())


ROWS: list[tuple[str, str, str | None]] = [  # (setting, result key, field)
    ("AdamSPD, no ZeRO (stage 0, fp32; attach has nothing to do)", "s0", "diff"),
    ("AdamSPD, ZeRO-1", "s1", "diff"),
    ("AdamSPD, ZeRO-2", "s2", "diff"),
    ("AdamSPD, ZeRO-3", "s3", "diff"),
    ("AdamSPD, ZeRO-2, round_robin_gradients + parameter_alignment", "s2_round_robin_aligned", "diff"),
    ("SPD add-on on torch AdamW, ZeRO-1", "addon_s1", "diff"),
    ("SPD add-on on torch AdamW, ZeRO-2", "addon_s2", "diff"),
    ("SPD add-on on torch AdamW, ZeRO-3", "addon_s3", "diff"),
    ("AdamSPD, ZeRO-1, saved at step 6, resumed in fresh engines", "s1", "resume"),
    ("AdamSPD, ZeRO-2, saved at step 6, resumed in fresh engines", "s2", "resume"),
    ("AdamSPD, ZeRO-3, saved at step 6, resumed in fresh engines", "s3", "resume"),
    ("SPD add-on, ZeRO-2, saved at step 6, resumed in fresh engines", "addon_s2", "resume"),
    ("control: each partition as one layer (the old behaviour), ZeRO-1", "whole_partition_layout", None),
]


def main() -> None:
    """Print the max |difference| to the single-process run per setting (docs table)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = {w: spawn(w, Path(tmp)) for w in (2, 3)}
    print("| setting (12 steps, float32) | 2 processes | 3 processes |\n|---|---|---|")
    for label, key, field in ROWS:
        cells = []
        for w in (2, 3):
            entry = results[w][key]
            cells.append(f"{entry if field is None else entry[field]:.1e}")
        print(f"| {label} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
