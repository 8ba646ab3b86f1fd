"""The torch multi-tensor backend: Adam plus the SPD sums over 1-D pieces of tensors.

Every tensor is cut into *pieces* that the same code steps with ``torch._foreach_*`` ops:

* small tensors (many biases and norms) are gathered into one flat buffer (a CPU foreach op
  costs ~1.5 us per tensor; one long vector is cheaper), their sums taken per segment;
* on CPU, large tensors are walked in cache-sized slices, every op applied to one slice before
  the next (one op per whole tensor would stream each buffer from memory again and again);
* on other devices, whole tensors in batches of about ``_CHUNK_NUMEL`` elements;
* a flat engine partition with a ``spdecay.spd.FlatLayout`` is sliced like a large tensor,
  its sums taken per segment and scattered to the logical tensors (padding gets plain Adam).
"""

from __future__ import annotations

import torch
from torch import Tensor

from spdecay.spd.backends.numerics import adam_coefficients, dot, local_real
from spdecay.spd.backends.single_tensor import measure
from spdecay.spd.cache import Memo, to_device
from spdecay.spd.decision import project_
from spdecay.spd.interface import AdamHyper, PartialStep, TensorLists, joined
from spdecay.spd.layout import segment_ids
from spdecay.spd.reduce import is_dtensor

__all__ = ["adam_and_sums", "covers", "measure"]  # measure: the add-on's, shared (float64)

# Tensors up to this size are gathered into one flat buffer.
_SMALL_NUMEL = 4096
# Off CPU, whole tensors are stepped in batches of about this many elements (bounded temporaries).
_CHUNK_NUMEL = 1 << 23
# On CPU, large tensors are walked in slices of this many elements (cache-resident working set).
_SLICE_NUMEL = 1 << 19


def _walk_in_slices(device: torch.device) -> bool:
    """CPU: slice by slice (cache-resident); other devices: whole tensors in batches."""
    return device.type == "cpu"


class _Piece:
    """1-D (or, for non-contiguous tensors, whole) views of one part of a tensor's step."""

    __slots__ = ("t", "scale", "shift", "seg", "width", "col")

    def __init__(self, t: list, scale: Tensor, shift: Tensor, seg: Tensor | None,
                 width: int, col: int) -> None:
        self.t = t  # [p, g, m, v, vmax, a]
        self.scale, self.shift = scale, shift  # 0-d, or per element for gathered pieces
        self.seg, self.width, self.col = seg, width, col  # seg: column per element (or None)


def _slices(n: int) -> list[slice]:
    if n == 0:  # an empty local shard (FSDP2, more ranks than rows)
        return [slice(0, 0)]
    return [slice(i, min(i + _SLICE_NUMEL, n)) for i in range(0, n, _SLICE_NUMEL)]


def _flat_ok(ts: list[Tensor | None]) -> bool:
    return all(t is None or t.is_contiguous() for t in ts)


def _gatherable(lists: TensorLists, i: int) -> bool:
    # Written back through flat views: p and the moments must be contiguous (gradients and
    # anchors are only read, in logical order, by the gather).
    p, vmax = lists.params[i], lists.max_exp_avg_sqs[i]
    return (p.numel() <= _SMALL_NUMEL and lists.layouts[i] is None and p.is_contiguous()
            and lists.exp_avgs[i].is_contiguous() and lists.exp_avg_sqs[i].is_contiguous()
            and (vmax is None or vmax.is_contiguous()) and not p.is_complex()
            and not is_dtensor(p))


def covers(lists: TensorLists, i: int) -> bool:
    return True


def _partitions(lists: TensorLists) -> list[tuple[list[int], bool]]:
    """Index lists sharing device, dtypes, anchor kind and shard-ness; small ones flagged."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(lists.params):
        a = lists.anchors[i]
        key = (p.device, p.dtype, lists.grads[i].dtype, lists.exp_avgs[i].dtype, is_dtensor(p),
               a is None, None if a is None else a.dtype, _gatherable(lists, i))
        groups.setdefault(key, []).append(i)
    return [(idx, key[-1]) for key, idx in groups.items()]


def adam_and_sums(lists: TensorLists, h: AdamHyper) -> PartialStep | None:
    parts, columns = [], []
    for idx, small in _partitions(lists):
        run = _Partition(lists.pick(idx), h, small)
        if h.with_sums:
            parts.append(PartialStep(run.sums, run))
            columns.append(lists.first_columns(idx))
    return joined(parts, columns) if h.with_sums else None


class _Partition:
    """Phase 1 of one partition at construction (``sums``: [3, columns]); ``project`` is phase 2."""

    def __init__(self, lists: TensorLists, h: AdamHyper, small: bool) -> None:
        self.h, self.lists = h, lists
        torch._foreach_add_(lists.steps, 1)
        neg_step_size, bc2_sqrt = adam_coefficients(torch.stack(lists.steps), beta1=h.beta1,
                                                    beta2=h.beta2, lr=h.lr)
        # denom = sqrt(v) / (bc2_sqrt * -step_size) + eps / -step_size, so p += m / denom
        scale, shift = bc2_sqrt * neg_step_size, h.eps / neg_step_size
        rows = zip(lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs,
                   lists.max_exp_avg_sqs, lists.anchors)
        # gathered tensors are local, real and contiguous by construction
        self.local = [list(r) for r in rows] if small else [local_real(list(r)) for r in rows]
        self.gathered = None
        if small:
            pieces = [self._gather(scale, shift)]
        else:
            pieces = self._split(scale, shift)
        cpu = _walk_in_slices(lists.params[0].device)
        results = []
        for batch in _batches(pieces, cpu):
            results += _step_batch(batch, h)
        if self.gathered is not None:
            self._scatter_state()
            if not h.with_sums:
                self._scatter_params()
        if h.with_sums:
            self.sums = self._collect(pieces, results)

    # ------------------------------------------------------------------------- pieces
    def _gather(self, scale: Tensor, shift: Tensor) -> _Piece:
        rows = self.local
        sizes = [r[0].numel() for r in rows]
        dtype = torch.promote_types(rows[0][0].dtype, rows[0][2].dtype)
        device = rows[0][0].device
        seg = _tensor_ids(tuple(sizes), device)

        def flat(k: int) -> Tensor | None:
            if rows[0][k] is None:
                return None
            return torch._C._nn.flatten_dense_tensors([r[k] for r in rows]).to(dtype)

        t = [flat(k) for k in range(6)]
        self.gathered = (t, sizes, dtype)
        return _Piece(t, scale.to(dtype).index_select(0, seg), shift.to(dtype).index_select(0, seg),
                      seg, len(rows), 0)

    def _split(self, scale: Tensor, shift: Tensor) -> list[_Piece]:
        state_dtype = self.local[0][2].dtype
        scale, shift = scale.to(state_dtype).unbind(), shift.to(state_dtype).unbind()
        cpu = _walk_in_slices(self.lists.params[0].device)
        out, col = [], 0
        for i, row in enumerate(self.local):
            layout = self.lists.layouts[i]
            width = self.lists.width(i)
            if not _flat_ok(row):  # e.g. a transposed parameter: whole, as it is
                out.append(_Piece(row, scale[i], shift[i], None, 1, col))
            else:
                flat = [None if t is None else t.view(-1) for t in row]
                seg = None if layout is None else segment_ids(layout, row[0].numel(), row[0].device)
                for sl in _slices(flat[0].numel()) if cpu or seg is not None else [slice(None)]:
                    out.append(_Piece([None if t is None else t[sl] for t in flat], scale[i],
                                      shift[i], None if seg is None else seg[sl], width, col))
            col += width
        return out

    def _scatter_state(self) -> None:
        t, sizes, _ = self.gathered
        for k in (2, 3, 4):
            if t[k] is not None:
                dst = [r[k].view(-1) for r in self.local]
                torch._foreach_copy_(dst, list(t[k].split(sizes)))

    def _scatter_params(self) -> None:
        t, sizes, _ = self.gathered
        torch._foreach_copy_([r[0].view(-1) for r in self.local], list(t[0].split(sizes)))

    def _collect(self, pieces: list[_Piece], results: list[Tensor]) -> Tensor:
        if self.gathered is not None:
            return results[0][:, :-1]
        cols: list[Tensor | None] = []
        for piece, r in zip(pieces, results):
            if piece.col >= len(cols):  # the first piece of a tensor
                cols += [None] * (piece.col + piece.width - len(cols))
            acc = cols[piece.col]
            cols[piece.col] = r if acc is None else acc + r
        out = []
        for piece_col in range(len(cols)):
            c = cols[piece_col]
            if c is None:  # logical columns of a layout after its first (kept in the first)
                continue
            out.append(c.unsqueeze(1) if c.dim() == 1 else c[:, :-1])
        return torch.cat(out, dim=1).to(torch.float64)

    # -------------------------------------------------------------------------- phase 2
    def project(self, coef: Tensor) -> None:
        if self.gathered is not None:
            t, _, dtype = self.gathered
            seg = _tensor_ids(tuple(self.gathered[1]), t[0].device)
            project_([t[0]], [t[5]], [coef.to(dtype).index_select(0, seg)])
            self._scatter_params()
            return
        dtype = self.local[0][0].dtype
        plain, plain_a, weights = [], [], []
        start = 0
        for i, row in enumerate(self.local):
            layout = self.lists.layouts[i]
            width = self.lists.width(i)
            c = coef[start : start + width].to(dtype)
            start += width
            if layout is None:
                plain.append(row[0])
                plain_a.append(row[5])
                weights.append(c[0])
                continue
            ids = segment_ids(layout, row[0].numel(), row[0].device)
            weight = torch.cat([c, c.new_zeros(1)]).index_select(0, ids)  # padding: 0
            project_([row[0]], [row[5]], [weight])
        project_(plain, plain_a, weights)


_IDS: Memo[Tensor] = Memo()


def _tensor_ids(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Which tensor each element of a gathered buffer belongs to (built once per layout)."""
    return _IDS.get((sizes, device), lambda: to_device(
        torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)), device))


def _batches(pieces: list[_Piece], cpu: bool) -> list[list[_Piece]]:
    """CPU: one piece at a time (cache-resident); else whole tensors in bounded batches; pieces
    with per-element coefficients or segments always on their own."""
    if cpu:
        return [[p] for p in pieces]
    out: list[list[_Piece]] = []
    current: list[_Piece] = []
    numel = 0
    for piece in pieces:
        if piece.seg is not None or piece.scale.dim() > 0:
            out.append([piece])
            continue
        current.append(piece)
        numel += piece.t[0].numel()
        if numel >= _CHUNK_NUMEL:
            out.append(current)
            current, numel = [], 0
    if current:
        out.append(current)
    return out


def _segment_sum(x: Tensor, seg: Tensor, width: int) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.zeros(width + 1, device=x.device, dtype=acc).index_add_(0, seg, x.to(acc))


def _step_batch(batch: list[_Piece], h: AdamHyper) -> list[Tensor]:
    """Adam on a batch of pieces in place; per piece its sums ([3], or [3, width + 1] with the
    padding column last for pieces with segments)."""
    p, g, m, v, vmax, a = (list(col) for col in zip(*(piece.t for piece in batch)))
    if h.maximize:
        g = torch._foreach_neg(g)
    if h.with_sums:
        d = p if a[0] is None else torch._foreach_sub(p, [x.to(y.dtype) for x, y in zip(a, p)])
        pre = [_pre_sums(gi, di, piece) for gi, di, piece in zip(g, d, batch)]
    elif h.decay != 0:  # AdamW: decoupled decay before the Adam update
        torch._foreach_mul_(p, 1 - h.lr * h.decay)
    if g[0].dtype != m[0].dtype:  # moments kept in a higher precision (state_dtype)
        g = [x.to(m[0].dtype) for x in g]
    torch._foreach_lerp_(m, g, 1 - h.beta1)
    torch._foreach_mul_(v, h.beta2)
    torch._foreach_addcmul_(v, g, g, 1 - h.beta2)
    if h.amsgrad:
        torch._foreach_maximum_(vmax, v)
        v = vmax
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [piece.scale for piece in batch])
    torch._foreach_add_(denom, [piece.shift for piece in batch])
    if not h.with_sums:
        torch._foreach_addcdiv_(p, m, denom)
        return []
    if len(batch) == 1:  # a CPU slice: the update overwrites denom (no new temporary)
        update = [torch.div(m[0], denom[0], out=denom[0])]
    else:
        update = torch._foreach_div(m, denom)
    del denom
    out = []
    for pre_i, u, di, piece in zip(pre, update, d, batch):  # before p moves: d may alias p
        if piece.seg is None:
            growth = 2 * dot(u, di) + dot(u, u)
            out.append(torch.stack([*pre_i, growth]).to(torch.float64))
        else:
            growth = 2 * _segment_sum(u * di, piece.seg, piece.width) + _segment_sum(
                u * u, piece.seg, piece.width)
            out.append(torch.stack([*pre_i, growth]).to(torch.float64))
    torch._foreach_add_(p, update)
    return out


def _pre_sums(g: Tensor, d: Tensor, piece: _Piece) -> tuple[Tensor, Tensor]:
    if piece.seg is None:
        return dot(g, d), dot(d, d)
    return _segment_sum(g * d, piece.seg, piece.width), _segment_sum(d * d, piece.seg, piece.width)
