"""The L_k family: norms, and the L1 / group-L1 / L2 penalties that L0 is measured against.

‖x‖_q = (Σ|x_i|^q)^(1/q) for q ≥ 1, and the count of non-zeros for q = 0.
The penalties use the library's convention for λ: a strength per weight,
divided by N (the training-set size) beside a mean loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["lk_norm", "lk_penalty", "threshold_", "REGULARIZERS", "weight_layers", "sparsity"]

REGULARIZERS = ("l0", "l1", "group_l1", "l2")


def lk_norm(x: Tensor, q: float) -> Tensor:
    """‖x‖_q over all entries of ``x``: the number of non-zeros for q = 0, (Σ|x_i|^q)^(1/q) for any q ≥ 1."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q):
        raise ValueError(f"q must be 0 or a number >= 1, got {q!r}")
    if q == 0:
        return (x != 0).sum().to(x.dtype if x.is_floating_point() else torch.float32)
    if q < 1:
        raise ValueError(f"q must be 0 or >= 1 (for 0 < q < 1 the formula is not a norm), got {q!r}")
    if math.isinf(q):
        return x.abs().max()
    return x.abs().pow(q).sum().pow(1.0 / q)


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """Linear and conv layers: the weights a penalty acts on (biases are left alone)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def _groups(weight: Tensor, layer: nn.Module) -> Tensor:
    """One row per group, as the gates would group them: input columns of a Linear, output channels of a conv."""
    if isinstance(layer, nn.Linear):
        return weight.t()
    return weight.flatten(1)


def lk_penalty(model: nn.Module, regularizer: str, lam: float, N: int = 1) -> Tensor:
    """``lam / N`` × Σ|w| ("l1"), × Σ_g √|g|·‖w_g‖₂ ("group_l1", the group lasso), or × ½Σw² ("l2")."""
    if regularizer not in ("l1", "group_l1", "l2"):
        raise ValueError(f"regularizer must be 'l1', 'group_l1' or 'l2' here (L0 uses l0sparse.penalty), got {regularizer!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (the strength) must be a finite number >= 0, got {lam!r}")
    terms = []
    for layer in weight_layers(model):
        weight = layer.weight
        if regularizer == "l1":
            terms.append(lk_norm(weight, 1))
        elif regularizer == "l2":
            terms.append(0.5 * weight.pow(2).sum())
        else:
            groups = _groups(weight, layer)
            terms.append(math.sqrt(groups.shape[1]) * groups.norm(dim=1).sum())
    return lam * torch.stack(terms).sum() / N


@torch.no_grad()
def threshold_(model: nn.Module, regularizer: str, tolerance: float = 1e-3) -> nn.Module:
    """Set to exactly zero the weights (or, for "group_l1", the groups) whose magnitude is below ``tolerance``.

    L1 and group L1 drive weights towards zero without reaching it in
    floating point; this is the usual final step that makes their sparsity
    countable. The tolerance is absolute, on |w| or on ‖w_g‖₂/√|g| (the
    group's root mean square), the same scale for both.
    """
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    for layer in weight_layers(model):
        weight = layer.weight
        if regularizer == "group_l1":
            groups = _groups(weight, layer)
            small = groups.norm(dim=1) / math.sqrt(groups.shape[1]) < tolerance
            groups[small] = 0.0  # a view of the weight: zeroes it in place
        else:
            weight[weight.abs() < tolerance] = 0.0
    return model


@torch.no_grad()
def sparsity(model: nn.Module) -> dict[str, float]:
    """Fractions of weights and of units (input columns of Linear, output channels of conv) that are not zero."""
    weights = kept_weights = units = kept_units = 0
    for layer in weight_layers(model):
        weight = layer.weight
        weights += weight.numel()
        kept_weights += int((weight != 0).sum())
        groups = _groups(weight, layer)
        units += groups.shape[0]
        kept_units += int((groups != 0).any(1).sum())
    return {"weights_kept": kept_weights / weights, "units_kept": kept_units / units}
