"""State that does not fit its parameters is refused before anything is copied or touched.

The original report: the optimizer state of ``Linear(70, 70)`` loaded into an optimizer of
``Linear(70, 71)`` made the C kernel write out of bounds (SIGSEGV / heap corruption) at the next
step; state larger than the parameter stepped silently with the wrong moments and anchor.
"""

from __future__ import annotations

import pytest
import torch

from spdecay import AdamL2SP, AdamSPD, SelectiveProjectionDecay
from spdecay.spd.backends import fused_c
from spdecay.spd.interface import AdamHyper, TensorLists


def _stepped(model: torch.nn.Module, cls=AdamSPD, **kw):
    opt = cls(model.parameters(), lr=0.01, **kw)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("cls", [AdamSPD, AdamL2SP])
@pytest.mark.parametrize("path", [{}, {"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["default", "fused_c", "multi_tensor", "single_tensor"])
@pytest.mark.parametrize("sizes", [((70, 70), (70, 71)), ((70, 71), (70, 70))],
                         ids=["smaller-state", "larger-state"])
def test_state_of_another_shape_is_refused_at_load(cls, path, sizes):
    torch.manual_seed(0)
    saved = _stepped(torch.nn.Linear(*sizes[0]), cls, **path).state_dict()
    target = torch.nn.Linear(*sizes[1])
    opt = cls(target.parameters(), lr=0.01, **path)
    before = [p.detach().clone() for p in target.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*shape \(70, 70\)"
                       if sizes[0] == (70, 70) else r"shape \(71, 70\)"):
        opt.load_state_dict(saved)
    assert not opt.state  # nothing was loaded
    for p in target.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the optimizer still works, from fresh state
    assert all(not torch.equal(a, p) for a, p in zip(before, target.parameters()))


def test_the_message_names_a_named_parameter():
    model = torch.nn.Linear(3, 3)
    saved = _stepped(model, AdamSPD).state_dict()
    saved["state"][1]["exp_avg"] = torch.zeros(4)
    other = torch.nn.Linear(3, 3)
    opt = AdamSPD(list(other.named_parameters()), lr=0.01)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 'bias' has shape \(4,\)"):
        opt.load_state_dict(saved)


def test_real_moments_for_a_complex_parameter_are_refused():
    z = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    opt = _stepped_list([z])
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(4)
    fresh = AdamSPD([z.detach().clone().requires_grad_()], lr=0.01)
    with pytest.raises(ValueError, match="complex64 parameter"):
        fresh.load_state_dict(saved)
    saved["state"][0]["exp_avg"] = torch.zeros(4, dtype=torch.complex64)
    saved["state"][0]["step"] = torch.zeros(2)
    with pytest.raises(ValueError, match="'step'.*2 elements"):
        fresh.load_state_dict(saved)


def _stepped_list(params):
    opt = AdamSPD(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("fused", [True, False])
def test_addon_refuses_anchors_of_another_shape(fused):
    torch.manual_seed(0)
    small = torch.nn.Linear(70, 70)
    base = torch.optim.Adam(small.parameters(), lr=0.01)
    SelectiveProjectionDecay(base, fused=fused)
    for p in small.parameters():
        p.grad = torch.ones_like(p)
    base.step()
    saved = base.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):  # torch's own moments fit; only the anchors do not
        saved["state"][0][key] = torch.zeros(71, 70)
        saved["state"][1][key] = torch.zeros(71)
    big = torch.nn.Linear(70, 71)
    base2 = torch.optim.Adam(big.parameters(), lr=0.01)
    SelectiveProjectionDecay(base2, fused=fused)
    with pytest.raises(ValueError, match=r"anchor of parameter param_groups\[0\]\['params'\]\[0\] "
                                         r"has shape \(70, 70\)"):
        base2.load_state_dict(saved)
    assert not base2.state


def _lists(numel_p: int, numel_state: int, anchor_numel: int | None = None) -> TensorLists:
    p = torch.zeros(numel_p)
    a = None if anchor_numel is None else torch.ones(anchor_numel)
    return TensorLists([p], [torch.ones(numel_p)], [torch.zeros(numel_state)],
                       [torch.zeros(numel_state)], [], [torch.zeros(())], [a])


@pytest.mark.parametrize("case", ["moments", "anchor", "grad"])
def test_the_c_kernel_checks_sizes_itself(case):
    """Defence in depth: the kernel refuses, before touching memory, a tensor smaller than its
    parameter, even where the Python-side checks were bypassed."""
    fused_c.library()
    n = 4900 + 70 * 71  # large enough to be out of any allocator slack
    lists = {"moments": _lists(n, 4900, n), "anchor": _lists(n, n, 4900),
             "grad": _lists(n, n, n)}[case]
    if case == "grad":
        lists.grads = [torch.ones(4900)]
    hyper = AdamHyper(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False, maximize=False,
                      with_sums=True)
    before = [t.clone() for t in (lists.params[0], lists.exp_avgs[0], lists.steps[0])]
    with pytest.raises(ValueError, match="smaller than its parameter"):
        fused_c.adam_and_sums(lists, hyper)
    after = (lists.params[0], lists.exp_avgs[0], lists.steps[0])
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing was changed
    if case == "anchor":  # the add-on's measurement reads the anchor too
        with pytest.raises(ValueError, match="smaller than its parameter"):
            fused_c.measure(TensorLists(lists.params, [None], anchors=lists.anchors))
