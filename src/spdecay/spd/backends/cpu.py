"""The C kernel backend: AdamSPD's CPU default (and ``fused=True`` on CPU).

The kernel is compiled once per machine (cached on disk) when an optimizer is built; where no
C compiler exists the CPU default falls back to the multi-tensor backend (``fused=True`` raises).

Phase 1 reads ``g, m, v, p, p0`` and writes ``m, v, p`` once per element while it accumulates
the three per-tensor sums; phase 2 rewrites only the tensors whose condition fired. That is the
two-pass floor of SPD (it needs a reduction over each whole tensor before it can project). The
decision between the passes is taken by the shared torch code (``spd_ratio``, after the
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

from spdecay.spd.backends.numerics import real_dtype
from spdecay.spd.driver import PartialStep
from spdecay.spd.layout import FlatLayout, pieces
from spdecay.spd.reduce import is_dtensor, to_local
from spdecay.spd.work import AdamHyper, TensorLists

_HERE = Path(__file__).resolve().parents[2]  # the package: the C sources ship there
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
        ("n_steps", ctypes.c_int64),
        ("step_of", ctypes.c_void_p),
    ]


def _compiler() -> str:
    wanted = os.environ.get("CC")
    compiler = shutil.which(wanted) if wanted else shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError(
            "AdamSPD(fused=True) on CPU compiles a small C kernel (once per machine) and needs a C "
            f"compiler with OpenMP (gcc); none was found ($CC={wanted!r}, or cc/gcc on PATH). "
            "Install gcc, or use the torch multi-tensor path (foreach=True; the default falls "
            "back to it where no compiler exists)."
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


@functools.cache
def available() -> bool:
    """Whether the kernel can be built or loaded here (the CPU default uses it, else torch ops);
    the answer is kept for the process, so a missing compiler is tried once."""
    try:
        library()
    except (RuntimeError, OSError):
        return False
    return True


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


def covers(lists: TensorLists, i: int, spd: bool) -> bool:
    """Whether the kernel takes tensor ``i``: CPU, float32/float64 (or complex of them),
    contiguous, gradient and moments in the parameter's dtype, anchor in it, bfloat16 or (for
    float64) float32, a float32/float64 step count on the CPU."""
    p, step = lists.params[i], lists.steps[i]
    dtype = p.dtype
    if p.device.type != "cpu" or real_dtype(dtype) not in _SUFFIX:
        return False
    if step.device.type != "cpu" or step.dtype not in _SUFFIX:
        return False
    for t in (p, lists.grads[i], lists.exp_avgs[i], lists.exp_avg_sqs[i],
              lists.max_exp_avg_sqs[i]):
        if t is None:
            continue
        t = to_local(t)
        if t.dtype != dtype or not t.is_contiguous():
            return False
    return _anchor_kind(dtype, lists.anchors[i] if spd else None) is not None


class _Items:
    """The kernel's view of a list of tensors: one item per tensor, or per segment and padding
    gap of a tensor with a FlatLayout (all of them stepped with that tensor's step count)."""

    def __init__(self, params: list[Tensor], layouts: list[FlatLayout | None]) -> None:
        self.starts: list[int] = []  # element offset of each item in its tensor
        self.numels: list[int] = []
        self.owner: list[int] = []  # tensor of each item
        self.column: list[int] = []  # column of each item (padding: the last, dropped)
        self.width = 0
        local = [to_local(p) for p in params]
        self.simple = all(x is None for x in layouts)
        pads: list[int] = []
        for i, (p, layout) in enumerate(zip(local, layouts)):
            unit = 2 if p.is_complex() else 1  # complex: real pairs
            if layout is None:
                self._add(i, 0, unit * p.numel(), self.width)
                self.width += 1
                continue
            for start, length, lid in pieces(layout, p.numel()):
                if lid < 0:
                    pads.append(len(self.column))
                self._add(i, start, length, self.width + lid if lid >= 0 else -1)
            self.width += layout.num_logical
        for k in pads:
            self.column[k] = self.width

    def _add(self, owner: int, start: int, numel: int, column: int) -> None:
        self.owner.append(owner)
        self.starts.append(start)
        self.numels.append(numel)
        self.column.append(column)

    def to_columns(self, sums: Tensor) -> Tensor:
        """Item sums [k, items] -> column sums [k, width]."""
        if self.simple:
            return sums
        out = torch.zeros(sums.shape[0], self.width + 1, dtype=sums.dtype)
        out.index_add_(1, torch.tensor(self.column), sums)
        return out[:, : self.width]

    def from_columns(self, coef: Tensor) -> Tensor:
        """Column weights [width] -> item weights (padding: 0, never touched)."""
        coef = coef.to("cpu", torch.float64)
        if self.simple:
            return coef.contiguous()
        return torch.cat([coef, coef.new_zeros(1)])[torch.tensor(self.column)].contiguous()


class _Call:
    """One kernel call's arguments: the C struct and the objects its pointers point into (kept
    alive for as long as the call is used)."""

    def __init__(self, params: list[Tensor], anchors: list[Tensor | None], spd: bool,
                 layouts: list[FlatLayout | None]) -> None:
        self.suffix = _SUFFIX[real_dtype(params[0].dtype)]
        self.items = _Items(params, layouts)
        kind = _anchor_kind(params[0].dtype, anchors[0]) if spd else _ANCHOR_NONE
        self.keep: dict[str, object] = {}
        n = len(self.items.numels)
        self.struct = _SpdCall(n=n, anchor_kind=kind, spd=int(spd), threads=torch.get_num_threads(),
                               n_steps=len(params))
        self.tensor("numels", torch.tensor(self.items.numels, dtype=torch.int64))
        if not self.items.simple:
            self.tensor("step_of", torch.tensor(self.items.owner, dtype=torch.int64))
        self.pointers("params", params)
        if kind != _ANCHOR_NONE:
            self.pointers("anchors", anchors)

    def pointers(self, field: str, tensors: list[Tensor]) -> None:
        # A complex tensor and its real view share the address; a DTensor's data is its shard's.
        local = [to_local(t) for t in tensors]
        it = self.items
        addrs = [local[o].data_ptr() + s * _real_size(local[o]) for o, s in zip(it.owner, it.starts)]
        array = (ctypes.c_void_p * len(addrs))(*addrs)
        self.keep[field] = array
        setattr(self.struct, field, ctypes.cast(array, ctypes.c_void_p))

    def steps(self, steps: list[Tensor]) -> None:
        array = (ctypes.c_void_p * len(steps))(*[t.data_ptr() for t in steps])
        self.keep["steps"] = array
        self.struct.steps = ctypes.cast(array, ctypes.c_void_p)

    def tensor(self, field: str, t: Tensor) -> Tensor:
        self.keep[field] = t
        setattr(self.struct, field, t.data_ptr())
        return t

    def run(self, name: str) -> None:
        if getattr(library(), f"{name}_{self.suffix}")(ctypes.byref(self.struct)) != 0:
            raise MemoryError(f"spdecay fused CPU kernel {name}: out of memory for its work list")


def _real_size(t: Tensor) -> int:
    return t.element_size() // 2 if t.is_complex() else t.element_size()


def _partitions(lists: TensorLists, spd: bool) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(lists.params):
        a = lists.anchors[i] if spd else None
        key = (p.dtype, _anchor_kind(p.dtype, a), lists.steps[i].dtype, is_dtensor(p))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def adam_and_sums(lists: TensorLists, h: AdamHyper) -> PartialStep | None:
    """Phase 1 in C (tensors that ``covers`` accepts), one call per dtype and anchor kind."""
    library()  # build (or load) first: a missing compiler is reported before any state changes
    sums, projectors, sources, columns = [], [], [], []
    for idx in _partitions(lists, h.spd):
        part = lists.pick(idx)
        call = _Call(part.params, part.anchors, h.spd, part.layouts)
        for field, tensors in (("grads", part.grads), ("exp_avgs", part.exp_avgs),
                               ("exp_avg_sqs", part.exp_avg_sqs)):
            call.pointers(field, tensors)
        if h.amsgrad:
            call.pointers("max_exp_avg_sqs", part.max_exp_avg_sqs)
        call.steps(part.steps)  # 0-d counts, never sharded
        c = call.struct
        c.amsgrad, c.maximize = h.amsgrad, h.maximize
        c.step_double = part.steps[0].dtype == torch.float64
        c.beta1, c.beta2, c.eps, c.weight_decay = h.beta1, h.beta2, h.eps, h.weight_decay
        # A tensor lr is copied, never read on the host.
        lr = torch.as_tensor(h.lr, dtype=torch.float64).to("cpu", copy=True).reshape(1)
        call.tensor("lr", lr)
        item_sums = None
        if h.spd:
            item_sums = call.tensor("sums", torch.empty(3, len(call.items.numels), dtype=torch.float64))
        call.run("spd_phase1")
        if h.spd:
            sums.append(call.items.to_columns(item_sums))
            projectors.append(call)
            sources += part.sources()
            columns += lists.input_columns(idx)
    if not h.spd:
        return None
    device = lists.params[0].device
    return PartialStep(torch.cat(sums, dim=1).to(device), _Projector(projectors), sources, 0.0,
                       columns)


class _Projector:
    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls

    def project(self, coef: Tensor) -> None:
        start = 0
        for call in self.calls:
            width = call.items.width
            call.tensor("coef", call.items.from_columns(coef[start : start + width]))
            call.run("spd_project")
            start += width


def measure(params: list[Tensor], anchors: list[Tensor | None], grads: list[Tensor] | None,
            layouts: list[FlatLayout | None]) -> Tensor:
    """The add-on's per-column sums in one pass: [<g, p - p0>, ||p - p0||^2], shape [2, n]
    float64 (row 0 is 0 without grads), p - p0 taken in double. Tensors as
    ``addon_covers`` accepts."""
    call = _Call(params, anchors, True, layouts)
    if grads is not None:
        call.pointers("grads", grads)
    sums = call.tensor("sums", torch.empty(3, len(call.items.numels), dtype=torch.float64))
    call.run("spd_measure")
    return call.items.to_columns(sums[:2])


def project(params: list[Tensor], anchors: list[Tensor | None], coef: Tensor,
            layouts: list[FlatLayout | None]) -> None:
    """p <- lerp(p, p0, coef) per column (p *= 1 - coef for zero anchors); tensors with coef 0
    are not touched."""
    call = _Call(params, anchors, True, layouts)
    call.tensor("coef", call.items.from_columns(coef))
    call.run("spd_project")


def addon_covers(params: list[Tensor], anchors: list[Tensor | None],
                 grads: list[Tensor] | None) -> bool:
    """Whether ``measure`` and ``project`` take these tensors: CPU, one float32/float64
    (or complex) dtype, contiguous, gradients in that dtype, anchors all None or all of one
    kind (the parameter's dtype, bfloat16, or float32 for float64)."""
    if not params:
        return False
    dtype, sharded = params[0].dtype, is_dtensor(params[0])
    if real_dtype(dtype) not in _SUFFIX:
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
