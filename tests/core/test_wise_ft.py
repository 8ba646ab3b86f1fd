"""WiSE-FT interpolation of state dicts."""

from __future__ import annotations

import pytest
import torch

from spdecay import interpolate


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_values_by_hand_and_endpoints():
    pre = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}
    ft = {"w": torch.tensor([4.0, -2.0]), "b": torch.tensor([3.0])}
    out = interpolate(pre, ft, 0.25)
    assert out["w"].tolist() == [1.0, 1.0] and out["b"].tolist() == [1.5]
    assert interpolate(pre, ft, 0.0)["w"].tolist() == [0.0, 2.0]
    assert interpolate(pre, ft, 1.0)["w"].tolist() == [4.0, -2.0]
    assert interpolate(pre, ft, 1.5)["b"].tolist() == [4.0]  # extrapolation
    assert ft["w"].tolist() == [4.0, -2.0]  # inputs untouched


def test_real_state_dicts_buffers_and_dtypes():
    a, b = model(0), model(1)
    b[1].num_batches_tracked += 5
    pre, ft = a.state_dict(), b.state_dict()
    ft["2.weight"] = ft["2.weight"].to(torch.bfloat16)
    out = interpolate(pre, ft, 0.3)
    for k in pre:
        if k.endswith("num_batches_tracked"):
            assert out[k].dtype == torch.long and out[k].item() == 5  # taken from fine-tuned
        else:
            expected = 0.7 * pre[k].double() + 0.3 * ft[k].double()
            assert out[k].dtype == ft[k].dtype
            tol = 1e-2 if ft[k].dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(out[k].double(), expected, rtol=tol, atol=tol)
    m = model(2)
    m.load_state_dict(out)  # loads as a state dict


def test_missing_and_extra_keys():
    pre = {"backbone.w": torch.zeros(2), "old_head.w": torch.zeros(1)}
    ft = {"backbone.w": torch.ones(2), "head.w": torch.full((3,), 7.0)}
    with pytest.raises(ValueError, match=r"only in finetuned_state: 'head.w'.*only in pretrained_state: 'old_head.w'"):
        interpolate(pre, ft, 0.5)
    out = interpolate(pre, ft, 0.5, strict=False)
    assert set(out) == {"backbone.w", "head.w"}
    assert out["head.w"].tolist() == [7.0] * 3 and out["backbone.w"].tolist() == [0.5, 0.5]


def test_clear_errors():
    pre, ft = {"w": torch.zeros(2)}, {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'w': shape \(2,\) in pretrained_state vs \(3,\)"):
        interpolate(pre, ft, 0.5)
    with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
        interpolate(pre, pre, float("nan"))
    with pytest.raises(ValueError, match="alpha must be a finite number, got '0.5'"):
        interpolate(pre, pre, "0.5")
    with pytest.raises(TypeError, match="finetuned_state must be a mapping"):
        interpolate(pre, [torch.zeros(2)], 0.5)
    with pytest.raises(TypeError, match=r"finetuned_state\['w'\] is a list"):
        interpolate(pre, {"w": [0.0, 0.0]}, 0.5)
