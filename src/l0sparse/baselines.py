"""Magnitude pruning at a FLOPs budget: the baseline L0 is measured against.

Structured L1-norm pruning of units and channels (``torch.nn.utils.prune.ln_structured``
on output rows), with one keep-ratio for every hidden layer found by
bisection so that the pruned network keeps ``target`` of the dense FLOPs.
The masks stay on during fine-tuning (PyTorch's prune re-applies them).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .models import LeNet5, mlp_counts

__all__ = ["hidden_layers", "pruned_flops", "magnitude_prune"]


def hidden_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output units / channels may be removed (all Linear/conv layers but the last)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[:-1]


def _flops_for_widths(model: nn.Module, widths: list[int], example: torch.Tensor) -> int:
    if isinstance(model, LeNet5):
        k1, k2, k3 = widths
        return k1 * 25 * 24 * 24 + k2 * k1 * 25 * 8 * 8 + (k2 * 16) * k3 + k3 * model.fc2.out_features
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = [layers[0].in_features, *widths]
    return mlp_counts(inputs, layers[-1].out_features)[1]


def pruned_flops(model: nn.Module, example: torch.Tensor) -> int:
    """MACs per example after removing the units whose mask rows are all zero (as physical pruning would)."""
    widths = []
    for layer in hidden_layers(model):
        mask = getattr(layer, "weight_mask", None)
        widths.append(layer.weight.shape[0] if mask is None else int(mask.flatten(1).any(1).sum()))
    return _flops_for_widths(model, widths, example)


@torch.no_grad()
def magnitude_prune(model: nn.Module, target: float, example: torch.Tensor) -> float:
    """Prune the smallest-L1 units of every hidden layer, the same fraction in each, to ``target`` of the FLOPs.

    Returns the fraction of FLOPs kept (the nearest a common keep-ratio gets).
    """
    if not (0 < target <= 1):
        raise ValueError(f"target must be a fraction in (0, 1], got {target!r}")
    if not isinstance(model, LeNet5) and not all(isinstance(m, nn.Linear) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))):
        raise ValueError("magnitude_prune supports the plain MLP and LeNet5 of l0sparse.models")
    layers = hidden_layers(model)
    sizes = [layer.weight.shape[0] for layer in layers]
    dense = _flops_for_widths(model, sizes, example)
    low, high = 0.0, 1.0
    for _ in range(40):  # the largest common keep-ratio whose FLOPs stay within the target
        ratio = (low + high) / 2
        widths = [max(1, math.ceil(ratio * s)) for s in sizes]
        low, high = (ratio, high) if _flops_for_widths(model, widths, example) <= target * dense else (low, ratio)
    widths = [max(1, math.ceil(low * s)) for s in sizes]
    for layer, size, width in zip(layers, sizes, widths):
        if width < size:
            torch_prune.ln_structured(layer, "weight", amount=size - width, n=1, dim=0)
            if layer.bias is not None:  # a removed unit's bias goes with it
                torch_prune.custom_from_mask(layer, "bias", layer.weight_mask.flatten(1).any(1).to(layer.bias.dtype))
    return _flops_for_widths(model, widths, example) / dense
