"""Failures a user could hit before the core redesign (issue 10), one test each."""

from __future__ import annotations

import copy
import pickle
import socket
import warnings

import pytest
import torch

from spdecay import AdamL2SP, AdamSPD, SelectiveProjectionDecay, SPDStats, adam_spd
from spdecay.integrations._common import RunningSPDStats, find_stats_source
from tests.helpers.optim import SHAPES, grad_stream, make_params, run, set_grads

# ------------------------------------------------------------------ validate before mutate


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_partial_placement_raises_before_any_state_changes(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh("cpu", (1,))
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    replicated = torch.nn.Parameter(DTensor.from_local(torch.randn(4, dtype=torch.float64, generator=g),
                                                       mesh, [Replicate()]))
    partial = torch.nn.Parameter(DTensor.from_local(torch.randn(5, dtype=torch.float64, generator=g),
                                                    mesh, [Partial()]))
    params = [plain, replicated, partial]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().to_local().clone() if hasattr(p, "to_local") else p.detach().clone()
              for p in params]
    for kw in ({}, {"foreach": False}, {"fused": True}):
        opt = AdamSPD(params, lr=0.1, **kw)
        with pytest.raises(ValueError, match="Partial"):
            opt.step()
        for p, b in zip(params, before):
            local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
            assert torch.equal(local, b), kw
        assert all(len(opt.state[p]) == 0 or int(opt.state[p]["step"]) == 0 for p in params), kw
    base = torch.optim.SGD(params, lr=0.1)
    SelectiveProjectionDecay(base)
    with pytest.raises(ValueError, match="Partial"):
        base.step()
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    assert all(torch.equal(x, b) for x, b in zip(local, before))


# --------------------------------------------------------------- the add-on's float32 ratio


@pytest.mark.parametrize("fused", [False, True], ids=["torch-ops", "fused-cpu"])
def test_addon_float32_ratio_is_exact_for_a_small_step_far_from_the_anchor(fused):
    """A 1e-6 step next to an O(1) deviation: r ~ 1e-7. The difference of two float32 norms is
    off by tens of percent; the add-on must match the exact ratio of the values it sees."""
    g = torch.Generator().manual_seed(14)
    grad = torch.randn(3000, generator=g)
    # zero anchor, p = d with <g, d> > 0 but <sign(g), d> < 0: fires and Adam moves away from it
    start = torch.where(grad.abs() > 1, grad, -1.5 * grad.sign())
    p = start.clone().requires_grad_()
    twin = start.clone().requires_grad_()
    base = torch.optim.Adam([p], lr=1e-6)
    plain = torch.optim.Adam([twin], lr=1e-6)
    spd = SelectiveProjectionDecay(base, anchor="zero", fused=fused)
    for _ in range(3):
        old = twin.detach().double()
        p.grad, twin.grad = grad.clone(), grad.clone()
        base.step()
        plain.step()
        new = twin.detach().double()  # p_adam exactly as the add-on sees it (same float32 ops)
        exact = (new.norm() - old.norm()) / new.norm()
        got = spd.spd_stats().ratio[0].double()
        assert bool(spd.spd_stats().fired[0]) and exact > 0
        assert abs(got - exact) <= 1e-3 * exact, (got.item(), exact.item())
        twin.data.copy_(p.detach())  # continue both from the projected value


# ------------------------------------------------------------------------- AdamL2SP


def test_l2sp_is_not_an_adamspd_and_has_its_own_messages_and_options():
    params = make_params(torch.bfloat16)
    opt = AdamL2SP(params, lr=0.01, weight_decay=0.1, state_dtype=torch.float32)
    assert not isinstance(opt, AdamSPD)
    assert find_stats_source(opt) is None  # integrations do not take it for an SPD source
    run(opt, params, grad_stream(SHAPES, 2, dtype=torch.bfloat16))
    assert opt.state[params[2]]["exp_avg"].dtype == torch.float32
    assert opt.state[params[2]]["anchor"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="L2-SP strength"):
        AdamL2SP(make_params(), weight_decay=-1)


# ---------------------------------------------------------------- options that lied


def test_capturable_is_gone_and_anchor_dtype_must_be_floating():
    with pytest.raises(TypeError):
        AdamSPD(make_params(), capturable=True)
    for kw in ({"anchor_dtype": torch.int8}, {"state_dtype": torch.int64}):
        with pytest.raises(TypeError, match="floating"):
            AdamSPD(make_params(), **kw)
        with pytest.raises(TypeError, match="floating"):
            AdamL2SP(make_params(), **kw)
    with pytest.raises(TypeError, match="floating"):
        AdamSPD([{"params": make_params(), "anchor_dtype": torch.int8}])
    with pytest.raises(TypeError, match="floating"):
        SelectiveProjectionDecay(torch.optim.SGD(make_params(), lr=0.1), anchor_dtype=torch.int8)


# -------------------------------------------------------------- one set of names


def test_adamspd_and_addon_share_stats_type_method_anchor_key_and_errors():
    pa, pb = make_params(), make_params()
    opt = AdamSPD(pa, lr=0.01)
    base = torch.optim.Adam(pb, lr=0.01)
    spd = SelectiveProjectionDecay(base)
    grads = grad_stream(SHAPES, 2)
    run(opt, pa, grads)
    run(base, pb, grads)
    a, b = opt.spd_stats(), spd.spd_stats()
    assert type(a) is type(b) is SPDStats and a.names == b.names
    assert not hasattr(spd, "stats")  # one name: spd_stats (0.1.0 keeps no deprecated alias)
    assert set(opt.state[pa[1]]) == {"step", "exp_avg", "exp_avg_sq", "anchor"}
    assert set(base.state[pb[1]]) == {"step", "exp_avg", "exp_avg_sq", "anchor"}
    # summary keys are the ones the framework loggers write
    running = RunningSPDStats()
    running.update(a)
    assert set(a.summary()) == {k.removeprefix("spd/") for k in running.pop()}
    for target, owner in ((opt, pa), (base, pb)):
        owner[1].grad = torch.sparse_coo_tensor([[0]], torch.ones(1), (5,), dtype=torch.float64)
        with pytest.raises(RuntimeError, match="sparse"):
            target.step()


# -------------------------------------------------------------------- foreign state


def test_a_foreign_state_dict_is_refused_with_how_to_migrate():
    params = make_params()
    adamw = torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    run(adamw, params, grad_stream(SHAPES, 2))
    sd = adamw.state_dict()
    twins = [p.detach().clone().requires_grad_() for p in params]
    pre = make_params()  # the pre-trained weights
    opt = AdamSPD([{"params": twins[:3], "anchor": [p.detach() for p in pre[:3]]},
                   {"params": twins[3:], "spd": False, "weight_decay": 0.0}], lr=0.01)
    with pytest.raises(ValueError, match=r"not written by AdamSPD.*load_adam_state"):
        opt.load_state_dict(sd)
    assert opt.param_groups[1]["spd"] is False and opt.param_groups[0]["weight_decay"] == 1.0
    opt.load_adam_state(sd)  # the documented migration: moments and steps only
    assert opt.param_groups[1]["spd"] is False and opt.param_groups[1]["weight_decay"] == 0.0
    for p, q in zip(twins, params):
        assert torch.equal(opt.state[p]["exp_avg"], adamw.state[q]["exp_avg"])
        assert float(opt.state[p]["step"]) == 2.0
    assert torch.equal(opt.state[twins[0]]["anchor"], pre[0].detach())
    l2sp = AdamL2SP(make_params())
    with pytest.raises(ValueError, match="not written by AdamL2SP"):
        l2sp.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not written by AdamSPD"):
        AdamSPD(make_params()).load_state_dict(l2sp.state_dict())


# ---------------------------------------------------------------- copies of the add-on


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_an_optimizer_with_the_addon_keeps_spd(how):
    params = make_params()
    base = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    spd = SelectiveProjectionDecay(base, weight_decay=1.0)
    grads = grad_stream(SHAPES, 10)
    run(base, params, grads[:3])
    clone = copy.deepcopy(base) if how == "deepcopy" else pickle.loads(pickle.dumps(base))
    clone_spd = SelectiveProjectionDecay.of(clone)
    assert clone_spd is not None and clone_spd is not spd
    cparams = clone.param_groups[0]["params"]
    for step_grads in grads[3:]:
        set_grads(params, step_grads)
        set_grads(cparams, step_grads)
        base.step()
        clone.step()
        assert clone_spd.spd_stats().fired.tolist() == spd.spd_stats().fired.tolist()
    for p, q in zip(cparams, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
    spd.remove()
    plain = copy.deepcopy(base)  # detached: a copy is a plain optimizer again
    assert SelectiveProjectionDecay.of(plain) is None


# -------------------------------------------------------------------- memory formats


@pytest.mark.parametrize("anchor", ["init", "zero"])
@pytest.mark.parametrize("kw", [{}, {"fused": True}, {"foreach": False}], ids=["default", "fused", "single"])
def test_channels_last_moments_with_contiguous_params(kw, anchor):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    cl = torch.nn.Parameter(weight.clone().to(memory_format=torch.channels_last))
    opt = AdamSPD([cl], lr=0.05, anchor=anchor, **kw)
    grads = [torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g) + 0.3 for _ in range(6)]
    for gr in grads[:3]:
        cl.grad = gr.clone()
        opt.step()
    assert opt.state[cl]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    contiguous = torch.nn.Parameter(cl.detach().contiguous())
    resumed = AdamSPD([contiguous], lr=0.05, anchor=anchor, **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # channels_last moments
    for gr in grads[3:]:
        cl.grad, contiguous.grad = gr.clone(), gr.clone()
        opt.step()
        resumed.step()
    torch.testing.assert_close(contiguous.detach(), cl.detach(), rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- anchor arguments


def test_anchor_argument_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"anchor must be .*got None.*anchor='zero'"):
        AdamSPD(make_params(), anchor=None)
    ps = make_params()
    with pytest.raises(ValueError, match="both 'pre' and 'anchor'"):
        AdamSPD([{"params": ps, "pre": [p.detach() for p in ps], "anchor": "zero"}])
    with pytest.raises(ValueError, match="each group its own 'anchor'"):
        AdamSPD([{"params": ps[:2]}, {"params": ps[2:]}], anchor=[p.detach() for p in ps])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamSPD(ps, anchor=[p.detach() for p in ps])  # a plain list with anchor tensors is fine


# ------------------------------------------------------------------------ structure


def test_the_package_has_no_import_cycle():
    """Every import inside src/spdecay (function-level ones too) forms an acyclic graph."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "src" / "spdecay"
    mods = {".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for c in [node.module] + [f"{node.module}.{a.name}" for a in node.names]:
                    if c in mods and c != m and not m.startswith(c + "."):
                        graph[m].add(c)
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in graph[u]:
            assert state.get(v) != 1, "import cycle: " + " -> ".join(path[path.index(v):] + [u, v])
            if v not in state:
                visit(v, path + [u])
        state[u] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_functional_form_returns_the_one_stats_type():
    import spdecay

    params = [p.detach() for p in make_params()]
    grads = [g for g in grad_stream(SHAPES, 1)[0]]
    zeros = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float64) for _ in params]
    stats = spdecay.adam_spd(params, grads, [z.clone() for z in zeros], [z.clone() for z in zeros],
                             [], steps, [p.clone() for p in params], amsgrad=False, beta1=0.9,
                             beta2=0.999, lr=0.1, weight_decay=1.0, eps=1e-8, maximize=False)
    assert type(stats) is SPDStats and len(stats) == len(params)
    assert not hasattr(spdecay, "SPDStepStats")  # one stats type, one name


@pytest.mark.parametrize("cls", [AdamSPD, AdamL2SP])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weight_decay_and_lr_are_refused(cls, bad):
    """weight_decay=inf used to be accepted and turned every tensor into NaN (0 * inf), also
    where the condition never fired."""
    params = make_params()
    with pytest.raises(ValueError, match="weight_decay.*finite number >= 0"):
        cls(params, weight_decay=bad)
    with pytest.raises(ValueError, match="lr=.*finite"):
        cls(params, lr=bad)
    with pytest.raises(ValueError, match="lr=.*finite"):
        cls(params, lr=torch.tensor(bad))
    opt = cls(params)
    with pytest.raises(ValueError, match="weight_decay.*finite number >= 0"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "weight_decay": bad})
    zeros = [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match="weight_decay.*finite number >= 0"):
        adam_spd([p.detach() for p in params], zeros, zeros, zeros, [], [torch.zeros(())] * 4,
                 zeros, amsgrad=False, beta1=0.9, beta2=0.999, lr=0.1, weight_decay=bad, eps=1e-8,
                 maximize=False)
