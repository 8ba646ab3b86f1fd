"""Optimizer step time on a CUDA GPU: AdamSPD's paths against torch's AdamW.

Parameter shapes of ViT-B/16 (86M), ViT-L/16 (304M) and a stack of LLaMA-7B decoder layers
(hidden 4096, MLP 11008), fp32, random data; gradients are fixed tensors (no backward), so only
the optimizer step is timed: CUDA events around each step after a warm-up, median over steps.

Two anchor set-ups bracket AdamSPD's cost:
- ``fire``: anchors placed so that the SPD condition fires *and* the ratio is positive for every
  tensor on every step: pass 2 runs over all parameters (worst case);
- ``none``: anchors at the initial values with constant gradients: the condition never fires and
  pass 2 returns at once (best case).

GB/s counts the bytes of the ideal algorithm (each tensor read or written once per pass), fp32:
AdamW 7 accesses per element (read p, g, m, v; write p, m, v); AdamSPD 8 in pass 1 (+ the anchor)
plus 3 in pass 2 (read p, p0; write p) where it fires.

    PYTHONPATH=src python benchmarks/gpu_step_time.py --models vit_b,vit_l,llama8 --mixed

``--sweep`` also times other block / chunk / warp sizes. (The SPD decision is always the
driver's ``spd_ratio``; the former in-kernel decision and its ablation flag are gone.)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _per_tensor_if import PerTensorIfSPD

from spdecay import AdamSPD

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # datasheet HBM bandwidth, GB/s (SXM parts)


def vit_shapes(dim: int, depth: int, mlp: int, classes: int = 1000) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(dim, 3, 16, 16), (dim,), (1, 1, dim), (1, 197, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return shapes + [(dim,), (dim,), (classes, dim), (classes,)]


def llama_shapes(layers: int, hidden: int = 4096, mlp: int = 11008) -> list[tuple[int, ...]]:
    per_layer = [(hidden, hidden)] * 4 + [(mlp, hidden), (mlp, hidden), (hidden, mlp),
                                          (hidden,), (hidden,)]
    return per_layer * layers


MODELS = {
    "vit_b": ("ViT-B/16", lambda: vit_shapes(768, 12, 3072)),
    "vit_l": ("ViT-L/16", lambda: vit_shapes(1024, 24, 4096)),
    "llama8": ("LLaMA-7B x8 layers", lambda: llama_shapes(8)),
    "llama2": ("LLaMA-7B x2 layers", lambda: llama_shapes(2)),
}


def make_problem(shapes, scenario: str, seed: int = 0, device: str = "cuda"):
    """Parameters, fixed gradients and anchors on the GPU (fp32)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads, anchors = [], [], []
    for s in shapes:
        p = torch.randn(s, device=device, generator=gen)
        g = torch.randn(s, device=device, generator=gen)
        if scenario == "fire":
            # d = p - p0 with <g, d> > 0 but <sign(g), d> < 0: the condition fires and Adam's
            # step (about -lr * sign(g)) moves p away from p0, so the ratio is positive.
            d = torch.where(g.abs() > 1, g, -1.5 * g.sign())
            anchors.append(p - d)
        else:
            anchors.append(p.clone())
        params.append(p.requires_grad_())
        grads.append(g)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return params, anchors


def time_steps(step: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def graphed(step: Callable[[], None], warmup: int = 3) -> Callable[[], None]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def copy_bandwidth(spin_s: float = 3.0) -> float:
    """A large device-to-device copy: GB/s counting bytes read plus written. Copies for
    ``spin_s`` seconds first, so that the GPU's clocks have ramped up before anything is timed."""
    x = torch.empty(2**29, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    start = time.perf_counter()
    while time.perf_counter() - start < spin_s:
        y.copy_(x)
        torch.cuda.synchronize()
    ms = time_steps(lambda: y.copy_(x), 3, 10)
    return 2 * x.numel() * 4 / ms / 1e6


def run_model(key: str, args) -> list[dict]:
    from spdecay.spd.backends import fused_triton as _triton

    name, shapes_fn = MODELS[key]
    shapes = shapes_fn()
    numel = sum(math.prod(s) for s in shapes)
    rows = []

    def bench(label: str, scenario: str, make_opt, accesses: float, graph: bool = False):
        try:
            _bench(label, scenario, make_opt, accesses, graph)
        except torch.cuda.OutOfMemoryError as e:  # report and go on with the next row
            print(f"  {label:28s} {scenario:5s} out of memory: {str(e)[:80]}", flush=True)
            torch.cuda.empty_cache()

    def _bench(label: str, scenario: str, make_opt, accesses: float, graph: bool = False):
        params, anchors = make_problem(shapes, scenario)
        opt = make_opt(params, anchors)
        anchors.clear()  # AdamSPD keeps its own copies: free ours
        step = opt.step if not graph else graphed(opt.step)
        iters = args.iters if "if" not in label else max(5, args.iters // 4)
        ms = time_steps(step, args.warmup, iters)
        fired = ratio_pos = None
        if isinstance(opt, AdamSPD):
            stats = opt.spd_stats()
            fired = float(stats.fired.float().mean())
            ratio_pos = float((stats.ratio > 0).float().mean())
        gbps = accesses * 4 * numel / ms / 1e6
        row = dict(model=name, key=key, params_m=numel / 1e6, tensors=len(shapes), optimizer=label,
                   scenario=scenario, ms=ms, gbps=gbps, fired=fired, ratio_pos=ratio_pos)
        rows.append(row)
        print(f"  {label:28s} {scenario:5s} {ms:8.3f} ms  {gbps:7.0f} GB/s  fired={fired} r>0={ratio_pos}", flush=True)
        del opt, params, anchors, step
        torch.cuda.empty_cache()

    print(f"{name}: {numel / 1e6:.1f}M params in {len(shapes)} tensors", flush=True)
    lr = 1e-4
    adamw = lambda fused, foreach: (  # noqa: E731
        lambda ps, _a: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01, fused=fused, foreach=foreach))
    spd = lambda **kw: (lambda ps, a: AdamSPD(ps, lr=lr, weight_decay=1.0, anchor=a, **kw))  # noqa: E731
    bench("AdamW fused", "-", adamw(True, None), 7)
    bench("AdamW foreach", "-", adamw(None, True), 7)
    for scenario, acc in (("fire", 11), ("none", 8)):
        bench("AdamSPD triton", scenario, spd(), acc)
        bench("AdamSPD triton+graph", scenario, spd(), acc, graph=True)
        bench("AdamSPD foreach", scenario, spd(foreach=True), acc)
    if args.sweep:
        default = (_triton._BLOCK, _triton._ITERS, _triton._NUM_WARPS)
        for block, iters, warps in ((1024, 4, 4), (1024, 16, 4), (2048, 8, 8), (4096, 4, 8),
                                    (1024, 32, 8), (512, 16, 4)):
            _triton._BLOCK, _triton._ITERS, _triton._NUM_WARPS = block, iters, warps
            bench(f"triton B{block} I{iters} W{warps}", "fire", spd(), 11)
        _triton._BLOCK, _triton._ITERS, _triton._NUM_WARPS = default
    if not args.skip_if:
        bench("per-tensor if", "fire", lambda ps, a: PerTensorIfSPD(ps, a, lr=lr), 11)
    if args.mixed:
        rows += bench_mixed(name, key, shapes, numel, args)
    return rows


def bench_mixed(name: str, key: str, shapes, numel: int, args) -> list[dict]:
    """bf16 parameters and gradients: AdamSPD with fp32 moments and bf16 anchors (functional
    Triton path) against torch's fused AdamW on bf16 (bf16 moments). Bytes per element: SPD
    2+2+4+4+2 read + 2+4+4 written in pass 1, 2+2+2 in pass 2 = 30; AdamW 7 x 2 = 14."""
    from spdecay import adam_spd

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
    anchors = [(p.float() - torch.where(g.abs() > 1, g.float(), -1.5 * g.float().sign())).bfloat16()
               for p, g in zip(params, grads, strict=True)]
    m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    steps = [torch.zeros((), device="cuda") for _ in params]

    spd_step = functools.partial(
        adam_spd, params, grads, m, v, [], steps, anchors, amsgrad=False, beta1=0.9,
        beta2=0.999, lr=1e-4, weight_decay=1.0, eps=1e-8, maximize=False, spd=True, fused=True)

    from spdecay.spd.backends import fused_triton as _triton

    default = (_triton._BLOCK, _triton._ITERS, _triton._NUM_WARPS)
    configs = [default] + ([(2048, 4, 4), (2048, 4, 8), (4096, 2, 8)] if args.sweep else [])
    for cfg in configs:
        _triton._BLOCK, _triton._ITERS, _triton._NUM_WARPS = cfg
        ms = time_steps(spd_step, args.warmup, args.iters)
        label = "AdamSPD triton bf16 p, fp32 m/v" + ("" if cfg == default else f" B{cfg[0]} I{cfg[1]} W{cfg[2]}")
        rows.append(dict(model=name, key=key, params_m=numel / 1e6, tensors=len(shapes),
                         optimizer=label, scenario="fire", ms=ms,
                         gbps=30 * numel / ms / 1e6, fired=None, ratio_pos=None))
    _triton._BLOCK, _triton._ITERS, _triton._NUM_WARPS = default
    del spd_step, m, v, anchors, steps
    leaves = [p.requires_grad_() for p in params]
    for p, g in zip(leaves, grads, strict=True):
        p.grad = g
    opt = torch.optim.AdamW(leaves, lr=1e-4, fused=True)
    ms2 = time_steps(opt.step, args.warmup, args.iters)
    rows.append(dict(model=name, key=key, params_m=numel / 1e6, tensors=len(shapes),
                     optimizer="AdamW fused bf16 p, bf16 m/v", scenario="-", ms=ms2,
                     gbps=14 * numel / ms2 / 1e6, fired=None, ratio_pos=None))
    for r in rows:
        print(f"  {r['optimizer']:28s} {r['scenario']:5s} {r['ms']:8.3f} ms  {r['gbps']:7.0f} GB/s",
              flush=True)
    del opt, leaves, params, grads
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], device: str, peak: float | None) -> str:
    lines = [f"Device: {device}. Median ms per step; GB/s of the ideal traffic"
             + (f"; % of the {peak:.0f} GB/s datasheet peak" if peak else ""),
             "",
             "| model | params | optimizer | SPD fires | ms/step | x fused AdamW | GB/s |"
             + (" % peak |" if peak else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    for r in rows:
        base = next((x["ms"] for x in rows if x["key"] == r["key"] and x["optimizer"] == "AdamW fused"),
                    float("nan"))
        fires = {"fire": "all", "none": "none", "-": "-"}[r["scenario"]]
        line = (f"| {r['model']} | {r['params_m']:.0f}M | {r['optimizer']} | {fires} | {r['ms']:.3f} "
                f"| {r['ms'] / base:.2f} | {r['gbps']:.0f} |")
        if peak:
            line += f" {100 * r['gbps'] / peak:.0f}% |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_b,vit_l,llama8")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--skip-if", action="store_true", help="skip the slow per-tensor `if` baseline")
    ap.add_argument("--sweep", action="store_true", help="also try other block/chunk/warp sizes")
    ap.add_argument("--mixed", action="store_true", help="also bf16 params with fp32 moments")
    ap.add_argument("--block", type=int, default=None, help="override the kernel block size")
    ap.add_argument("--chunk-iters", type=int, default=None, help="override blocks per program")
    ap.add_argument("--warps", type=int, default=None, help="override warps per program")
    ap.add_argument("--json", default=None, help="write all rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_step_time.py needs a CUDA device")
    from spdecay.spd.backends import fused_triton as _triton

    for attr, value in (("_BLOCK", args.block), ("_ITERS", args.chunk_iters), ("_NUM_WARPS", args.warps)):
        if value is not None:
            setattr(_triton, attr, value)
    device = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in device), None)
    copy = copy_bandwidth()
    print(f"{device}, torch {torch.__version__}; device-to-device copy {copy:.0f} GB/s", flush=True)
    rows = []
    for key in args.models.split(","):
        rows += run_model(key, args)
    print()
    print(table(rows, device, peak))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, copy_gbps=copy, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
