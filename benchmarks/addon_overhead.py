"""Overhead of the SPD add-on over the bare optimizer, ViT-B/16-shaped parameter list (86.6M).

Bare and wrapped optimizers are timed side by side in one run (interleaved repetitions, so
machine noise hits both alike) and reported as ratios of median step times. Target: <= 1.35x.

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
    bare_params, spd_params = make(0), make(0)
    bare = build(bare_params)
    wrapped = build(spd_params)
    spd = SelectiveProjectionDecay(wrapped, weight_decay=1.0)
    for _ in range(2):  # warm-up: state, anchors, allocator
        bare.step()
        wrapped.step()
    tb, tw, fired = [], [], []
    flip = torch.Generator().manual_seed(1)
    for _ in range(reps):
        # Untimed: flip the gradient sign of a random half of the tensors, so that the SPD
        # condition fires on some tensors every step (fixed gradients would never fire it).
        for i in torch.randperm(len(bare_params), generator=flip)[: len(bare_params) // 2]:
            bare_params[i].grad.neg_()
            spd_params[i].grad.neg_()
        tb.append(timed(bare.step))
        tw.append(timed(wrapped.step))
        fired.append(spd.stats().fired.float().mean().item())
    mb, mw = statistics.median(tb), statistics.median(tw)
    print(f"{name:<22} bare {mb * 1e3:7.1f} ms   +SPD add-on {mw * 1e3:7.1f} ms   "
          f"ratio {mw / mb:5.2f}x   (fired on {statistics.mean(fired):.0%} of tensors)")
    return {"bare_ms": mb * 1e3, "addon_ms": mw * 1e3, "ratio": mw / mb}


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
