"""LP-FT: linear probing, then full fine-tuning (Kumar et al., 2022).

Train only the task head for ``lp_steps`` optimizer steps (the backbone is frozen, so its
features are not distorted by a random head's large early gradients), then unfreeze
everything that was trainable before and fine-tune it all. Works with any optimizer built
over all parameters: frozen parameters get no gradient, so torch optimizers, AdamSPD and the
SPD add-on skip them (no state, and SPD anchors are captured at their first real step, i.e.
the pre-trained values).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from spdecay.param_groups import HeadSpec, resolve_head

__all__ = ["LPFT"]


class LPFT:
    """Freeze all but the head for ``lp_steps`` steps, then unfreeze.

    The backbone is frozen as soon as the object is built (unless ``lp_steps`` is 0). Only the
    backbone parameters that are trainable then are frozen and later unfrozen: parameters frozen
    on purpose (PEFT base weights) stay frozen.

    Args:
        model: the model; its head is found by ``head``.
        lp_steps: number of optimizer steps that train the head alone (>= 0).
        head: the task head, as for [`param_groups`][spdecay.param_groups]: ``"auto"`` (a top-level
            module named like a classifier), name pattern(s) or module(s).

    Raises:
        ValueError: ``lp_steps`` is not an int >= 0; ``head`` matches nothing, is None, or has
            no trainable parameter.

    Example:
        ```python
        opt = AdamSPD(param_groups(model), lr=1e-4)   # over all parameters, built once
        lpft = LPFT(model, lp_steps=500, head="auto")  # freezes the backbone now
        for batch in loader:
            loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
            lpft.step()  # counts optimizer steps; unfreezes after lp_steps of them
        ```

    Call [`step`][spdecay.LPFT.step] once per optimizer step. ``state_dict`` /
    ``load_state_dict`` resume the phase. Use ``zero_grad(set_to_none=True)`` (torch's default)
    so frozen parameters have no stale gradients. The optimizer creates no state for frozen
    parameters (they get no gradient), so SPD anchors are captured at their first real step: the
    pre-trained values.
    """

    def __init__(self, model: nn.Module, lp_steps: int, head: HeadSpec = "auto") -> None:
        if isinstance(lp_steps, bool) or not isinstance(lp_steps, int) or lp_steps < 0:
            raise ValueError(f"lp_steps must be an int >= 0, got {lp_steps!r}")
        head_names = resolve_head(model, head)
        if not head_names:
            raise ValueError("LPFT needs a task head (head=None leaves nothing to train)")
        named = dict(model.named_parameters())
        if not any(named[n].requires_grad for n in head_names):
            raise ValueError("LPFT: the head has no trainable parameter")
        self.model = model
        self.lp_steps = lp_steps
        self.steps = 0
        # Only the backbone parameters that are trainable now are frozen (and later unfrozen):
        # parameters frozen on purpose (e.g. PEFT base weights) stay frozen.
        self._backbone = [p for n, p in named.items() if n not in head_names and p.requires_grad]
        self._frozen = False
        if lp_steps > 0:
            self._set_frozen(True)

    @property
    def phase(self) -> str:
        """``"lp"`` while the backbone is frozen, ``"ft"`` after."""
        return "lp" if self._frozen else "ft"

    def _set_frozen(self, frozen: bool) -> None:
        for p in self._backbone:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None
        self._frozen = frozen

    def step(self) -> str:
        """Count one optimizer step; unfreeze the backbone once ``lp_steps`` are done.

        Returns:
            The phase after this step: ``"lp"`` or ``"ft"``.
        """
        self.steps += 1
        if self._frozen and self.steps >= self.lp_steps:
            self._set_frozen(False)
        return self.phase

    def state_dict(self) -> dict[str, Any]:
        """The phase, for checkpoints.

        Returns:
            ``{"steps": steps counted so far, "lp_steps": the linear-probing length}``.
        """
        return {"steps": self.steps, "lp_steps": self.lp_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the phase: restore the counts and freeze or unfreeze the backbone to match.

        Args:
            state: a dict from [`state_dict`][spdecay.LPFT.state_dict].
        """
        self.steps = int(state["steps"])
        self.lp_steps = int(state["lp_steps"])
        self._set_frozen(self.steps < self.lp_steps)
