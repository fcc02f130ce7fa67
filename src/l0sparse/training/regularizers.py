"""What a training run adds to plain training, one small object per regularizer.

The training loop (:mod:`l0sparse.training.train`) calls each run's regularizer at
fixed points: :meth:`~Regularizer.start` once on a new run,
:meth:`~Regularizer.resume` before a checkpoint's weights load,
:meth:`~Regularizer.before_epoch` at the start of every epoch,
:meth:`~Regularizer.loss` on every step's task loss,
:meth:`~Regularizer.after_step` after every optimizer step and
:meth:`~Regularizer.metrics` at the end of every epoch; its
:meth:`~Regularizer.checkpoint_state` goes into the checkpoint.
:func:`regularizer_for` picks the one a config asks for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.costs import CostModel, Penalty, count_flops, count_params, expected_l0
from ..core.prune import plain_copy
from ..core.sites import find_gates

__all__ = ["Regularizer", "L0", "L0WithTarget", "LkPenalty", "MagnitudePruning", "ImportancePruning", "PrunedSize",
           "regularizer_for"]


class PrunedSize:
    """What prune would leave of ``model`` (gated), as fractions of its dense FLOPs and parameters, counted without pruning."""

    def __init__(self, model: nn.Module, example_inputs) -> None:
        self.cost_model = CostModel(model, example_inputs)
        dense = plain_copy(model)
        self.dense_flops, self.dense_params = count_flops(dense, example_inputs), count_params(dense)

    @torch.no_grad()
    def kept(self) -> dict[str, float]:
        """``flops_kept`` and ``params_kept`` with the deterministic gates (what prune removes)."""
        kept = self.cost_model.costs(deterministic=True)
        return {"flops_kept": float(kept["flops"]) / self.dense_flops, "params_kept": float(kept["params"]) / self.dense_params}

    @torch.no_grad()
    def expected_flops_kept(self) -> float:
        return float(self.cost_model.costs()["flops"]) / self.dense_flops


class Regularizer:
    """Dense training (``regularizer = "none"``): no term, nothing after a step, nothing to record; the base of the others."""

    def total_epochs(self, epochs: int) -> int:
        """How many epochs the run trains for ``epochs`` configured."""
        return epochs

    def start(self) -> str | None:
        """Once, on a new run before its first step; returns a line to show the user, or None."""
        return None

    def resume(self, done_epochs: int) -> None:
        """Before a checkpoint holding ``done_epochs`` loads: give the model the structure those weights need."""

    def before_epoch(self, epoch: int) -> None:
        """At the start of epoch ``epoch`` (counted from 0)."""

    def loss(self, task_loss: Tensor) -> Tensor:
        """The step's objective: ``task_loss`` plus this regularizer's terms."""
        return task_loss

    def after_step(self) -> None:
        """After every optimizer step."""

    def metrics(self) -> dict[str, float]:
        """This regularizer's entries of the epoch's metrics record."""
        return {}

    def progress(self) -> dict[str, str]:
        """What to show beside the task loss while an epoch trains (the bar's or the log line's), by name; called
        every second or so, not every step: it may cost a pass over the gates."""
        return {}

    def shared_values(self) -> dict[str, list[float]]:
        """Values DDP should keep equal on every rank, by name (compared at each epoch's end)."""
        return {}

    def checkpoint_state(self) -> dict:
        """Its entries of the checkpoint (``controller`` is None for every regularizer without one)."""
        return {"controller": None}

    def load_checkpoint_state(self, checkpoint: dict) -> None:
        """Restore from a checkpoint that :meth:`checkpoint_state` wrote into."""


class L0(Regularizer):
    """The paper's L0 penalty at a fixed λ: ``Penalty(model, lam, weight_decay, N)``, then the clamp of log α.

    The clamp is each gate's own setting (``clamp_log_alpha``, ``None`` by default: then no clamp). ``size``
    measures the evaluated model (the moving average, if any) for the per-epoch ``flops_kept`` and friends;
    without it the record holds ``expected_l0`` only.
    """

    def __init__(self, model: nn.Module, lam: float, weight_decay: float, N: int, evaluated: nn.Module | None = None,
                 size: PrunedSize | None = None) -> None:
        self.evaluated = model if evaluated is None else evaluated
        self.size = size
        self.gates = find_gates(model)
        # the L2 under the gates (weight_decay) is in the penalty too, the paper's way
        self.penalty = Penalty(model, lam, weight_decay, N=N) if lam or weight_decay else None

    def loss(self, task_loss: Tensor) -> Tensor:
        return task_loss if self.penalty is None else task_loss + self.penalty()

    def after_step(self) -> None:
        for gate in self.gates:
            gate.clamp_()

    def metrics(self) -> dict[str, float]:
        record = {} if self.size is None else self.size.kept()
        record["expected_l0"] = float(expected_l0(self.evaluated).detach())
        if self.size is not None:
            record["expected_flops_kept"] = self.size.expected_flops_kept()
        return record

    def progress(self) -> dict[str, str]:
        if self.size is None:
            return {"expected_l0": f"{float(expected_l0(self.evaluated).detach()):.1f}"}
        return {"flops_kept": _percent(self.size.kept()["flops_kept"])}


class L0WithTarget(L0):
    """L0 with a :class:`~l0sparse.TargetController`: its multipliers' term and step beside the gates' penalty.

    ``exact``: λ is the controller's, and the penalty holds the weight decay only. ``ceiling``: λ stays the
    configured one and the controller caps the pruned size after its warm-up. ``start_from``: what sets the
    gates before the first step (config key ``gate_start``), returning what it did in a line; None: they stay as built.
    ``settle_step``: from this step on (config key ``settle``) every gate is fixed as prune would keep it (open ones at
    exactly 1, the others at 0, no longer trained) and the controller stops, so the weights train the structure that
    will be kept; None: the gates train to the end.
    """

    def __init__(self, model: nn.Module, controller, lam: float = 0.0, weight_decay: float = 0.0, N: int = 1,
                 evaluated: nn.Module | None = None, size: PrunedSize | None = None,
                 start_from: Callable[[], str] | None = None, settle_step: int | None = None) -> None:
        super().__init__(model, lam if controller.ceiling else 0.0, weight_decay, N, evaluated, size)
        self.controller, self.start_from, self.settle_step = controller, start_from, settle_step
        self._steps = 0  # counted here: reading the controller's step tensor each step would wait for an accelerator

    def start(self) -> str | None:
        return self.start_from() if self.start_from is not None else None

    @property
    def settled(self) -> bool:
        return self.settle_step is not None and self._steps >= self.settle_step

    def loss(self, task_loss: Tensor) -> Tensor:
        return super().loss(task_loss if self.settled else task_loss + self.controller.penalty())

    def after_step(self) -> None:
        super().after_step()
        if self.settled:
            return
        self.controller.step()
        self._steps += 1
        if self.settled:
            self._fix_gates()

    def _fix_gates(self) -> None:
        """Fix every gate as prune keeps it: test-time z > 0 -> exactly 1, else 0; log α no longer trains."""
        from .baselines import FIXED_OPEN, FIXED_SHUT

        with torch.no_grad():
            for gate in self.gates:
                gate.log_alpha.copy_(torch.where(gate.deterministic() > 0, FIXED_OPEN, FIXED_SHUT))
                gate.log_alpha.requires_grad_(False)

    def metrics(self) -> dict[str, float]:
        record = super().metrics()
        record.update({"lambda_1": float(self.controller.lambda_1.detach()), "lambda_2": float(self.controller.lambda_2.detach()),
                       "target_now": self.controller.current_target()})
        return record

    def progress(self) -> dict[str, str]:
        # the controller's own measure (its metric, as pruning would leave the model now) against its target of the moment
        controller = self.controller
        return {f"{controller.metric}_kept": _percent(controller.deterministic_fraction()), "target": _percent(controller.current_target())}

    def shared_values(self) -> dict[str, list[float]]:
        return {"multipliers": [float(self.controller.lambda_1.detach()), float(self.controller.lambda_2.detach())]}

    def checkpoint_state(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_checkpoint_state(self, checkpoint: dict) -> None:
        self.controller.load_state_dict(checkpoint["controller"])
        self._steps = int(self.controller.steps)  # once, at resume
        if self.settled:  # the checkpoint holds the fixed log α; only the freezing is not part of it
            for gate in self.gates:
                gate.log_alpha.requires_grad_(False)


class LkPenalty(Regularizer):
    """A dense run with the L1, group-L1 or L2 penalty (:func:`l0sparse.core.norms.lk_penalty`).

    Its sparsity is recorded on a thresholded copy for L1 and group L1 (the checkpoint keeps the exact weights).
    """

    def __init__(self, model: nn.Module, kind: str, lam: float, N: int, threshold: float) -> None:
        self.model, self.kind, self.lam, self.N, self.threshold = model, kind, lam, N, threshold

    def loss(self, task_loss: Tensor) -> Tensor:
        from ..core.norms import lk_penalty

        return task_loss + lk_penalty(self.model, self.kind, self.lam, N=self.N)

    def metrics(self) -> dict[str, float]:
        from ..core.norms import sparsity, threshold_

        if self.kind == "l2":  # L2 shrinks without zeroing: not thresholded
            return sparsity(self.model)
        return sparsity(threshold_(copy.deepcopy(self.model), self.kind, self.threshold))


class MagnitudePruning(Regularizer):
    """The magnitude baseline: ``epochs`` dense, then the smallest-L1 units removed to ``target`` of the FLOPs, then
    ``epochs`` of fine-tuning with the masks on."""

    def __init__(self, model: nn.Module, target: float, example_inputs: Tensor, epochs: int) -> None:
        self.model, self.target, self.example_inputs, self.epochs = model, target, example_inputs, epochs
        self.flops_kept = 1.0

    def total_epochs(self, epochs: int) -> int:
        return 2 * epochs  # it fine-tunes as long as it trained

    def _prune(self) -> None:
        from .baselines import magnitude_prune

        self.flops_kept = magnitude_prune(self.model, self.target, self.example_inputs)

    def resume(self, done_epochs: int) -> None:
        if done_epochs >= self.epochs:
            self._prune()  # the masks' structure; their values load with the checkpoint

    def before_epoch(self, epoch: int) -> None:
        if epoch == self.epochs:
            self._prune()

    def metrics(self) -> dict[str, float]:
        return {"flops_kept": self.flops_kept}

    def progress(self) -> dict[str, str]:
        return {"flops_kept": _percent(self.flops_kept)}


class ImportancePruning(Regularizer):
    """The importance baseline of a gated encoder: its gates scored once, at the start, on the starting weights, the
    least important shut for good down to ``target`` of the FLOPs; then plain (distilled) training. The checkpoint
    keeps the shut gates.

    ``method`` (config key ``importance``): ``"taylor"``, every gate by the loss gradient of its mask
    (:func:`~l0sparse.training.baselines.taylor_importance`), all of them ranked in one pool by score per MAC
    (:func:`~l0sparse.training.baselines.cost_ranked_prune_`); ``"heads-magnitude-units"``, heads by that gradient and
    units by weight norm, each kind ranked on its own and kept in one common fraction
    (:func:`~l0sparse.training.baselines.gate_importance`, :func:`~l0sparse.training.baselines.importance_prune_`; issue #12's).
    """

    def __init__(self, model: nn.Module, target: float, example_inputs: Tensor, size: PrunedSize,
                 scoring_batches: Callable[[], list], loss_fn: Callable[[Tensor, Tensor], Tensor],
                 method: str = "taylor", structure_from: str | None = None) -> None:
        from .config import IMPORTANCE_CHOICES

        if method not in IMPORTANCE_CHOICES:
            raise ValueError(f"method must be one of {IMPORTANCE_CHOICES}, got {method!r}")
        self.model, self.target, self.example_inputs, self.size = model, target, example_inputs, size
        self.scoring_batches, self.loss_fn, self.method, self.structure_from = scoring_batches, loss_fn, method, structure_from

    def start(self) -> str:
        from . import baselines

        if self.structure_from is not None:  # another run's open gates in place of a ranking
            from .runs import load_run

            baselines.keep_open_as_(self.model, load_run(self.structure_from)[1])
            kept = self.size.kept()["flops_kept"]
            return f"the structure of {self.structure_from} (its open gates) keeps {100 * kept:.1f}% of the FLOPs"
        score, prune = {"taylor": (baselines.taylor_importance, baselines.cost_ranked_prune_),
                        "heads-magnitude-units": (baselines.gate_importance, baselines.importance_prune_)}[self.method]
        kept = prune(self.model, self.target, self.example_inputs, score(self.model, self.scoring_batches(), self.loss_fn))
        return f"importance pruning ({self.method}) keeps {100 * kept:.1f}% of the FLOPs (target {100 * self.target:.1f}%)"

    def metrics(self) -> dict[str, float]:
        return self.size.kept()

    def progress(self) -> dict[str, str]:
        return {"flops_kept": _percent(self.size.kept()["flops_kept"])}


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def regularizer_for(config, model: nn.Module, evaluated: nn.Module, example_inputs: Tensor, n_train: int, steps_per_epoch: int,
                    scoring_batches: Callable[[], list], loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Regularizer:
    """The regularizer ``config`` names, for ``model`` trained on ``n_train`` examples in ``steps_per_epoch`` steps an epoch.

    ``evaluated``: the model that is measured (the moving average, or ``model``); ``scoring_batches``: the
    ``(inputs, targets)`` batches the importance baseline ranks its gates on, made only when it needs them.
    """
    kind = config.regularizer
    if kind == "l0":
        size = PrunedSize(evaluated, example_inputs)
        if config.target is None:
            return L0(model, config.lam, config.weight_decay, n_train, evaluated, size)
        from ..core.control import TargetController

        steps = config.epochs * steps_per_epoch
        controller = TargetController(model, config.target, config.metric, example_inputs=example_inputs,
                                      warmup_steps=int(config.warmup * steps), delay_steps=int(config.delay * steps),
                                      lr=config.controller_lr, ceiling=config.target_mode == "ceiling", landing=config.landing)
        start_from = None
        if config.gate_start == "taylor":
            def start_from() -> str:
                from . import baselines

                scores = baselines.taylor_importance(model, scoring_batches(), loss_fn)
                kept = baselines.taylor_start_(model, config.target, example_inputs, scores)
                return f"the gates start from the importance baseline's choice: {100 * kept:.1f}% of the FLOPs open"
        settle_step = round((1 - config.settle) * steps) if config.settle else None
        return L0WithTarget(model, controller, config.lam, config.weight_decay, n_train, evaluated, size, start_from, settle_step)
    if kind in ("l1", "group_l1", "l2"):
        return LkPenalty(model, kind, config.lam, n_train, config.threshold_value)
    if kind == "magnitude":
        return MagnitudePruning(model, config.target, example_inputs, config.epochs)
    if kind == "importance":
        return ImportancePruning(model, config.target, example_inputs, PrunedSize(evaluated, example_inputs), scoring_batches, loss_fn,
                                 config.importance, config.structure_from)
    return Regularizer()
