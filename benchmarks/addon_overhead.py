"""Overhead of the SPD add-on over the bare optimizer, ViT-B/16-shaped parameter list (86.6M).

The bare optimizer and the same optimizer with the add-on (torch ops, and ``fused=True``: the C
kernel) are timed side by side in one run (interleaved repetitions, so machine noise hits all
alike) and reported as ratios of median step times. Target: <= 1.35x.

    PYTHONPATH=src python benchmarks/addon_overhead.py [--reps 9] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spdecay import SelectiveProjectionDecay


def vit_b16_shapes() -> list[tuple[int, ...]]:
    d, mlp, layers, tokens, classes = 768, 3072, 12, 197, 1000
    shapes: list[tuple[int, ...]] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, tokens, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    return shapes + [(d,), (d,), (classes, d), (classes,)]


def make(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in vit_b16_shapes():
        p = (torch.randn(s, generator=g) * 0.02).requires_grad_()
        p.grad = torch.randn(s, generator=g) * 1e-3
        params.append(p)
    return params


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def compare(name: str, build, reps: int) -> dict[str, float]:
    """Bare optimizer, + add-on (torch ops, fused=False) and + add-on (the C kernel: fused=True,
    also the CPU default), interleaved."""
    variants = {"bare": None, "add-on": False, "add-on fused": True}
    params = {k: make(0) for k in variants}
    opts, addons = {}, {}
    for k, fused in variants.items():
        opts[k] = build(params[k])
        if fused is not None:
            addons[k] = SelectiveProjectionDecay(opts[k], weight_decay=1.0, fused=fused)
    for _ in range(2):  # warm-up: state, anchors, allocator, kernel build
        for opt in opts.values():
            opt.step()
    times: dict[str, list[float]] = {k: [] for k in variants}
    fired = []
    flip = torch.Generator().manual_seed(1)
    for _ in range(reps):
        # Untimed: flip the gradient sign of a random half of the tensors, so that the SPD
        # condition fires on some tensors every step (fixed gradients would never fire it).
        for i in torch.randperm(len(params["bare"]), generator=flip)[: len(params["bare"]) // 2]:
            for ps in params.values():
                ps[i].grad.neg_()
        for k, opt in opts.items():
            times[k].append(timed(opt.step))
        fired.append(addons["add-on"].spd_stats().fired.float().mean().item())
    med = {k: statistics.median(ts) * 1e3 for k, ts in times.items()}
    print(f"{name:<22} bare {med['bare']:7.1f} ms   +add-on {med['add-on']:7.1f} ms "
          f"({med['add-on'] / med['bare']:4.2f}x)   +add-on fused {med['add-on fused']:7.1f} ms "
          f"({med['add-on fused'] / med['bare']:4.2f}x)   fired on {statistics.mean(fired):.0%} "
          "of tensors", flush=True)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["sgd", "adamw"], default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = sum(p.numel() for p in make(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(vit_b16_shapes())} tensors, {n / 1e6:.1f}M params, median of {args.reps}")
    if args.only in (None, "sgd"):
        compare("SGD(momentum, foreach)", lambda ps: torch.optim.SGD(
            ps, lr=1e-3, momentum=0.9, foreach=True), args.reps)
    if args.only in (None, "adamw"):
        compare("AdamW(foreach)", lambda ps: torch.optim.AdamW(
            ps, lr=1e-4, weight_decay=0.0, foreach=True), args.reps)


if __name__ == "__main__":
    main()
