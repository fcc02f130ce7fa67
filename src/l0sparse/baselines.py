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

from .costs import count_flops
from .models import LeNet5

__all__ = ["hidden_layers", "pruned_flops", "magnitude_prune"]


def hidden_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output units / channels may be removed (all Linear/conv layers but the last)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[:-1]


def _layer_macs(model: nn.Module, example: torch.Tensor) -> list[int]:
    """Dense MACs per example of every Linear/conv layer, in order."""
    counted = count_flops(model, example, per_module=True)
    return [counted[name] for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _flops_for_widths(layer_macs: list[int], sizes: list[int], widths: list[int]) -> float:
    """MACs per example with ``widths`` of the hidden layers' ``sizes`` units kept.

    The layers form a chain (each hidden layer's units are the next layer's inputs, through a flatten
    for LeNet-5), so a layer keeps its dense MACs times the kept fraction of its outputs and of its inputs.
    """
    kept = [w / s for w, s in zip(widths, sizes)]
    return sum(macs * r_out * r_in for macs, r_out, r_in in zip(layer_macs, kept + [1.0], [1.0] + kept))


def pruned_flops(model: nn.Module, example: torch.Tensor) -> float:
    """MACs per example after removing the units whose mask rows are all zero (as physical pruning would)."""
    layers = hidden_layers(model)
    widths = []
    for layer in layers:
        mask = getattr(layer, "weight_mask", None)
        widths.append(layer.weight.shape[0] if mask is None else int(mask.flatten(1).any(1).sum()))
    return _flops_for_widths(_layer_macs(model, example), [layer.weight.shape[0] for layer in layers], widths)


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
    layer_macs = _layer_macs(model, example)
    dense = sum(layer_macs)
    low, high = 0.0, 1.0
    for _ in range(40):  # the largest common keep-ratio whose FLOPs stay within the target
        ratio = (low + high) / 2
        widths = [max(1, math.ceil(ratio * s)) for s in sizes]
        low, high = (ratio, high) if _flops_for_widths(layer_macs, sizes, widths) <= target * dense else (low, ratio)
    widths = [max(1, math.ceil(low * s)) for s in sizes]
    for layer, size, width in zip(layers, sizes, widths):
        if width < size:
            torch_prune.ln_structured(layer, "weight", amount=size - width, n=1, dim=0)
            if layer.bias is not None:  # a removed unit's bias goes with it
                torch_prune.custom_from_mask(layer, "bias", layer.weight_mask.flatten(1).any(1).to(layer.bias.dtype))
    return _flops_for_widths(layer_macs, sizes, widths) / dense
