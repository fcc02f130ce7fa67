"""Reach a size the user names: a Lagrangian controller over the expected size.

The penalty is λ1·(ŝ − t) + λ2·(ŝ − t)² (Wang et al. 2020; CoFi, Xia et al.
2022), where ŝ is the expected size as a fraction of the dense model
(parameters, FLOPs, or open gates) and t the target. The model's optimizer
minimises it with the loss; the controller's own optimizer moves λ1 and λ2
by gradient *ascent*, so the multipliers grow while the model is too large
(or too small) and the constraint ŝ = t is enforced without tuning λ. The
target moves linearly from the starting size to ``target`` over
``warmup_steps``, so the network is not pruned all at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .costs import CostModel, expected_l0, gates

__all__ = ["TargetController", "METRICS"]

METRICS = ("params", "flops", "l0")


class TargetController(nn.Module):
    """Lagrangian multipliers that steer the expected size of ``model`` to ``target``.

    Args:
        model: a gated model (paper layers or :func:`l0sparse.sparsify`).
        target: the fraction of the dense size to keep, in (0, 1].
        metric: ``"params"``, ``"flops"`` (both need ``example_inputs``, to
            trace the model once) or ``"l0"`` (the fraction of open gates).
        example_inputs: a batch, for the cost model.
        warmup_steps: steps over which the target moves linearly from the
            starting size to ``target`` (0: the target applies at once).
        lr: learning rate of the multipliers' optimizer (Adam, maximising).

    Use::

        controller = TargetController(model, 0.25, "flops", example_inputs=x, warmup_steps=1000)
        loss = criterion(model(x), y) + controller.penalty()
        loss.backward(); optimizer.step(); controller.step()
    """

    def __init__(self, model: nn.Module, target: float, metric: str = "params", example_inputs=None,
                 warmup_steps: int = 0, lr: float = 0.01) -> None:
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0 < target <= 1) or math.isnan(target):
            raise ValueError(f"target must be a fraction in (0, 1], got {target!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if metric in ("params", "flops") and example_inputs is None:
            raise ValueError(f"metric={metric!r} needs example_inputs: a batch to trace the model's layer sizes with")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not gates(model):
            raise ValueError("model has no l0sparse gates: build it from L0 layers or call l0sparse.sparsify first")
        self.target, self.metric, self.warmup_steps = float(target), metric, warmup_steps
        self._model = [model]  # a list, so that the model is not registered as a submodule (state_dict stays small)
        if metric == "l0":
            self._cost_model = None
            self._dense = float(sum(g.log_alpha.numel() for g in gates(model)))
        else:
            self._cost_model = CostModel(model, example_inputs)
            self._dense = self._dense_size()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("start", torch.tensor(float(self.expected_fraction().detach())))
        self.optimizer = torch.optim.Adam([self.lambda_1, self.lambda_2], lr=lr, maximize=True)

    def _dense_size(self) -> float:
        with torch.no_grad():
            saved = [g.log_alpha.detach().clone() for g in gates(self._model[0])]
            for g in gates(self._model[0]):
                g.log_alpha.fill_(100.0)  # every gate open: the dense size under the same cost model
            dense = float(self._cost_model.costs(deterministic=True)[self.metric])
            for g, value in zip(gates(self._model[0]), saved):
                g.log_alpha.copy_(value)
        return dense

    def expected_fraction(self) -> Tensor:
        """ŝ: the expected size over the dense size (differentiable in the gates)."""
        if self._cost_model is None:
            return expected_l0(self._model[0]) / self._dense
        return self._cost_model.costs()[self.metric] / self._dense

    @torch.no_grad()
    def deterministic_fraction(self) -> float:
        """The size that pruning would leave now (test-time gates), over the dense size."""
        if self._cost_model is None:
            return float(sum(int(g.is_active().sum()) for g in gates(self._model[0]))) / self._dense
        return float(self._cost_model.costs(deterministic=True)[self.metric]) / self._dense

    def current_target(self) -> float:
        """t at this step: linear from the starting size to ``target`` over the warm-up."""
        if self.warmup_steps == 0:
            return self.target
        progress = min(1.0, float(self.steps) / self.warmup_steps)
        return float(self.start) + progress * (self.target - float(self.start))

    def penalty(self) -> Tensor:
        """λ1·(ŝ − t) + λ2·(ŝ − t)²: add it to the loss before ``backward``.

        ŝ takes its value from the size that pruning would leave now (the
        test-time gates) and its gradient from the expected size: the
        expected size alone settled 1.5–2 points away from the pruned one on
        the digits MLP, because Eq. 13 rounds P(z ≠ 0) differently.
        """
        expected = self.expected_fraction()
        size = expected + (self.deterministic_fraction() - expected).detach()
        gap = size - self.current_target()
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    def step(self) -> None:
        """Ascend the multipliers (after the model optimizer's step) and advance the target schedule."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    @torch.no_grad()
    def snap_to_target(self, tolerance: float = 0.005) -> float:
        """Open or close the gates nearest the threshold so that the pruned size is as close to ``target`` as it gets.

        Training ends with the pruned size a little off the target (closed
        gates rarely reopen, so a fast controller overshoots). This moves one
        global threshold τ over log α: every gate with log α ≥ τ is made open
        at test time (log α raised to just above Eq. 13's threshold, or left
        as it was) and every other gate closed; τ is found by bisection.
        Returns the pruned fraction reached. Fine-tune afterwards if the
        change was large.
        """
        all_gates = gates(self._model[0])
        originals = [g.log_alpha.detach().clone() for g in all_gates]
        # Eq. 13 opens a gate when sigmoid(log α)(ζ − γ) + γ > 0
        thresholds = [math.log(-g.gamma / g.zeta) for g in all_gates]

        def apply(tau: float) -> float:
            for gate, original, threshold in zip(all_gates, originals, thresholds):
                opened = original >= tau
                gate.log_alpha.copy_(torch.where(opened, original.clamp(min=threshold + 1e-3), original.clamp(max=threshold - 1e-3)))
            return self.deterministic_fraction()

        low = min(float(o.min()) for o in originals) - 1.0
        high = max(float(o.max()) for o in originals) + 1.0
        best_tau, best_error = None, math.inf
        for _ in range(40):
            tau = (low + high) / 2
            fraction = apply(tau)
            if abs(fraction - self.target) < best_error:
                best_tau, best_error = tau, abs(fraction - self.target)
            if abs(fraction - self.target) <= tolerance:
                break
            low, high = (tau, high) if fraction > self.target else (low, tau)
        return apply(best_tau)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        state_dict = dict(state_dict)
        optimizer_state = state_dict.pop("optimizer", None)
        result = super().load_state_dict(state_dict, strict=strict)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        return result

    def extra_repr(self) -> str:
        return f"target={self.target:g}, metric={self.metric!r}, warmup_steps={self.warmup_steps}"
