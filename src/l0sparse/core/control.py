"""Reach a size the user names: a Lagrangian controller over the pruned size.

The penalty is λ1·(ŝ − t) + λ2·(ŝ − t)² (Wang et al. 2020; CoFi, Xia et al.
2022), where ŝ is the size as a fraction of the dense model (parameters,
FLOPs, or open gates) and t the target; the target stays at the starting
size for ``delay_steps``, then moves linearly to ``target`` over
``warmup_steps``. Three things keep it from
overshooting (closed gates rarely reopen, so an overshoot is paid in accuracy):

- it pushes only while the size that pruning would leave now (the test-time
  gates) is above the target: once the pruned model is small enough the
  penalty is zero and the loss alone moves the gates;
- the multipliers follow the pruned size's gap in both directions (they fall
  while the model is below the target, never below 0) instead of
  integrating the gradient of a penalty that stopped: the integral windup
  that kept closing gates long after the target was reached;
- ``step()`` keeps the pruned size on the schedule, ``t ± tolerance`` at
  every step, closing or reopening only the gates nearest the threshold: the
  model shrinks gradually whatever the gates' learning rate (with
  ``landing="target"`` it closes gates only once the schedule is at the
  target, for gates fast enough to follow the penalty).

docs/control.md has the measurements behind these choices.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .costs import CostModel, expected_l0
from .graph import check_module
from .sites import find_gates

if TYPE_CHECKING:
    from .gates import Gate

__all__ = ["TargetController", "METRICS", "LANDINGS", "param_groups"]

METRICS = ("params", "flops", "l0")
# when step() closes gates: on the schedule at every step, or only once the schedule has reached the target
LANDINGS = ("schedule", "target")


class TargetController(nn.Module):
    """Lagrangian multipliers that steer the pruned size of ``model`` to ``target``, and land it there.

    :meth:`penalty` pushes the gates (through the model's optimizer) while the
    size that pruning would leave is above the current target, and is zero
    once it is not; :meth:`step` moves the multipliers and, when the pruned
    size has left the band around the current target (above or below it,
    at any step of the warm-up or after it), closes the open gates of lowest
    log α (or reopens the closed gates of highest log α) to bring it back. The size lands in the band whatever the gates' learning rate;
    ``snap_to_target`` is not needed (docs/control.md).

    Args:
        model: a gated model (paper layers or :func:`l0sparse.sparsify`).
        target: the fraction of the dense size to keep, in (0, 1].
        metric: ``"params"``, ``"flops"`` (both need ``example_inputs``, to
            trace the model once) or ``"l0"`` (the fraction of open gates).
        example_inputs: a batch, for the cost model.
        warmup_steps: steps over which the target moves linearly from the
            starting size to ``target`` (0: the target applies at once).
        delay_steps: steps before the warm-up starts, during which the target
            stays at the starting size: no gate is closed and nothing pushes,
            while the weights train and the loss alone ranks the gates. The
            target is reached at ``delay_steps + warmup_steps``. Closing
            units from the first step chooses them on a network that has not
            learned yet (docs/control.md measures a delay of a fifth of the
            run against none).
        lr: learning rate of the multipliers' optimizer (Adam, maximising).
        tolerance: half-width of the band around the target that :meth:`step`
            keeps the pruned size in (a fraction of the dense size). When no
            choice of gates reaches the band (a unit is worth more than it),
            the size stays at the nearest one reached, and there the penalty
            stops pushing and the multipliers stop growing (a warning says so,
            once).
        ceiling: treat ``target`` as a budget for a model trained with a fixed
            λ (:class:`l0sparse.Penalty`): the controller does nothing during
            the warm-up, then keeps the pruned size at or under ``target +
            tolerance`` (it pushes and lands only from above, never reopens
            gates, and where units are coarse lands on the largest size it
            finds under that, not on a nearer one above it).
            λ chooses the model while it fits the budget; a schedule from
            the start would push while test-time gates are all still open
            and hold every gate low (docs/control.md).
        landing: when :meth:`step` closes gates to bring the pruned size down.
            ``"schedule"`` (the default): at every step, so the pruned size
            follows the schedule whatever the gates' learning rate.
            ``"target"``: only once the schedule has reached ``target``;
            during the warm-up the penalty alone shrinks the model, and
            gates are only reopened (when the size falls below the band).
            The gates then close in the order the loss and the penalty give
            them, not at the pace of the schedule (docs/hf.md measures both
            on a pretrained transformer).

    Use::

        controller = TargetController(model, 0.25, "flops", example_inputs=x, delay_steps=1000, warmup_steps=1000)
        loss = criterion(model(x), y) + controller.penalty()
        loss.backward(); optimizer.step(); controller.step()
    """

    def __init__(self, model: nn.Module, target: float, metric: str = "params", example_inputs=None,
                 warmup_steps: int = 0, lr: float = 0.01, tolerance: float = 0.005, ceiling: bool = False,
                 delay_steps: int = 0, landing: str = "schedule") -> None:
        super().__init__()
        check_module(model, "TargetController")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0 < target <= 1) or math.isnan(target):
            raise ValueError(f"target must be a fraction in (0, 1], got {target!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if metric in ("params", "flops") and example_inputs is None:
            raise ValueError(f"metric={metric!r} needs example_inputs: a batch to trace the model's layer sizes with")
        for name, value in (("warmup_steps", warmup_steps), ("delay_steps", delay_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")  # lr=inf closed every gate at the first step
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (0 <= tolerance < 1):
            raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
        if not isinstance(ceiling, bool):
            raise ValueError(f"ceiling must be True or False, got {ceiling!r}")
        if landing not in LANDINGS:
            raise ValueError(f"landing must be one of {LANDINGS}, got {landing!r}")
        if not find_gates(model):
            raise ValueError("model has no l0sparse gates: build it from L0 layers or call l0sparse.sparsify first")
        device = find_gates(model)[0].log_alpha.device
        if device.type == "meta":
            raise ValueError("TargetController reads the model's size at every step, and the model is on the meta device, "
                             "which holds no values: build it on the device the model trains on")
        self.target, self.metric, self.warmup_steps, self.tolerance = float(target), metric, warmup_steps, float(tolerance)
        self.delay_steps = delay_steps
        self.ceiling, self.landing = ceiling, landing
        self._warned_unreachable = False  # the warning that the band is out of reach is given once
        self.landings = 0  # how often step() had to shift the gates back into the band (a diagnostic)
        self._model = [model]  # a list, so that the model is not registered as a submodule (state_dict stays small)
        self._gates = find_gates(model)
        self._fraction_cache: tuple[tuple[int, ...], float] | None = None  # (log α versions, pruned fraction)
        if metric == "l0":
            self._cost_model = None
            self._dense = float(sum(g.log_alpha.numel() for g in find_gates(model)))
        else:
            self._cost_model = CostModel(model, example_inputs)
            self._dense = self._size_with_every_gate(open_=True)
            floor = self._size_with_every_gate(open_=False) / self._dense
            if floor > target:
                raise ValueError(
                    f"target={target:g} is below the smallest {metric} fraction this model can be pruned to, {floor:.4f}: "
                    "what no gate removes (ungated layers, locked channels, the unit each layer keeps) is that large; "
                    f"choose target >= {floor:.4f} or gate more of the model")
        # on the gates' device, so that the penalty and the multipliers' steps never cross devices
        self.lambda_1 = nn.Parameter(torch.zeros((), device=device))
        self.lambda_2 = nn.Parameter(torch.zeros((), device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        # how far the last landing had to stay from its target (one unit worth more than the band): the band
        # widens to it; a buffer, so that a resumed run lands exactly as the uninterrupted one
        self.register_buffer("residual", torch.zeros((), device=device))
        # the schedule starts from the size pruning would leave now, the size the landing and the penalty's gap read
        self.register_buffer("start", torch.tensor(self.deterministic_fraction(), device=device))
        self.optimizer = torch.optim.Adam([self.lambda_1, self.lambda_2], lr=lr, maximize=True)

    def _size_with_every_gate(self, open_: bool) -> float:
        """The pruned size with every gate open (the dense size under this cost model) or every gate closed (the floor)."""
        with torch.no_grad():
            saved = [g.log_alpha.detach().clone() for g in find_gates(self._model[0])]
            for g in find_gates(self._model[0]):
                g.log_alpha.fill_(100.0 if open_ else -100.0)
            size = float(self._cost_model.costs(deterministic=True)[self.metric])
            for g, value in zip(find_gates(self._model[0]), saved):
                g.log_alpha.copy_(value)
        return size

    def expected_fraction(self) -> Tensor:
        """ŝ: the expected size over the dense size (differentiable in the gates)."""
        if self._cost_model is None:
            return expected_l0(self._model[0]) / self._dense
        return self._cost_model.costs()[self.metric] / self._dense

    @torch.no_grad()
    def deterministic_fraction(self) -> float:
        """The size that pruning would leave now (test-time gates), over the dense size.

        Counted once per state of the gates: the count is kept with the version counters of every log α (which
        each in-place write advances: the optimizer's step, a clamp, a landing, a loaded checkpoint), so the
        training step's two reads, :meth:`step`'s after the optimizer and the next :meth:`penalty`'s, cost one
        count (a pass over the cost model, and on an accelerator a wait for the device).
        """
        versions = tuple(g.log_alpha._version for g in self._gates)
        if self._fraction_cache is not None and self._fraction_cache[0] == versions:
            return self._fraction_cache[1]
        if self._cost_model is None:
            fraction = float(sum(int(g.is_open().sum()) for g in self._gates)) / self._dense
        else:
            fraction = float(self._cost_model.costs(deterministic=True)[self.metric]) / self._dense
        self._fraction_cache = (versions, fraction)
        return fraction

    def current_target(self) -> float:
        """t at this step: the starting size during the delay, then linear to ``target`` over the warm-up (a ceiling:
        1 until both have passed, then ``target``)."""
        steps = int(self.steps)
        if self.ceiling:
            return 1.0 if steps < self.delay_steps + self.warmup_steps else self.target
        if steps < self.delay_steps:
            return float(self.start)
        if self.warmup_steps == 0:
            return self.target
        progress = min(1.0, (steps - self.delay_steps) / self.warmup_steps)
        return float(self.start) + progress * (self.target - float(self.start))

    def penalty(self) -> Tensor:
        """λ1·(ŝ − t) + λ2·(ŝ − t)² while the pruned size is above the target, else 0: add it to the loss.

        ŝ takes its value from the size that pruning would leave now (the
        test-time gates) and its gradient from the expected size: the
        expected size alone settled 1.5–2 points away from the pruned one on
        the digits MLP, because Eq. 13 rounds P(z ≠ 0) differently. The gap
        is recorded for :meth:`step`, which moves the multipliers.
        """
        expected = self.expected_fraction()
        pruned = self.deterministic_fraction()
        gap_value = pruned - self.current_target()
        self._last_gap = gap_value
        if gap_value <= 0 or self._at_nearest_reachable(gap_value):
            return expected * 0.0  # small enough: the loss alone moves the gates (a graph, so backward still works)
        gap = expected + (gap_value - expected.detach())  # value: the pruned gap; gradient: the expected size's
        return self.lambda_1.detach().clamp(min=0) * gap + self.lambda_2.detach().clamp(min=0) * gap * gap

    def step(self) -> None:
        """After the model optimizer's step: land the pruned size back in the band if it left it, move the
        multipliers by the last :meth:`penalty`'s gap, and advance the target schedule.

        Ascent on λ1·gap + λ2·gap·|gap| with the controller's Adam: both grow while the pruned model is too
        large and shrink while it is smaller than the target, and are kept ≥ 0.
        """
        gap = getattr(self, "_last_gap", None)
        self._land()
        if gap is not None and self._at_nearest_reachable(self.deterministic_fraction() - self.current_target()):
            gap = 0.0  # no cut reaches the band and the size is at the nearest one: integrating the gap would wind up
            if not self._warned_unreachable:
                self._warned_unreachable = True
                warnings.warn(
                    f"TargetController: no choice of gates brings the pruned {self.metric} within {self.tolerance:g} of "
                    f"target={self.target:g}; the nearest size reached is {self.deterministic_fraction():.4f}. The controller "
                    "holds it there: the penalty stops pushing and the multipliers stop growing (docs/control.md)",
                    stacklevel=2)
        if gap is not None:
            self.lambda_1.grad = torch.tensor(gap, dtype=self.lambda_1.dtype, device=self.lambda_1.device)
            self.lambda_2.grad = torch.tensor(gap * abs(gap), dtype=self.lambda_2.dtype, device=self.lambda_2.device)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                self.lambda_1.clamp_(min=0)
                self.lambda_2.clamp_(min=0)
            self._last_gap = None
        self.steps += 1

    def _at_nearest_reachable(self, gap: float) -> bool:
        """Whether the schedule is at the target, no cut reached its band (the band widened to the nearest size a
        landing reached) and the pruned size is within that widened band: as near the target as the units allow."""
        if int(self.steps) < self.delay_steps + self.warmup_steps or self.ceiling:
            return False
        residual = float(self.residual)
        return residual > self.tolerance and abs(gap) <= residual

    @torch.no_grad()
    def _land(self) -> None:
        """Close (or reopen) the gates nearest the threshold when the pruned size has left the band around the target.

        Below the current target's band (the gates' momentum carried them past it, or the loss closed
        them) or above it (the gates' learning rate is too small to follow the schedule: at 1e-3 a gate
        needs thousands of steps to close on its own), at any step: the open gates of lowest log α are
        closed (or the closed gates of highest log α reopened) until the pruned size is nearest the
        target of this step, so the model shrinks along the schedule instead of all at once at its end. Only the gates that
        cross move, so the kept units keep their test-time gate values (a common shift of every log α
        shrank them towards 0 and collapsed a digits MLP to 17% accuracy). A closed gate goes to
        threshold − 2 (P(z ≠ 0) = 0.06, so training sees it as closed too), a reopened one to
        threshold + 1. When no cut hits the band (the unit next to it is worth more than the band),
        :meth:`_step_past_large_units` moves the units behind that one instead. Costs one size count per
        step (shared with the next :meth:`penalty`), and a bisection only on the steps that need it.
        """
        fraction = self.deterministic_fraction()
        target = self.current_target()
        scheduled = int(self.steps) >= self.delay_steps + self.warmup_steps  # the target itself, not a point on the way
        if not self._left_the_band(fraction, target, scheduled):
            return
        gates = _LandingGates(find_gates(self._model[0]), growing=fraction < target)
        best, low, high = self._bisect(gates, fraction, target)
        if best[1] > self.tolerance and scheduled:
            # no cut hits the band: one unit next to it is worth more than the band. Step past it from the cut on
            # the near side of the target (above it when shrinking, below when growing), unit by unit. Only at
            # the target itself: on the way there the next steps' cuts take the large unit in its log α order.
            near = high if gates.growing else low
            gates.apply_cut(near)
            error = self._step_past_large_units(gates.gates, gates.originals, gates.thresholds, near, gates.growing, target)
            if error < best[1] and self._allowed(self.deterministic_fraction(), target):
                best = (math.nan, error)  # keep the state just reached
        if best[0] is None:
            gates.restore()
        elif not math.isnan(best[0]):
            gates.apply_cut(best[0])
        self.residual.fill_(best[1] * (1 + 1e-6))
        self.landings += 1

    def _left_the_band(self, fraction: float, target: float, scheduled: bool) -> bool:
        """Whether :meth:`_land` moves gates at this step: the pruned size ``fraction`` is outside the band around
        ``target``, and neither a ceiling nor ``landing = "target"`` leaves it to the penalty. Zeroes the residual where
        the schedule has just reached the target, and where the size is within the tolerance of it."""
        if int(self.steps) == self.delay_steps + self.warmup_steps:
            self.residual.zero_()  # the schedule just reached the target: land on it within the tolerance
        # a band no choice of gates can hit (one unit is worth more than it) widens to what the last landing reached
        band = max(self.tolerance, float(self.residual))
        if self.ceiling and fraction <= target + self.tolerance:
            return False  # a budget, not a size to reach: below it λ alone decides (and it never widens upwards)
        if self.landing == "target" and not scheduled and fraction > target + band:
            return False  # on the way to the target only the penalty closes gates
        if target - band <= fraction <= target + band:
            if abs(fraction - target) <= self.tolerance:
                self.residual.zero_()
            return False
        return True

    def _bisect(self, gates: _LandingGates, fraction: float, target: float) -> tuple[tuple[float | None, float], float, float]:
        """((the cut whose size is nearest ``target``, or None where none beats ``fraction``; its distance), low, high):
        thirty halvings of the log α range, the last ``low`` and ``high`` bracketing the target."""
        low = min(float(o.min()) for o in gates.originals) - 1.0
        high = max(float(o.max()) for o in gates.originals) + 1.0
        best = (None, abs(fraction - target) if self._allowed(fraction, target) else math.inf)
        for _ in range(30):  # the size falls as the cut rises, whichever way the gates cross
            cut = (low + high) / 2
            reached = self._size_at(gates, cut)
            if abs(reached - target) < best[1] and self._allowed(reached, target):
                best = (cut, abs(reached - target))
            low, high = (cut, high) if reached > target else (low, cut)
        if best[0] is None and not self._allowed(fraction, target):
            best = (high, abs(self._size_at(gates, high) - target))  # every open gate below the last cut under the target closes
        return best, low, high

    def _size_at(self, gates: _LandingGates, cut: float) -> float:
        """The pruned size with the gates moved by ``cut``."""
        gates.apply_cut(cut)
        return self.deterministic_fraction()

    def _allowed(self, size: float, target: float) -> bool:
        """Whether a landing may end at ``size``: a ceiling takes only sizes at or under target + tolerance, however near
        a larger one is."""
        return not self.ceiling or size <= target + self.tolerance

    def _step_past_large_units(self, all_gates, originals, thresholds, cut: float, growing: bool, target: float,
                               trials: int = 64) -> float:
        """From the gates as the cut left them (the pruned size on the near side of the target), close (or
        reopen) the next units in log α order one at a time, skipping any that would carry the size past the
        band, until it is in the band or ``trials`` units were tried. Returns the distance to the target."""
        candidates = []
        for index, (original, threshold) in enumerate(zip(originals, thresholds)):
            flat = original.flatten()
            free = (flat < cut) & (flat <= threshold) if growing else (flat >= cut) & (flat > threshold)
            candidates += [(float(flat[i]), index, int(i)) for i in free.nonzero().flatten()]
        # reopen the highest closed gates first, close the lowest open ones first: the order the cut would take
        candidates.sort(reverse=growing)
        reached = self.deterministic_fraction()
        under_ceiling = None  # a ceiling: the largest size at or under the band that a unit passing the band left
        for _, index, position in candidates[:trials]:
            if abs(reached - target) <= self.tolerance:
                break
            values = all_gates[index].log_alpha.detach().view(-1)  # not .data: writes must advance the version counter
            previous = float(values[position])
            values[position] = thresholds[index] + 1.0 if growing else thresholds[index] - 2.0
            size = self.deterministic_fraction()
            if (size > target + self.tolerance) if growing else (size < target - self.tolerance):
                if self.ceiling and (under_ceiling is None or size > under_ceiling[0]):
                    under_ceiling = (size, [g.log_alpha.detach().clone() for g in all_gates])
                values[position] = previous  # this unit alone passes the band: leave it, try the next
            else:
                reached = size
        if under_ceiling is not None and reached > target + self.tolerance:  # over the budget: take the nearest under it
            for gate, value in zip(all_gates, under_ceiling[1]):
                gate.log_alpha.copy_(value)
            reached = under_ceiling[0]
        return abs(reached - target)

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
        all_gates = find_gates(self._model[0])
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
        state_dict.setdefault("residual", torch.zeros_like(self.residual))  # saved before the band's residual was kept
        result = super().load_state_dict(state_dict, strict=strict)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        return result

    def extra_repr(self) -> str:
        return (f"target={self.target:g}, metric={self.metric!r}, warmup_steps={self.warmup_steps}"
                + (f", delay_steps={self.delay_steps}" if self.delay_steps else "") + (", ceiling=True" if self.ceiling else "")
                + (f", landing={self.landing!r}" if self.landing != "schedule" else ""))


class _LandingGates:
    """The gates of one landing as it found them, and what a cut does to them: where the size grows, the closed gates
    at or above the cut reopen (to threshold + 1); where it shrinks, the open gates below it close (to threshold − 2)."""

    def __init__(self, gates: list[Gate], growing: bool) -> None:
        self.gates, self.growing = gates, growing
        self.originals = [g.log_alpha.detach().clone() for g in gates]
        self.thresholds = [math.log(-g.gamma / g.zeta) for g in gates]  # Eq. 13 opens a gate above log(−γ/ζ)

    def apply_cut(self, cut: float) -> None:
        for gate, original, threshold in zip(self.gates, self.originals, self.thresholds):
            if self.growing:  # reopen the closed gates at or above the cut
                crossing = (original >= cut) & (original <= threshold)
                gate.log_alpha.copy_(torch.where(crossing, torch.full_like(original, threshold + 1.0), original))
            else:  # close the open gates below the cut
                crossing = (original < cut) & (original > threshold)
                gate.log_alpha.copy_(torch.where(crossing, torch.full_like(original, threshold - 2.0), original))

    def restore(self) -> None:
        for gate, original in zip(self.gates, self.originals):
            gate.log_alpha.copy_(original)


def param_groups(model: nn.Module, lr: float, gate_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: the gates' log α at ``gate_lr`` (default: ``lr``), everything else at ``lr``.

    ``weight_decay`` goes to the non-gate parameters only (decaying log α would pull every gate towards
    P(z ≠ 0) = 0.83). Use: ``torch.optim.Adam(l0sparse.param_groups(model, lr=1e-3, gate_lr=1e-2))``.
    """
    for name, value in (("lr", lr), ("gate_lr", lr if gate_lr is None else gate_lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name != "weight_decay" and value == 0):
            raise ValueError(f"{name} must be a finite number {'>= 0' if name == 'weight_decay' else '> 0'}, got {value!r}")
    gate_parameters = [g.log_alpha for g in find_gates(model)]
    gate_ids = {id(p) for p in gate_parameters}
    others = [p for p in dict.fromkeys(model.parameters()) if id(p) not in gate_ids]
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    if gate_parameters:
        groups.append({"params": gate_parameters, "lr": lr if gate_lr is None else gate_lr, "weight_decay": 0.0})
    return groups
