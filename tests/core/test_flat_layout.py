"""The FlatLayout contract (DeepSpeed ZeRO-1/2 flat partitions): a flat parameter holding
segments of several logical tensors must step exactly like the separate tensors."""

from __future__ import annotations

import pytest
import torch

from spdecay import AdamSPD, FlatLayout, SelectiveProjectionDecay

SHAPES = [(4, 3), (7,), (5, 2), (3,)]
# Flat order: tensor 2, padding, tensor 1's first 4 elements, tensor 0, tensor 1's last 3,
# tensor 3, padding: a tensor split into two segments, padding inside and at the end.
PLAN = [(2, None), ("pad", 3), (1, slice(0, 4)), (0, None), (1, slice(4, 7)), (3, None), ("pad", 5)]


def build_layout():
    offsets, lengths, ids, pos = [], [], [], 0
    for what, part in PLAN:
        n = part if what == "pad" else len(range(*(part or slice(0, _numel(what))).indices(_numel(what))))
        if what != "pad":
            offsets.append(pos)
            lengths.append(n)
            ids.append(what)
        pos += n
    return FlatLayout(tuple(offsets), tuple(lengths), tuple(ids), len(SHAPES)), pos


def _numel(i):
    return int(torch.tensor(SHAPES[i]).prod())


def flatten(tensors, pad):
    """The flat buffer of ``tensors`` in PLAN order, padding from ``pad`` (a generator)."""
    parts = []
    for what, part in PLAN:
        if what == "pad":
            parts.append(torch.randn(part, dtype=torch.float64, generator=pad))
        else:
            parts.append(tensors[what].reshape(-1)[part or slice(None)])
    return torch.cat(parts)


def unflatten(flat, layout):
    out = [torch.empty(_numel(i), dtype=flat.dtype) for i in range(len(SHAPES))]
    done = [0] * len(SHAPES)
    for off, n, i in zip(layout.offsets, layout.lengths, layout.logical_ids):
        out[i][done[i] : done[i] + n] = flat[off : off + n]
        done[i] += n
    return [o.reshape(s) for o, s in zip(out, SHAPES)]


def padding_mask(layout, numel):
    mask = torch.ones(numel, dtype=torch.bool)
    for off, n in zip(layout.offsets, layout.lengths):
        mask[off : off + n] = False
    return mask


def grad_stream(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        drift = 0.7 if (t // 3) % 2 == 0 else -0.7
        out.append([torch.randn(s, dtype=torch.float64, generator=g) + drift for s in SHAPES])
    return out


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=torch.float64, generator=g) for s in SHAPES]


@pytest.mark.parametrize("slice_numel", [None, 4], ids=["whole", "sliced"])
def test_adamspd_flat_partition_matches_separate_tensors(backend, slice_numel, monkeypatch):
    if slice_numel is not None:  # multi-tensor: the flat partition in slices cutting segments
        if backend != {"foreach": True}:
            pytest.skip("slices are the multi-tensor backend's")
        import spdecay.spd.backends.multi_tensor as MT

        monkeypatch.setattr(MT, "_SLICE_NUMEL", slice_numel)
    layout, numel = build_layout()
    init = make()
    separate = [t.clone().requires_grad_() for t in init]
    pad_gen = torch.Generator().manual_seed(5)
    flat = flatten(init, pad_gen).requires_grad_()
    pad0 = flat.detach()[padding_mask(layout, numel)].clone()
    o_sep = AdamSPD(separate, lr=0.05, weight_decay=1.0, **backend)
    o_flat = AdamSPD([flat], lr=0.05, weight_decay=1.0, **backend)
    o_flat.set_flat_layout(flat, layout)
    pad_ref = pad0.clone().requires_grad_()  # padding gets plain Adam
    o_pad = torch.optim.Adam([pad_ref], lr=0.05, foreach=False)
    fired = []
    grad_gen = torch.Generator().manual_seed(9)
    for grads in grad_stream(10):
        for p, g in zip(separate, grads):
            p.grad = g.clone()
        flat.grad = flatten(grads, grad_gen)
        pad_ref.grad = flat.grad[padding_mask(layout, numel)].clone()
        o_sep.step()
        o_flat.step()
        o_pad.step()
        s_sep, s_flat = o_sep.spd_stats(), o_flat.spd_stats()
        assert s_flat.names == [f"group0.param0[{k}]" for k in range(len(SHAPES))]
        assert s_flat.fired.tolist() == s_sep.fired.tolist()
        torch.testing.assert_close(s_flat.ratio, s_sep.ratio, rtol=1e-6, atol=1e-9)
        fired += s_sep.fired.tolist()
    assert any(fired) and not all(fired), "the condition must fire on some steps only"
    for got, want in zip(unflatten(flat.detach(), layout), separate):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat.detach()[padding_mask(layout, numel)], pad_ref.detach(),
                               rtol=1e-12, atol=1e-12)
    assert set(o_flat.state[flat]) == {"step", "exp_avg", "exp_avg_sq", "anchor"}


@pytest.mark.parametrize("fused", [False, True], ids=["torch-ops", "fused-cpu"])
def test_addon_flat_partition_matches_separate_tensors(fused):
    layout, numel = build_layout()
    init = make(seed=3)
    separate = [t.clone().requires_grad_() for t in init]
    flat = flatten(init, torch.Generator().manual_seed(6)).requires_grad_()
    base_sep = torch.optim.Adam(separate, lr=0.05, foreach=False)
    base_flat = torch.optim.Adam([flat], lr=0.05, foreach=False)
    spd_sep = SelectiveProjectionDecay(base_sep, weight_decay=1.0, fused=fused)
    spd_flat = SelectiveProjectionDecay(base_flat, weight_decay=1.0, fused=fused)
    spd_flat.set_flat_layout(flat, layout)
    grad_gen = torch.Generator().manual_seed(10)
    fired = []
    for grads in grad_stream(10, seed=4):
        for p, g in zip(separate, grads):
            p.grad = g.clone()
        flat.grad = flatten(grads, grad_gen)
        base_sep.step()
        base_flat.step()
        assert spd_flat.spd_stats().fired.tolist() == spd_sep.spd_stats().fired.tolist()
        fired += spd_sep.spd_stats().fired.tolist()
    assert any(fired) and not all(fired)
    for got, want in zip(unflatten(flat.detach(), layout), separate):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_layout_sums_are_all_reduced_over_the_process_group_in_one_collective(monkeypatch):
    """With a process group, the per-logical sums of all flat params of all groups go through
    one all_reduce (here a recording stand-in that doubles the sums, as two identical ranks)."""
    import torch.distributed as dist

    layout, numel = build_layout()
    group = object()  # any handle: the driver passes it through to all_reduce
    layout = FlatLayout(layout.offsets, layout.lengths, layout.logical_ids, layout.num_logical, group)
    calls = []

    def fake_all_reduce(t, op=None, group=None):
        calls.append((tuple(t.shape), group))
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    a = flatten(make(), torch.Generator().manual_seed(1)).requires_grad_()
    b = flatten(make(seed=2), torch.Generator().manual_seed(2)).requires_grad_()
    opt = AdamSPD([{"params": [a]}, {"params": [b], "weight_decay": 0.5}], lr=0.05)
    opt.set_flat_layout(a, layout)
    opt.set_flat_layout(b, layout)
    twins = [a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]
    plain = AdamSPD([{"params": [twins[0]]}, {"params": [twins[1]], "weight_decay": 0.5}], lr=0.05)
    local = FlatLayout(layout.offsets, layout.lengths, layout.logical_ids, layout.num_logical)
    for t in twins:
        plain.set_flat_layout(t, local)
    for step in range(4):
        grads = [torch.randn(numel, dtype=torch.float64) + (0.5 if step < 2 else -0.5) for _ in "ab"]
        a.grad, b.grad = grads[0].clone(), grads[1].clone()
        twins[0].grad, twins[1].grad = grads[0].clone(), grads[1].clone()
        opt.step()
        plain.step()
    assert calls == [((3, 2 * len(SHAPES)), group)] * 4  # one collective per step, both groups
    # Doubling every sum (two identical ranks) leaves the decision and ratio as they are.
    assert opt.spd_stats().fired.tolist() == plain.spd_stats().fired.tolist()
    torch.testing.assert_close(a.detach(), twins[0].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), twins[1].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("param", "layout", "error", "match"),
    [
        (torch.zeros(10), FlatLayout((0, 4), (5, 3), (0, 1), 2), ValueError, "overlaps"),
        (torch.zeros(10), FlatLayout((0, 8), (5, 3), (0, 1), 2), ValueError, "outside"),
        (torch.zeros(10), FlatLayout((0,), (5,), (2,), 2), ValueError, "logical id 2"),
        (torch.zeros(10), FlatLayout((0,), (5, 1), (0,), 1), ValueError, "same length"),
        (torch.zeros(2, 5), FlatLayout((0,), (5,), (0,), 1), ValueError, "1-D"),
        (torch.zeros(10), (0, 5), TypeError, "FlatLayout"),
    ],
)
def test_invalid_layouts_are_refused(param, layout, error, match):
    p = param.requires_grad_()
    opt = AdamSPD([p])
    with pytest.raises(error, match=match):
        opt.set_flat_layout(p, layout)
    base = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(error, match=match):
        SelectiveProjectionDecay(base).set_flat_layout(p, layout)


def test_parameters_flattened_behind_the_optimizer_raise_before_any_change():
    params = [t.clone().requires_grad_() for t in make()]
    opt = AdamSPD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    layout, numel = build_layout()
    flat = flatten([p.detach() for p in params], torch.Generator().manual_seed(0)).requires_grad_()
    flat.grad = torch.ones(numel, dtype=torch.float64)
    opt.param_groups[0]["params"] = [flat]  # what DeepSpeed ZeRO-1/2 does
    before = flat.detach().clone()
    with pytest.raises(RuntimeError, match=r"DeepSpeed ZeRO flattens.*attach\(engine\)"):
        opt.step()
    assert torch.equal(flat.detach(), before) and flat not in opt.state
    opt.set_flat_layout(flat, layout)  # what attach() does
    opt.step()
    assert not torch.equal(flat.detach(), before)
    base = torch.optim.SGD([p for p in params], lr=0.1)
    spd = SelectiveProjectionDecay(base)
    base.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO flattens"):
        base.step()
    spd.set_flat_layout(flat, layout)
    base.step()


def test_groups_added_after_construction_are_not_mistaken_for_flattened_ones():
    a, b = make(), make(seed=1)
    base = torch.optim.SGD([t.requires_grad_() for t in a], lr=0.1)
    SelectiveProjectionDecay(base)
    base.add_param_group({"params": [t.requires_grad_() for t in b]})
    for t in a + b:
        t.grad = torch.ones_like(t)
    base.step()  # no error: the new group is the user's, not an engine's
    opt = AdamSPD([a[0]], lr=0.1)
    opt.add_param_group({"params": [b[0]]})
    opt.step()


def test_a_copy_of_an_optimizer_with_layouts_keeps_them():
    import copy

    layout, numel = build_layout()
    flat = flatten(make(), torch.Generator().manual_seed(2)).requires_grad_()
    opt = AdamSPD([flat], lr=0.05)
    opt.set_flat_layout(flat, layout)
    clone = copy.deepcopy(opt)
    twin = clone.param_groups[0]["params"][0]
    for grads in grad_stream(4):
        g = flatten(grads, torch.Generator().manual_seed(3))
        flat.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        clone.step()
    assert len(clone.spd_stats()) == len(SHAPES)
    torch.testing.assert_close(twin.detach(), flat.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["adamspd", "addon"])
def test_stats_cover_a_flat_partition_outside_the_groups(kind):
    """DeepSpeed ZeRO-3 puts a sub-group's flat partition into the client optimizer's group only
    while it steps it: the stats of the last step must still list its logical tensors."""
    layout, numel = build_layout()
    layout = FlatLayout(layout.offsets, layout.lengths, layout.logical_ids, layout.num_logical,
                        names=tuple(f"t{i}" for i in range(len(SHAPES))))
    flat = torch.nn.Parameter(torch.randn(numel, dtype=torch.float64))
    if kind == "adamspd":
        opt = AdamSPD([flat], lr=1e-2, foreach=True)
        owner = opt
    else:
        opt = torch.optim.SGD([flat], lr=1e-2)
        owner = SelectiveProjectionDecay(opt, fused=False)
    owner.set_flat_layout(flat, layout)
    for grads in grad_stream(3):
        flat.grad = flatten(grads, torch.Generator().manual_seed(5))
        opt.step()
    inside = owner.spd_stats()
    opt.param_groups[0]["params"] = []  # as ZeRO-3 leaves it between sub-group steps
    outside = owner.spd_stats()
    assert outside.names == inside.names == ["t0", "t1", "t2", "t3"]
    assert torch.equal(outside.fired, inside.fired)
    assert torch.equal(outside.deviation, inside.deviation)
