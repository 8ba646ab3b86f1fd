"""Fused CPU AdamSPD (``fused=True`` on CPU): a C kernel compiled once on first use.

Phase 1 reads ``g, m, v, p, p0`` and writes ``m, v, p`` once per element while it accumulates
the three per-tensor sums; phase 2 rewrites only the tensors whose condition fired. That is the
two-pass floor of SPD (it needs a reduction over each whole tensor before it can project). The
decision between the passes is taken by the shared torch code (:func:`spd_ratio`, after the
all-reduce of sharded sums), so this path has the semantics, stats and DTensor support of the
multi-tensor path. Tensors the kernel does not cover (other dtypes, non-contiguous layouts,
moments in another dtype than the parameter) go through the multi-tensor path in the same call.

The kernel is built with the system C compiler (``cc``, or ``$CC``) with OpenMP, a few seconds,
and cached in ``$SPDECAY_CACHE_DIR`` (default ``~/.cache/spdecay``) under a key of the source,
the flags, the compiler and the CPU, so a cache shared between different machines is safe.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from spdecay._functional import (
    SPDStepStats,
    _multi_tensor_phase1,
    _two_phase_adam_spd,
)
from spdecay._sharding import is_dtensor, to_local

_HERE = Path(__file__).parent
_SOURCES = ("_fused_cpu.c", "_fused_cpu_kernel.h")
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the CPU's instruction set.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC",
          "-shared"]
_ANCHOR_NONE, _ANCHOR_SAME, _ANCHOR_BF16 = 0, 1, 2
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class _SpdCall(ctypes.Structure):
    """Mirrors ``SpdCall`` in _fused_cpu.c."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("numels", ctypes.c_void_p),
        ("params", ctypes.c_void_p),
        ("grads", ctypes.c_void_p),
        ("exp_avgs", ctypes.c_void_p),
        ("exp_avg_sqs", ctypes.c_void_p),
        ("max_exp_avg_sqs", ctypes.c_void_p),
        ("anchors", ctypes.c_void_p),
        ("steps", ctypes.c_void_p),
        ("anchor_kind", ctypes.c_int32),
        ("spd", ctypes.c_int32),
        ("amsgrad", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("step_double", ctypes.c_int32),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("lr", ctypes.c_void_p),
        ("coef", ctypes.c_void_p),
        ("sums", ctypes.c_void_p),
    ]


def _compiler() -> str:
    wanted = os.environ.get("CC")
    compiler = shutil.which(wanted) if wanted else shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError(
            "AdamSPD(fused=True) on CPU compiles a small C kernel on first use and needs a C "
            f"compiler with OpenMP (gcc); none was found ($CC={wanted!r}, or cc/gcc on PATH). "
            "Install gcc, or use the multi-tensor path (foreach=True, the default)."
        )
    return compiler


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spdecay"
    return Path(os.environ.get("SPDECAY_CACHE_DIR", default))


@functools.cache
def library() -> ctypes.CDLL:
    """Build (once per source, compiler and CPU) and load the kernel library."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in [*(_HERE / s for s in _SOURCES)]:
        key.update(part.read_bytes())
    for text in (" ".join(_FLAGS), version, platform.machine(), _cpu_signature()):
        key.update(text.encode())
    target = _cache_dir() / f"fused_cpu_{key.hexdigest()[:20]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *_FLAGS, "-o", tmp, str(_HERE / _SOURCES[0]), "-lm"]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(
                f"AdamSPD(fused=True): compiling the CPU kernel failed ({' '.join(cmd)}):\n"
                f"{built.stderr.strip()}"
            )
        os.replace(tmp, target)
    # torch is imported, so the kernel's OpenMP runtime (libgomp) is torch's own: one thread pool.
    lib = ctypes.CDLL(str(target))
    for suffix in _SUFFIX.values():
        for name in ("spd_phase1", "spd_project"):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [ctypes.POINTER(_SpdCall)]
            fn.restype = ctypes.c_int
    return lib


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _anchor_kind(p_dtype: torch.dtype, anchor: Tensor | None) -> int | None:
    if anchor is None:
        return _ANCHOR_NONE
    if is_dtensor(anchor):
        anchor = anchor.to_local()
    if not anchor.is_contiguous():
        return None
    if anchor.dtype == p_dtype:
        return _ANCHOR_SAME
    return _ANCHOR_BF16 if anchor.dtype == torch.bfloat16 and not p_dtype.is_complex else None


def kernel_key(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
               i: int) -> torch.dtype | None:
    """The step-count dtype if the kernel covers tensor ``i`` (else None): CPU, float32/float64
    (or complex of them), contiguous, gradient and moments in the parameter's dtype, anchor in
    it or bfloat16, a float32/float64 step count on the CPU."""
    p, step = params[i], state_steps[i]
    dtype = p.dtype
    if p.device.type != "cpu" or _real_dtype(dtype) not in _SUFFIX:
        return None
    if step.device.type != "cpu" or step.dtype not in _SUFFIX:
        return None
    sharded = is_dtensor(p)
    for t in (p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i]):
        if t is None:
            continue
        if sharded:
            t = to_local(t)
        if t.dtype != dtype or not t.is_contiguous():
            return None
    return step.dtype if _anchor_kind(dtype, anchors[i]) is not None else None


def _pointers(tensors: list[Tensor], sharded: bool) -> ctypes.Array:
    # A complex tensor and its real view share the address; a DTensor's data is its shard's.
    if sharded:
        tensors = [to_local(t) for t in tensors]
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _fused_phase1(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
                  *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, spd):
    """Phase 1 in C for one partition (one dtype, one anchor kind); returns sums [3, n] and the
    projection."""
    lib = library()
    suffix = _SUFFIX[_real_dtype(params[0].dtype)]
    kind = _anchor_kind(params[0].dtype, anchors[0]) if spd else _ANCHOR_NONE
    n = len(params)
    width = 2 if params[0].is_complex() else 1  # complex: real pairs
    sharded = is_dtensor(params[0])  # partitions never mix DTensors and plain tensors
    if sharded:
        numels = [width * to_local(p).numel() for p in params]
    else:
        numels = [width * p.numel() for p in params]
    keep = {  # everything the C code points into must stay alive until the projection
        "numels": torch.tensor(numels, dtype=torch.int64),
        # a tensor lr is copied, never read on the host
        "lr": torch.as_tensor(lr, dtype=torch.float64).to("cpu", copy=True).reshape(1),
        "params": _pointers(params, sharded),
        "grads": _pointers(grads, sharded),
        "exp_avgs": _pointers(exp_avgs, sharded),
        "exp_avg_sqs": _pointers(exp_avg_sqs, sharded),
        "steps": _pointers(state_steps, False),
    }
    call = _SpdCall(n=n, anchor_kind=kind, spd=int(spd), amsgrad=int(amsgrad),
                    maximize=int(maximize), threads=torch.get_num_threads(),
                    step_double=int(state_steps[0].dtype == torch.float64), beta1=beta1,
                    beta2=beta2, eps=eps, weight_decay=weight_decay)
    call.numels, call.lr = keep["numels"].data_ptr(), keep["lr"].data_ptr()
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"):
        setattr(call, name, ctypes.cast(keep[name], ctypes.c_void_p))
    if amsgrad:
        keep["max_exp_avg_sqs"] = _pointers(max_exp_avg_sqs, sharded)
        call.max_exp_avg_sqs = ctypes.cast(keep["max_exp_avg_sqs"], ctypes.c_void_p)
    if kind != _ANCHOR_NONE:
        keep["anchors"] = _pointers(anchors, sharded)
        call.anchors = ctypes.cast(keep["anchors"], ctypes.c_void_p)
    sums = None
    if spd:
        sums = torch.empty(3, n, dtype=torch.float64)
        call.sums = sums.data_ptr()
    if getattr(lib, f"spd_phase1_{suffix}")(ctypes.byref(call)) != 0:
        raise MemoryError("AdamSPD fused CPU kernel: out of memory for its work list")
    if not spd:
        return None, None

    def project(coef: Tensor) -> None:
        weights = coef.to("cpu", torch.float64).contiguous()
        call.coef = weights.data_ptr()
        if getattr(lib, f"spd_project_{suffix}")(ctypes.byref(call)) != 0:
            raise MemoryError("AdamSPD fused CPU kernel: out of memory for its work list")
        del keep["params"]  # the call is complete

    return sums, project


def fused_adam_spd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    spd: bool,
    capturable: bool = False,
) -> SPDStepStats | None:
    """Fused CPU path, same signature and semantics as ``_single_tensor_adam_spd``."""
    if any(p.device.type != "cpu" for p in params):
        raise ValueError("fused_adam_spd: the fused CPU kernel needs CPU tensors (CUDA uses Triton)")
    library()  # build (or load) first: a missing compiler is reported before any state changes
    vmax = max_exp_avg_sqs if amsgrad else [None] * len(params)
    anchors_or_none = anchors if spd else [None] * len(params)
    keys = [kernel_key(params, grads, exp_avgs, exp_avg_sqs, vmax, state_steps, anchors_or_none, i)
            for i in range(len(params))]

    def choose(ps: list[Tensor], anchors_: list[Tensor | None], i: int, small: bool):
        return _fused_phase1 if keys[i] is not None else _multi_tensor_phase1(ps, anchors_, i, small)

    return _two_phase_adam_spd(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, choose,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        maximize=maximize, spd=spd, fused=keys,
    )
