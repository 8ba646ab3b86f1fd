"""The C kernel backend: AdamSPD's CPU default (and ``fused=True`` on CPU).

Phase 1 reads ``g, m, v, p, p0`` and writes ``m, v, p`` once per element while it accumulates
the three per-tensor sums (products and sums in float64); phase 2 rewrites only the tensors
whose condition fired. That is the two-pass floor of SPD (it needs a reduction over each whole
tensor before it can project). The decision between the passes is the driver's (``spd_ratio``,
after the all-reduce of sharded sums). Tensors the kernel does not cover (other dtypes,
non-contiguous layouts, moments in another dtype than the parameter) go through the
multi-tensor path in the same step. ``measure`` is the add-on's one-pass measurement.

The kernel (``fused_c.c`` and ``fused_c_kernel.h``, beside this file) is compiled once per
machine with the system C compiler (``cc``, or ``$CC``) with OpenMP, a few seconds, when the
first optimizer is built, and cached under a key of the source, the flags, the compiler and the
CPU. What is trusted: the cache directory (``$SPDECAY_CACHE_DIR``, else
``$XDG_CACHE_HOME/spdecay``, else ``~/.cache/spdecay``; empty variables count as unset, a
relative ``$XDG_CACHE_HOME`` is ignored, a relative ``$SPDECAY_CACHE_DIR`` refused) is created
with mode 0700, and a directory or library that is not owned by the current user, or is
writable by group or others, is never loaded: a cache shared with other users is not used. The
default then falls back to the multi-tensor path with one warning naming the reason (silently
where no C compiler exists), ``fused=True`` raises. The kernel checks every tensor's size
against the elements it will touch before it touches memory.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from spdecay.spd.backends.numerics import real_dtype
from spdecay.spd.dtensor import DTensor
from spdecay.spd.interface import AdamHyper, PartialStep, TensorLists, joined
from spdecay.spd.layout import FlatLayout, pieces
from spdecay.spd.reduce import is_dtensor, to_local

_HERE = Path(__file__).resolve().parent  # the C sources ship beside this module
_SOURCES = ("fused_c.c", "fused_c_kernel.h")
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the CPU's instruction set.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC",
          "-shared"]
_ANCHOR_NONE, _ANCHOR_SAME, _ANCHOR_BF16, _ANCHOR_F32 = 0, 1, 2, 3
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# The tensor lists of a call, in the order of the rows of SpdCall.limits.
_FIELDS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "anchors")
_ENTRY_POINTS = ("spd_phase1", "spd_project", "spd_measure")


class KernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here (the message says why)."""


class MissingCompiler(KernelUnavailable):
    """No C compiler: the CPU default falls back without a warning."""


class _SpdCall(ctypes.Structure):
    """Mirrors ``SpdCall`` in fused_c.c."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("numels", ctypes.c_void_p),
        ("limits", ctypes.c_void_p),
        ("params", ctypes.c_void_p),
        ("grads", ctypes.c_void_p),
        ("exp_avgs", ctypes.c_void_p),
        ("exp_avg_sqs", ctypes.c_void_p),
        ("max_exp_avg_sqs", ctypes.c_void_p),
        ("anchors", ctypes.c_void_p),
        ("steps", ctypes.c_void_p),
        ("anchor_kind", ctypes.c_int32),
        ("with_sums", ctypes.c_int32),
        ("amsgrad", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("step_double", ctypes.c_int32),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("decay", ctypes.c_double),
        ("lr", ctypes.c_void_p),
        ("coef", ctypes.c_void_p),
        ("sums", ctypes.c_void_p),
        ("n_steps", ctypes.c_int64),
        ("step_of", ctypes.c_void_p),
    ]


# ----------------------------------------------------------------------------- build and load
def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None  # an empty variable means unset


def _compiler() -> str:
    wanted = _env("CC")
    compiler = shutil.which(wanted) if wanted else shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise MissingCompiler(
            "spdecay's CPU kernel (AdamSPD fused=True) is compiled once per machine and needs a C "
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


def cache_dir() -> Path:
    """The kernel cache directory (see the module docstring for what is trusted)."""
    own = _env("SPDECAY_CACHE_DIR")
    if own is not None:
        path = Path(own).expanduser()
        if not path.is_absolute():
            raise KernelUnavailable(
                f"$SPDECAY_CACHE_DIR={own!r} is not an absolute path; give an absolute one"
            )
        return path
    xdg = _env("XDG_CACHE_HOME")  # the XDG spec: a relative value is invalid and ignored
    base = Path(xdg) if xdg is not None and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "spdecay"


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def _check_private(path: Path, what: str, st: os.stat_result) -> None:
    """Refuse a path someone else could have written: not ours, or group/other-writable."""
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        raise KernelUnavailable(
            f"the kernel cache {what} {path} is owned by uid {st.st_uid}, not by this user "
            f"(uid {uid}); it is not loaded. Set SPDECAY_CACHE_DIR to a private directory"
        )
    if st.st_mode & 0o022:
        raise KernelUnavailable(
            f"the kernel cache {what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); it is not loaded. Remove it, or set "
            "SPDECAY_CACHE_DIR to a private directory"
        )


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise KernelUnavailable(f"the kernel cache {path} is not a directory")
    _check_private(path, "directory", st)
    return path


def _build(compiler: str, target: Path) -> None:
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, "-o", tmp, str(_HERE / _SOURCES[0]), "-lm"]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(
            f"compiling spdecay's CPU kernel failed ({' '.join(cmd)}):\n{built.stderr.strip()}"
        )
    os.chmod(tmp, 0o700)
    os.replace(tmp, target)


@functools.cache
def library() -> ctypes.CDLL:
    """Build (once per source, compiler and CPU) and load the kernel library.

    Raises:
        KernelUnavailable: no compiler, a failed build, an untrusted cache, or a library
            without the kernel's entry points.
    """
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for name in _SOURCES:
        key.update((_HERE / name).read_bytes())
    for text in (" ".join(_FLAGS), version, platform.machine(), _cpu_signature()):
        key.update(text.encode())
    directory = cache_dir()
    target = directory / f"fused_c_{key.hexdigest()[:20]}.so"
    try:
        _private_dir(directory)
        if not os.path.lexists(target):
            _build(compiler, target)
        st = os.lstat(target)
    except OSError as e:  # e.g. a read-only home: say where, not just errno
        raise KernelUnavailable(f"the kernel cache {directory} cannot be used ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KernelUnavailable(f"the kernel cache entry {target} is not a regular file")
    _check_private(target, "library", st)
    # torch is imported, so the kernel's OpenMP runtime (libgomp) is torch's own: one thread pool.
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        raise KernelUnavailable(f"the kernel library {target} cannot be loaded ({e})") from None
    for suffix in _SUFFIX.values():
        for name in _ENTRY_POINTS:
            try:
                fn = getattr(lib, f"{name}_{suffix}")
            except AttributeError:
                raise KernelUnavailable(
                    f"the kernel library {target} lacks the entry point {name}_{suffix}; "
                    "delete it to rebuild"
                ) from None
            fn.argtypes = [ctypes.POINTER(_SpdCall)]
            fn.restype = ctypes.c_int
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel can be built or loaded here (the CPU default uses it, else torch ops);
    the answer is kept for the process. Where it cannot, one warning names the reason (none
    where no compiler exists)."""
    try:
        library()
    except MissingCompiler:
        return False
    except (KernelUnavailable, OSError) as e:
        warnings.warn(f"spdecay: the C kernel is not used ({e}); CPU tensors take the torch "
                      "multi-tensor path", RuntimeWarning, stacklevel=2)
        return False
    return True


# ------------------------------------------------------------------------------ which tensors
def _anchor_kind(p_dtype: torch.dtype, anchor: Tensor | None) -> int | None:
    if anchor is None:
        return _ANCHOR_NONE
    if DTensor is not None and isinstance(anchor, DTensor):
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


def covers(lists: TensorLists, i: int) -> bool:
    """Whether the kernel takes tensor ``i``: CPU, float32/float64 (or complex of them),
    contiguous, gradient and moments in the parameter's dtype, anchor in it, bfloat16 or (for
    float64) float32, a float32/float64 step count on the CPU (or none: the add-on)."""
    p, step = lists.params[i], lists.steps[i]
    dtype = p.dtype
    if p.device.type != "cpu" or real_dtype(dtype) not in _SUFFIX:
        return False
    if step is not None and (step.device.type != "cpu" or step.dtype not in _SUFFIX):
        return False
    for t in (p, lists.grads[i], lists.exp_avgs[i], lists.exp_avg_sqs[i],
              lists.max_exp_avg_sqs[i]):
        if t is None:
            continue
        if DTensor is not None and isinstance(t, DTensor):
            t = t.to_local()
        if t.dtype != dtype or not t.is_contiguous():
            return False
    return _anchor_kind(dtype, lists.anchors[i]) is not None


# ------------------------------------------------------------------------------ kernel calls
class _Items:
    """The kernel's view of a list of tensors: one item per tensor, or per segment and padding
    gap of a tensor with a FlatLayout (all of them stepped with that tensor's step count)."""

    def __init__(self, params: list[Tensor], layouts: list[FlatLayout | None]) -> None:
        self.starts: list[int] = []  # element offset of each item in its tensor (real units)
        self.numels: list[int] = []
        self.owner: list[int] = []  # tensor of each item
        self.target: list[int] = []  # column of the sums each item adds to (padding: dropped)
        self.width = 0
        local = [to_local(p) for p in params]
        self.simple = all(x is None for x in layouts)
        pads: list[int] = []
        for i, (p, layout) in enumerate(zip(local, layouts)):
            if layout is None:
                self._add(i, 0, _real_numel(p), self.width)
                self.width += 1
                continue
            for start, length, lid in pieces(layout, p.numel()):
                if lid < 0:
                    pads.append(len(self.target))
                self._add(i, start, length, self.width + lid if lid >= 0 else -1)
            self.width += layout.num_logical
        for k in pads:
            self.target[k] = self.width

    def _add(self, owner: int, start: int, numel: int, target: int) -> None:
        self.owner.append(owner)
        self.starts.append(start)
        self.numels.append(numel)
        self.target.append(target)

    def to_columns(self, sums: Tensor) -> Tensor:
        """Item sums [k, items] -> column sums [k, width]."""
        if self.simple:
            return sums
        out = torch.zeros(sums.shape[0], self.width + 1, dtype=sums.dtype)
        out.index_add_(1, torch.tensor(self.target), sums)
        return out[:, : self.width]

    def from_columns(self, coef: Tensor) -> Tensor:
        """Column weights [width] -> item weights (padding: 0, never touched)."""
        coef = coef.to("cpu", torch.float64)
        if self.simple:
            return coef.contiguous()
        return torch.cat([coef, coef.new_zeros(1)])[torch.tensor(self.target)].contiguous()


def _real_numel(t: Tensor) -> int:
    return 2 * t.numel() if t.is_complex() else t.numel()


def _real_size(t: Tensor) -> int:
    return t.element_size() // 2 if t.is_complex() else t.element_size()


class _Call:
    """One kernel call's arguments: the C struct and the objects its pointers point into (kept
    alive for as long as the call is used). It is also the projector of the tensors it took."""

    def __init__(self, lists: TensorLists, with_sums: bool) -> None:
        params = lists.params
        self.suffix = _SUFFIX[real_dtype(params[0].dtype)]
        self.complex = params[0].is_complex()
        self.items = _Items(params, lists.layouts)
        kind = _anchor_kind(params[0].dtype, lists.anchors[0]) if with_sums else _ANCHOR_NONE
        self.keep: dict[str, object] = {}
        n = len(self.items.numels)
        self.struct = _SpdCall(n=n, anchor_kind=kind, with_sums=int(with_sums),
                               threads=torch.get_num_threads(), n_steps=len(params))
        self.tensor("numels", torch.tensor(self.items.numels, dtype=torch.int64))
        # Elements available from each item's start, per field (-1: not given). The kernel
        # checks them against the elements it will touch before it touches any.
        self.limits: list[list[int] | None] = [None] * len(_FIELDS)
        if not self.items.simple:
            self.tensor("step_of", torch.tensor(self.items.owner, dtype=torch.int64))
        self.pointers("params", params)
        if kind != _ANCHOR_NONE:
            self.pointers("anchors", lists.anchors)  # type: ignore[arg-type]

    def pointers(self, field: str, tensors: list[Tensor]) -> None:
        # A complex tensor and its real view share the address; a DTensor's data is its shard's.
        local = [to_local(t) for t in tensors]
        it = self.items
        addrs = [local[o].data_ptr() + s * _real_size(local[o]) for o, s in zip(it.owner, it.starts)]
        sizes = list(map(Tensor.numel, local))  # one dtype per call: complex for all or none
        if self.complex:
            sizes = [2 * k for k in sizes]
        self.limits[_FIELDS.index(field)] = (
            sizes if it.simple else [sizes[o] - s for o, s in zip(it.owner, it.starts)])
        self.keep.pop("limits", None)
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
        if "limits" not in self.keep:
            n = len(self.items.numels)
            limits = array.array("q")
            for row in self.limits:
                limits.extend(row or [-1] * n)
            self.keep["limits"] = limits
            self.struct.limits = limits.buffer_info()[0]
        code = getattr(library(), f"{name}_{self.suffix}")(ctypes.byref(self.struct))
        if code == 2:
            raise ValueError(
                f"spdecay's CPU kernel ({name}): a tensor is smaller than its parameter (e.g. "
                "optimizer state of another shape); nothing was changed"
            )
        if code != 0:
            raise MemoryError(f"spdecay's CPU kernel ({name}): out of memory for its work list")

    def project(self, coef: Tensor) -> None:
        self.tensor("coef", self.items.from_columns(coef))
        self.run("spd_project")


def _partitions(lists: TensorLists) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    sharded = DTensor is not None and any(isinstance(p, DTensor) for p in lists.params)
    for i, (p, a, step) in enumerate(zip(lists.params, lists.anchors, lists.steps)):
        key = (p.dtype, _anchor_kind(p.dtype, a), None if step is None else step.dtype,
               sharded and is_dtensor(p))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def adam_and_sums(lists: TensorLists, h: AdamHyper) -> PartialStep | None:
    """Phase 1 in C (tensors that ``covers`` accepts), one call per dtype and anchor kind."""
    library()  # build (or load) first: why it cannot is reported before any state changes
    parts, columns = [], []
    # A tensor lr is copied, never read on the host.
    lr = torch.as_tensor(h.lr, dtype=torch.float64).to("cpu", copy=True).reshape(1)
    for idx in _partitions(lists):
        part = lists.pick(idx)
        call = _Call(part, h.with_sums)
        for field in ("grads", "exp_avgs", "exp_avg_sqs"):
            call.pointers(field, getattr(part, field))
        if h.amsgrad:
            call.pointers("max_exp_avg_sqs", part.max_exp_avg_sqs)  # type: ignore[arg-type]
        call.steps(part.steps)  # type: ignore[arg-type]  # 0-d counts, never sharded
        c = call.struct
        c.amsgrad, c.maximize = h.amsgrad, h.maximize
        c.step_double = part.steps[0].dtype == torch.float64  # type: ignore[union-attr]
        c.beta1, c.beta2, c.eps, c.decay = h.beta1, h.beta2, h.eps, h.decay
        call.tensor("lr", lr)
        sums = None
        if h.with_sums:
            sums = call.tensor("sums", torch.empty(3, len(call.items.numels), dtype=torch.float64))
        call.run("spd_phase1")
        if sums is not None:
            parts.append(PartialStep(call.items.to_columns(sums), call))
            columns.append(lists.first_columns(idx))
    return joined(parts, columns) if h.with_sums else None


def measure(lists: TensorLists) -> PartialStep:
    """The add-on's sums in one pass per partition: ``[<g, p - p0>, ||p - p0||^2, 0]`` per
    column (row 0 is 0 where ``lists.grads`` are None), ``p - p0`` taken in float64."""
    parts, columns = [], []
    for idx in _partitions(lists):
        part = lists.pick(idx)
        call = _Call(part, with_sums=True)
        if part.grads[0] is not None:
            call.pointers("grads", part.grads)  # type: ignore[arg-type]
        sums = call.tensor("sums", torch.empty(3, len(call.items.numels), dtype=torch.float64))
        call.run("spd_measure")
        parts.append(PartialStep(call.items.to_columns(sums), call))
        columns.append(lists.first_columns(idx))
    return joined(parts, columns)
