"""Optimizer step time of AdamSPD's paths against torch's AdamW and a per-tensor `if` SPD (CPU).

Every optimizer steps the same parameters with the same gradients, one step each in turn per
repetition (interleaved, so machine noise hits all alike); the table gives median step times
and ratios from that one run, and optimizer-state memory as a multiple of parameter memory.
Between repetitions (untimed) the gradient sign of a random half of the tensors is flipped, so
that the SPD condition fires on some tensors every step.

    PYTHONPATH=src python benchmarks/step_time.py [--models vit_b,bert_small,tiny] [--reps 7]
    PYTHONPATH=src python benchmarks/step_time.py --device cuda ...   # benchmarks/gpu_step_time.py
    PYTHONPATH=src python benchmarks/addon_overhead.py                 # the SPD add-on's overhead

Targets (issues 2 and 10, ViT-B list): the default ``AdamSPD()`` (the C kernel on CPU, built
when the optimizer is constructed) and ``fused=True`` <= 1.5x AdamW(fused=True); multi-tensor
<= 1.3x AdamW(foreach=True); 2,000 tiny tensors: the default >= 3x faster than the per-tensor `if`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _per_tensor_if import PerTensorIfSPD

from spdecay import AdamSPD


def vit_b16_shapes() -> list[tuple[int, ...]]:
    d, mlp, tokens, classes = 768, 3072, 197, 1000
    shapes: list[tuple[int, ...]] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, tokens, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    return shapes + [(d,), (d,), (classes, d), (classes,)]


def bert_small_shapes() -> list[tuple[int, ...]]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): 22.7M parameters, the default task's model."""
    d, ff, vocab = 384, 1536, 30522
    shapes: list[tuple[int, ...]] = [(vocab, d), (512, d), (2, d), (d,), (d,)]
    for _ in range(6):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,)]
    return shapes + [(d, d), (d,)]


def tiny_shapes() -> list[tuple[int, ...]]:
    """2,000 small tensors (biases, norms, scales): where per-tensor overhead dominates."""
    g = torch.Generator().manual_seed(0)
    return [(int(n),) for n in torch.randint(1, 257, (2000,), generator=g)]


MODELS: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]]]] = {
    "vit_b": ("ViT-B/16", vit_b16_shapes),
    "bert_small": ("BERT-small (MiniLM-L6)", bert_small_shapes),
    "tiny": ("2,000 tiny tensors", tiny_shapes),
}


def optimizers(with_single: bool) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    out: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "AdamSPD() default": lambda ps: AdamSPD(ps, lr=1e-4),
        "AdamSPD(fused=True)": lambda ps: AdamSPD(ps, lr=1e-4, fused=True),
        "AdamSPD(foreach=True)": lambda ps: AdamSPD(ps, lr=1e-4, foreach=True),
    }
    if with_single:
        out["AdamSPD(foreach=False)"] = lambda ps: AdamSPD(ps, lr=1e-4, foreach=False)
    out["per-tensor if (reference)"] = lambda ps: PerTensorIfSPD(ps, lr=1e-4, reference_memory=True)
    return out


def state_multiple(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    """Bytes of parameter-sized optimizer state per byte of parameters (0-d step counts left out)."""
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values()
                      for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return state_bytes / sum(p.numel() * p.element_size() for p in params)


def bench(key: str, reps: int, with_single: bool) -> list[dict]:
    label, make_shapes = MODELS[key]
    shapes = make_shapes()
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=gen) * 0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    numel = sum(p.numel() for p in params)
    print(f"\n{label}: {numel / 1e6:.1f}M parameters in {len(params)} tensors", flush=True)
    opts = {name: build(params) for name, build in optimizers(with_single).items()}
    for opt in opts.values():  # warm-up: state, anchors, kernel build, allocator
        opt.step()
        opt.step()
    times: dict[str, list[float]] = {name: [] for name in opts}
    flip = torch.Generator().manual_seed(1)
    fired = []
    for _ in range(reps):
        for i in torch.randperm(len(params), generator=flip)[: len(params) // 2]:
            params[i].grad.neg_()
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
        fired.append(opts["AdamSPD(fused=True)"].spd_stats().fired.float().mean().item())
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    rows = []
    for name, ms in medians.items():
        rows.append(dict(model=label, optimizer=name, ms=ms,
                         x_fused=ms / medians["AdamW(fused=True)"],
                         x_foreach=ms / medians["AdamW(foreach=True)"],
                         x_if=medians["per-tensor if (reference)"] / ms,
                         memory=state_multiple(opts[name], params)))
        print(f"  {name:28s} {ms:9.1f} ms", flush=True)
    print(f"  SPD fired on {statistics.mean(fired):.0%} of tensors per step")
    return rows


def memory_rows() -> list[tuple[str, float]]:
    """State memory of AdamSPD's anchor options on a small model (exact byte counts)."""
    out = []
    for name, kw in [("anchor='init' (fp32 anchors)", {}), ("anchor='zero' (PEFT)", {"anchor": "zero"}),
                     ("anchor_dtype=torch.bfloat16", {"anchor_dtype": torch.bfloat16})]:
        params = [torch.randn(64, 64, requires_grad=True), torch.randn(64, requires_grad=True)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = AdamSPD(params, lr=1e-3, **kw)
        opt.step()
        out.append((name, state_multiple(opt, params)))
    ref = [torch.randn(64, 64, requires_grad=True)]
    ref[0].grad = torch.randn_like(ref[0])
    opt = PerTensorIfSPD(ref, reference_memory=True)
    opt.step()
    out.append(("reference structure", state_multiple(opt, ref)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="vit_b,bert_small,tiny")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-single", action="store_true",
                    help="skip the single-tensor (for-loop) path, slow on large models")
    args, rest = ap.parse_known_args(argv)
    if args.device == "cuda":
        sys.path.insert(0, str(Path(__file__).parent))
        import gpu_step_time

        gpu_step_time.main(rest)
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps} "
          "interleaved steps")
    rows = []
    for key in args.models.split(","):
        if key not in MODELS:
            ap.error(f"unknown model {key!r}; choose from {', '.join(MODELS)}")
        rows += bench(key, args.reps, with_single=not args.no_single)
    print("\n| model | optimizer | ms/step | x AdamW fused | x AdamW foreach | "
          "speed-up over per-tensor if | state memory (x params) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['optimizer']} | {r['ms']:.1f} | {r['x_fused']:.2f} | "
              f"{r['x_foreach']:.2f} | {r['x_if']:.1f}x | {r['memory']:.2f} |")
    print("\nAdamSPD state memory by anchor option (x parameter memory):")
    for name, mult in memory_rows():
        print(f"  {name:32s} {mult:.2f}x")


if __name__ == "__main__":
    main()
