"""AdamSPD with FSDP2 (``torch.distributed.fsdp.fully_shard``) and a distributed checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2_torchrun.py --steps 10 --save /tmp/spd_ckpt
    torchrun --nproc_per_node=3 examples/fsdp2_torchrun.py --steps 10 --load /tmp/spd_ckpt

Parameters, Adam moments and SPD anchors are DTensors sharded alike; AdamSPD sums each tensor's
inner product and norms over the shards (one all-reduce per param group per step), so every rank
takes the single-process decision. The checkpoint (model + optimizer, anchors included) is
written with ``torch.distributed.checkpoint`` and can be loaded by a different number of
processes. gloo on CPU, NCCL on CUDA. Rank 0 prints the largest difference to a single-process
run over the same total number of steps.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spdecay import AdamSPD, param_groups

DIM, BATCH = 16, 12  # BATCH divides by 1, 2, 3, 4 and 6 processes


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, DIM)
        self.block = Block()
        self.head = nn.Linear(DIM, 2)  # 2 rows: an empty shard on 3 ranks

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens)).mean(1))


def tiny_transformer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyTransformer().double()


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 11, (BATCH, 6), generator=g)
    labels = (tokens == 3).any(1).long()
    per = BATCH // world
    return tokens[rank * per : (rank + 1) * per], labels[rank * per : (rank + 1) * per]


def train(model, opt, steps: range, rank: int = 0, world: int = 1, device="cpu") -> None:
    for t in steps:
        opt.zero_grad()
        tokens, labels = batch(t, rank, world)
        F.cross_entropy(model(tokens.to(device)), labels.to(device)).backward()
        opt.step()


def make_optimizer(model: nn.Module) -> AdamSPD:
    return AdamSPD(param_groups(model, head="head", weight_decay=1.0), lr=2e-2)


def main() -> None:
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save", help="write a checkpoint here after training")
    parser.add_argument("--load", help="resume from this checkpoint (any number of processes)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)

    model = tiny_transformer().to(device)
    fully_shard(model.block)
    fully_shard(model)
    opt = make_optimizer(model)  # after fully_shard: the optimizer sees the DTensors
    start = 0
    if args.load:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": torch.zeros((), dtype=torch.long)}
        load(state, checkpoint_id=args.load)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
    train(model, opt, range(start, start + args.steps), rank, world, device)
    if args.save:
        msd, osd = get_state_dict(model, opt)
        save({"model": msd, "optim": osd, "step": torch.tensor(start + args.steps)},
             checkpoint_id=args.save)

    full = {n: p.full_tensor().cpu() for n, p in model.named_parameters()}
    summary = opt.spd_stats().summary()  # the same on every rank
    if rank == 0:
        ref_model = tiny_transformer()
        train(ref_model, make_optimizer(ref_model), range(start + args.steps))
        diff = max((full[n] - p.detach()).abs().max().item() for n, p in ref_model.named_parameters())
        print(f"{world} processes, steps {start}..{start + args.steps}: SPD {summary}; "
              f"max |difference| to one process: {diff:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
