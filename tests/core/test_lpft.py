"""LP-FT: freeze all but the head for N steps, then unfreeze."""

from __future__ import annotations

import pytest
import torch

from spdecay import LPFT, AdamSPD, SelectiveProjectionDecay


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 6)
        self.classifier = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


def train(model, opt, lpft, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    phases = []
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        phases.append(lpft.step())
    return phases


@pytest.mark.parametrize("make_opt", ["adamspd", "addon"])
def test_backbone_frozen_for_lp_steps_then_trained_with_pretrained_anchor(make_opt):
    model = Net()
    body0 = model.body.weight.detach().clone()
    head0 = model.classifier.weight.detach().clone()
    if make_opt == "adamspd":
        opt = AdamSPD(model.parameters(), lr=0.05)
        anchor = lambda p: opt.state[p]["anchor"]  # noqa: E731
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        spd = SelectiveProjectionDecay(opt)
        anchor = spd.anchor_of
    lpft = LPFT(model, lp_steps=3, head="auto")
    assert lpft.phase == "lp" and not model.body.weight.requires_grad
    phases = train(model, opt, lpft, 2)
    assert phases == ["lp", "lp"]
    assert torch.equal(model.body.weight, body0)  # untouched while frozen
    assert not torch.equal(model.classifier.weight, head0)
    assert model.body.weight not in opt.state or len(opt.state[model.body.weight]) == 0
    phases = train(model, opt, lpft, 3, seed=1)
    assert phases == ["ft", "ft", "ft"] and model.body.weight.requires_grad
    assert not torch.equal(model.body.weight, body0)
    # the anchor is the pre-trained value, captured at the backbone's first real step
    torch.testing.assert_close(anchor(model.body.weight), body0)


def test_keeps_deliberately_frozen_params_frozen_and_resumes():
    model = Net()
    model.body.bias.requires_grad_(False)
    lpft = LPFT(model, lp_steps=2, head=model.classifier)
    lpft.step()
    state = lpft.state_dict()
    lpft.step()
    assert model.body.weight.requires_grad and not model.body.bias.requires_grad

    model2 = Net()
    model2.body.bias.requires_grad_(False)
    lpft2 = LPFT(model2, lp_steps=5, head="classifier")
    lpft2.load_state_dict(state)
    assert lpft2.phase == "lp" and lpft2.steps == 1 and lpft2.lp_steps == 2
    assert lpft2.step() == "ft" and model2.body.weight.requires_grad


def test_zero_steps_and_errors():
    model = Net()
    assert LPFT(model, lp_steps=0).phase == "ft" and model.body.weight.requires_grad
    with pytest.raises(ValueError, match="lp_steps must be an int >= 0, got -1"):
        LPFT(model, lp_steps=-1)
    with pytest.raises(ValueError, match="head=None leaves nothing"):
        LPFT(model, lp_steps=1, head=None)
    with pytest.raises(ValueError, match="head pattern 'head' matches no parameter"):
        LPFT(model, lp_steps=1, head="head")
    model.classifier.requires_grad_(False)
    with pytest.raises(ValueError, match="the head has no trainable parameter"):
        LPFT(model, lp_steps=1)
