"""Costs over every gate of a model: expected L0 and the L0 (+ L2) penalty."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .gates import Gate

__all__ = ["expected_l0", "penalty", "gates"]


def gates(model: nn.Module) -> list[Gate]:
    """Every :class:`Gate` in ``model``, in module order."""
    return [module for module in model.modules() if isinstance(module, Gate)]


def expected_l0(model: nn.Module) -> Tensor:
    """Σ P(z ≠ 0) over every gate of ``model`` (a differentiable scalar)."""
    found = gates(model)
    if not found:
        raise ValueError("model has no l0sparse gates: build it from L0 layers or call l0sparse.sparsify first")
    return torch.stack([gate.expected_l0() for gate in found]).sum()


def penalty(model: nn.Module, lam: float, weight_decay: float = 0.0, N: int = 1) -> Tensor:
    """The L0 (+ L2) penalty of every gated layer of ``model``, divided by ``N``.

    ``lam`` is charged per weight in each gated group (the paper's λ before
    division by the training-set size); pass ``N`` = training-set size to get
    the term that goes beside a mean loss.
    """
    if not (isinstance(N, int) and N >= 1):
        raise ValueError(f"N (the training-set size) must be a positive int, got {N!r}")
    layers = [module for module in model.modules() if hasattr(module, "penalty") and isinstance(getattr(module, "gate", None), Gate)]
    if not layers:
        raise ValueError("model has no gated layers with a penalty: build it from L0 layers or call l0sparse.sparsify first")
    return torch.stack([layer.penalty(lam, weight_decay) for layer in layers]).sum() / N
