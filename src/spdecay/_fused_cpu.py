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
    PhaseOne,
    SPDStepStats,
    _multi_tensor_phase1,
    _phase_one,
    _real_dtype,
    finish_alone,
)
from spdecay._sharding import is_dtensor, to_local

_HERE = Path(__file__).parent
_SOURCES = ("_fused_cpu.c", "_fused_cpu_kernel.h")
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the CPU's instruction set.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC",
          "-shared"]
_ANCHOR_NONE, _ANCHOR_SAME, _ANCHOR_BF16, _ANCHOR_F32 = 0, 1, 2, 3
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
        for name in ("spd_phase1", "spd_project", "spd_measure"):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [ctypes.POINTER(_SpdCall)]
            fn.restype = ctypes.c_int
    return lib


def _anchor_kind(p_dtype: torch.dtype, anchor: Tensor | None) -> int | None:
    if anchor is None:
        return _ANCHOR_NONE
    if is_dtensor(anchor):
        anchor = anchor.to_local()
    if not anchor.is_contiguous():
        return None
    if anchor.dtype == p_dtype:
        return _ANCHOR_SAME
    if anchor.dtype == torch.bfloat16 and p_dtype in _SUFFIX:
        return _ANCHOR_BF16
    if anchor.dtype == torch.float32 and p_dtype == torch.float64:
        return _ANCHOR_F32
    return None


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


class _Call:
    """One kernel call's arguments: the C struct and the objects its pointers point into (kept
    alive for as long as the call is used)."""

    def __init__(self, params: list[Tensor], anchors: list[Tensor | None], spd: bool) -> None:
        self.suffix = _SUFFIX[_real_dtype(params[0].dtype)]
        self.sharded = is_dtensor(params[0])  # partitions never mix DTensors and plain tensors
        kind = _anchor_kind(params[0].dtype, anchors[0]) if spd else _ANCHOR_NONE
        width = 2 if params[0].is_complex() else 1  # complex: real pairs
        local = [to_local(p) for p in params] if self.sharded else params
        self.keep: dict[str, object] = {}
        self.struct = _SpdCall(n=len(params), anchor_kind=kind, spd=int(spd),
                               threads=torch.get_num_threads())
        self.tensor("numels", torch.tensor([width * p.numel() for p in local], dtype=torch.int64))
        self.pointers("params", local)
        if kind != _ANCHOR_NONE:
            self.pointers("anchors", anchors)

    def pointers(self, field: str, tensors: list[Tensor], per_parameter: bool = True) -> None:
        # A complex tensor and its real view share the address; a DTensor's data is its shard's.
        if self.sharded and per_parameter:
            tensors = [to_local(t) for t in tensors]
        array = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        self.keep[field] = array
        setattr(self.struct, field, ctypes.cast(array, ctypes.c_void_p))

    def tensor(self, field: str, t: Tensor) -> Tensor:
        self.keep[field] = t
        setattr(self.struct, field, t.data_ptr())
        return t

    def run(self, name: str) -> None:
        if getattr(library(), f"{name}_{self.suffix}")(ctypes.byref(self.struct)) != 0:
            raise MemoryError(f"spdecay fused CPU kernel {name}: out of memory for its work list")


def _fused_phase1(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
                  *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, spd):
    """Phase 1 in C for one partition (one dtype, one anchor kind); returns sums [3, n] and the
    projection."""
    call = _Call(params, anchors, spd)
    for field, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        call.pointers(field, tensors)
    if amsgrad:
        call.pointers("max_exp_avg_sqs", max_exp_avg_sqs)
    call.pointers("steps", state_steps, per_parameter=False)  # 0-d counts, never sharded
    c = call.struct
    c.amsgrad, c.maximize, c.step_double = amsgrad, maximize, state_steps[0].dtype == torch.float64
    c.beta1, c.beta2, c.eps, c.weight_decay = beta1, beta2, eps, weight_decay
    # A tensor lr is copied, never read on the host.
    call.tensor("lr", torch.as_tensor(lr, dtype=torch.float64).to("cpu", copy=True).reshape(1))
    sums = call.tensor("sums", torch.empty(3, len(params), dtype=torch.float64)) if spd else None
    call.run("spd_phase1")
    if not spd:
        return None, None

    def project(coef: Tensor) -> None:
        call.tensor("coef", coef.to("cpu", torch.float64).contiguous())
        call.run("spd_project")

    return sums, project


def measure(params: list[Tensor], anchors: list[Tensor | None],
            grads: list[Tensor] | None) -> Tensor:
    """The add-on's per-tensor partial sums in one pass: [<g, p - p0>, ||p - p0||^2], shape
    [2, n] float64 (row 0 is 0 without grads). Tensors as :func:`addon_covers` accepts."""
    call = _Call(params, anchors, spd=True)
    if grads is not None:
        call.pointers("grads", grads)
    sums = call.tensor("sums", torch.empty(3, len(params), dtype=torch.float64))
    call.run("spd_measure")
    return sums[:2]


def project(params: list[Tensor], anchors: list[Tensor | None], coef: Tensor) -> None:
    """p <- lerp(p, p0, coef) per tensor (p *= 1 - coef for zero anchors); tensors with coef 0
    are not touched."""
    call = _Call(params, anchors, spd=True)
    call.tensor("coef", coef.to("cpu", torch.float64).contiguous())
    call.run("spd_project")


def addon_covers(params: list[Tensor], anchors: list[Tensor | None],
                 grads: list[Tensor] | None) -> bool:
    """Whether :func:`measure` and :func:`project` take these tensors: CPU, one float32/float64
    (or complex) dtype, contiguous, gradients in that dtype, anchors all None or all of one
    kind (the parameter's dtype, bfloat16, or float32 for float64)."""
    if not params:
        return False
    dtype, sharded = params[0].dtype, is_dtensor(params[0])
    if _real_dtype(dtype) not in _SUFFIX:
        return False
    kinds = {_anchor_kind(dtype, a) for a in anchors}
    if len(kinds) != 1 or None in kinds:
        return False
    for i, p in enumerate(params):
        ts = [p] if grads is None else [p, grads[i]]
        for t in ts:
            if is_dtensor(t) != sharded:
                return False
            t = to_local(t)
            if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
                return False
    return True


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
    one = fused_phase_one(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        maximize=maximize, spd=spd,
    )
    return finish_alone(one, spd)


def fused_phase_one(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
                    *, amsgrad, spd, **hyper) -> PhaseOne | None:
    """Phase 1 of the fused path (AdamSPD batches the reduction of all its groups)."""
    if any(p.device.type != "cpu" for p in params):
        raise ValueError("fused_adam_spd: the fused CPU kernel needs CPU tensors (CUDA uses Triton)")
    library()  # build (or load) first: a missing compiler is reported before any state changes
    vmax = max_exp_avg_sqs if amsgrad else [None] * len(params)
    anchors_or_none = anchors if spd else [None] * len(params)
    keys = [kernel_key(params, grads, exp_avgs, exp_avg_sqs, vmax, state_steps, anchors_or_none, i)
            for i in range(len(params))]

    def choose(ps: list[Tensor], anchors_: list[Tensor | None], i: int, small: bool):
        return _fused_phase1 if keys[i] is not None else _multi_tensor_phase1(ps, anchors_, i, small)

    return _phase_one(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, choose,
        amsgrad=amsgrad, spd=spd, fused=keys, **hyper,
    )
