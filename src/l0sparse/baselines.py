"""The baselines L0 is measured against, each at a FLOPs budget.

Magnitude pruning (MLP and LeNet-5): structured L1-norm pruning of units and
channels (``torch.nn.utils.prune.ln_structured`` on output rows), with one
keep-ratio for every hidden layer found by bisection so that the pruned
network keeps ``target`` of the dense FLOPs. The masks stay on during
fine-tuning (PyTorch's prune re-applies them).

Importance pruning (transformer encoders gated by ``sparsify``): attention
heads ranked by the loss gradient of a head mask (Michel, Levy & Neubig,
2019), feed-forward units by the norm of their weights, the least important
removed down to ``target`` of the FLOPs by setting their gates shut for good.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .costs import CostModel, count_flops
from .models import LeNet5

__all__ = ["hidden_layers", "pruned_flops", "magnitude_prune", "gate_importance", "importance_prune_"]

#: log α of a gate fixed open / shut: the hard concrete sample is then exactly 1 / 0 (its noise is clamped to ±17 in logit)
FIXED_OPEN, FIXED_SHUT = 30.0, -30.0


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


def gate_importance(model: nn.Module, batches, loss_fn) -> dict[int, torch.Tensor]:
    """An importance score for every gate of a ``sparsify``-gated model, by ``id(gate)``, normalised per gate tensor.

    A head gate's score is Michel et al.'s: |∂L/∂ξ| for a mask ξ on the
    head's output, which equals |Σ W ∂L/∂W| over the head's columns of the
    output projection (the weights that ξ would scale), summed over
    ``batches`` (``(inputs, targets)`` pairs, the loss ``loss_fn(logits,
    targets)`` of each batch). Any other gate (a feed-forward unit) scores
    the L2 norm of the weights it multiplies. Each gate tensor's scores are
    divided by their L2 norm, as Michel et al. normalise per layer, so that
    layers compare. The model's gates are set fully open while scoring, and
    its mode is restored.
    """
    from .sparsify import gate_masks

    masks = list(gate_masks(model))
    if not masks:
        raise ValueError("gate_importance needs a model gated by l0sparse.sparsify (it has no gate parametrizations)")
    with torch.no_grad():
        for _, _, _, mask in masks:
            mask.gate.log_alpha.fill_(FIXED_OPEN)  # z = 1: the gated weight is the raw one
    raw = {id(mask): getattr(module.parametrizations, tensor_name).original for _, module, tensor_name, mask in masks}
    scores = {id(mask.gate): torch.zeros_like(mask.gate.log_alpha, requires_grad=False) for _, _, _, mask in masks}
    was_training = model.training
    model.eval()
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        for _, _, _, mask in masks:
            if mask.gate.granularity == "heads":
                weight = raw[id(mask)]
                scores[id(mask.gate)] += mask.per_gate(weight.detach() * weight.grad).abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for _, _, _, mask in masks:
        if mask.gate.granularity != "heads":
            scores[id(mask.gate)] += mask.per_gate(raw[id(mask)].detach() ** 2).sqrt()
    return {key: value / value.norm().clamp_min(torch.finfo(value.dtype).tiny) for key, value in scores.items()}


@torch.no_grad()
def importance_prune_(model: nn.Module, target: float, example_inputs, scores: dict[int, torch.Tensor]) -> float:
    """Shut the least important gates of a ``sparsify``-gated model for good, down to ``target`` of its FLOPs.

    Heads and the other gates (feed-forward units) are ranked separately,
    each kind across all layers by ``scores`` (from :func:`gate_importance`);
    the same fraction of each kind is kept, the largest whose FLOPs stay
    within the target (bisection), and every gate tensor keeps at least one
    gate. Kept gates get log α = +30, the rest -30 (their samples are exactly
    1 and 0), all frozen (``requires_grad = False``). Returns the fraction of
    the FLOPs kept.
    """
    if not (0 < target <= 1):
        raise ValueError(f"target must be a fraction in (0, 1], got {target!r}")
    from .costs import gates

    model_gates = gates(model)
    missing = [gate.owner for gate in model_gates if id(gate) not in scores]
    if missing:
        raise ValueError(f"scores has no entry for the gates of {missing[0]!r}: compute them with gate_importance on this model")
    kinds = {"heads": [g for g in model_gates if g.granularity == "heads"], "units": [g for g in model_gates if g.granularity != "heads"]}
    cost_model = CostModel(model, example_inputs)

    def keep(fraction: float) -> None:
        for members in kinds.values():
            if not members:
                continue
            pooled = torch.cat([scores[id(g)].flatten() for g in members])
            count = max(1, math.ceil(fraction * pooled.numel()))
            cut = pooled.topk(count).values.min()
            for gate in members:
                kept = scores[id(gate)] >= cut
                kept.view(-1)[scores[id(gate)].view(-1).argmax()] = True  # at least one per gate tensor
                gate.log_alpha.copy_(torch.where(kept, FIXED_OPEN, FIXED_SHUT))

    def flops(fraction: float) -> float:
        keep(fraction)
        return float(cost_model.costs(deterministic=True)["flops"])

    dense = flops(1.0)
    low, high = 0.0, 1.0
    for _ in range(30):  # the largest common keep-fraction whose FLOPs stay within the target
        middle = (low + high) / 2
        low, high = (middle, high) if flops(middle) <= target * dense else (low, middle)
    kept_flops = flops(low)
    for gate in model_gates:
        gate.log_alpha.requires_grad_(False)
    return kept_flops / dense
