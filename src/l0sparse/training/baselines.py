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

from ..core.costs import CostModel, count_flops
from ..core.models import LeNet5
from ..core.sites import find_gates, gate_masks

__all__ = ["hidden_layers", "pruned_flops", "magnitude_prune", "gate_importance", "importance_prune_"]

#: log α of a gate fixed open / shut: the hard concrete sample is then exactly 1 / 0 (its logistic noise is clamped to ±13.8)
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
        raise ValueError("magnitude_prune supports the plain MLP and LeNet5 of l0sparse.core.models")
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
    output projection (the weights that ξ would scale), its absolute value
    taken per batch (as Michel et al.'s code does, so the ranking depends a
    little on the batch size) and summed over ``batches`` (``(inputs,
    targets)`` pairs; the loss is ``loss_fn(logits, targets)``). Any other
    gate (a feed-forward unit; a hidden dimension of
    :func:`l0sparse.hf.gate_hidden`) scores the L2 norm of the weights it
    multiplies (for a hidden dimension: its embedding columns and the rows of
    every Linear that writes the stream, together). Each gate tensor's scores are divided by their L2 norm, as
    Michel et al. normalise per layer, so that layers compare. The gates are
    held fully open while scoring; the model's log α and mode are left as
    they were, also when the loss fails.
    """
    masks = list(gate_masks(model))
    if not masks:
        raise ValueError("gate_importance needs a model gated by l0sparse.sparsify (it has no gate parametrizations)")
    log_alphas = {id(mask.gate): mask.gate.log_alpha.detach().clone() for _, _, _, mask in masks}
    raw = {id(mask): getattr(module.parametrizations, tensor_name).original for _, module, tensor_name, mask in masks}
    scores = {id(mask.gate): torch.zeros_like(mask.gate.log_alpha, requires_grad=False) for _, _, _, mask in masks}
    was_training = model.training
    batch_count = 0
    try:
        with torch.no_grad():
            for _, _, _, mask in masks:
                mask.gate.log_alpha.fill_(FIXED_OPEN)  # z = 1: the gated weight is the raw one
        model.eval()
        for inputs, targets in batches:
            batch_count += 1
            model.zero_grad(set_to_none=True)
            loss_fn(model(inputs), targets).backward()
            for name, _, _, mask in masks:
                if mask.gate.granularity != "heads":
                    continue
                weight = raw[id(mask)]
                if weight.grad is None:
                    raise ValueError(f"gate_importance: the loss has no gradient for {name}'s weight (frozen, or not on the "
                                     "path to the output): its heads cannot be scored")
                scores[id(mask.gate)] += mask.per_gate(weight.detach() * weight.grad).abs()
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for _, _, _, mask in masks:
                mask.gate.log_alpha.copy_(log_alphas[id(mask.gate)])
        model.train(was_training)
    if batch_count == 0 and any(mask.gate.granularity == "heads" for _, _, _, mask in masks):
        raise ValueError("gate_importance: batches is empty; head scores need at least one (inputs, targets) batch")
    squares = {}  # the weights a gate multiplies, in every tensor it masks: one L2 norm over all of them
    for _, _, _, mask in masks:
        if mask.gate.granularity != "heads":
            squares[id(mask.gate)] = squares.get(id(mask.gate), 0) + mask.per_gate(raw[id(mask)].detach() ** 2)
    for key, value in squares.items():
        scores[key] += value.sqrt()
    return {key: value / value.norm().clamp_min(torch.finfo(value.dtype).tiny) for key, value in scores.items()}


@torch.no_grad()
def importance_prune_(model: nn.Module, target: float, example_inputs, scores: dict[int, torch.Tensor]) -> float:
    """Shut the least important gates of a ``sparsify``-gated model for good, down to ``target`` of its FLOPs.

    Heads, hidden dimensions (a gate of :func:`l0sparse.hf.gate_hidden`)
    and the other gates (feed-forward units) are ranked separately, each kind
    across all layers by ``scores`` (from :func:`gate_importance`; ties go to
    the earlier gate), and every gate tensor keeps its best gate. The same
    fraction of each kind is kept: the largest whose FLOPs stay
    within the target (bisection). Kept gates get log α = +30, the rest -30
    (their samples are exactly 1 and 0), all frozen (``requires_grad =
    False``). Returns the fraction of the FLOPs kept; a target below the
    smallest such model (one gate per tensor) is a ValueError.
    """
    if not (0 < target <= 1):
        raise ValueError(f"target must be a fraction in (0, 1], got {target!r}")
    model_gates = find_gates(model)
    missing = [gate.owner for gate in model_gates if id(gate) not in scores]
    if missing:
        raise ValueError(f"scores has no entry for the gates of {missing[0]!r}: compute them with gate_importance on this model")
    kinds = [[g for g in model_gates if g.granularity == "heads"], [g for g in model_gates if g.granularity == "hidden"],
             [g for g in model_gates if g.granularity not in ("heads", "hidden")]]
    # each kind's gates in order of importance (a stable sort: ties in gate order), and where each gate sits
    rankings = []
    for members in kinds:
        if members:
            pooled = torch.cat([scores[id(g)].flatten() for g in members])
            rankings.append((members, pooled.argsort(descending=True, stable=True)))
    best = {id(g): scores[id(g)].flatten().argmax() for g in model_gates}
    cost_model = CostModel(model, example_inputs)

    def keep(fraction: float) -> None:
        for members, order in rankings:
            kept = torch.zeros(order.numel(), dtype=torch.bool)
            kept[order[:max(1, math.ceil(fraction * order.numel()))]] = True
            offset = 0
            for gate in members:
                mine = kept[offset: offset + gate.log_alpha.numel()].clone()
                mine[best[id(gate)]] = True  # every gate tensor (layer) keeps its best gate
                offset += gate.log_alpha.numel()
                gate.log_alpha.copy_(torch.where(mine, FIXED_OPEN, FIXED_SHUT).view_as(gate.log_alpha))

    def flops(fraction: float) -> float:
        keep(fraction)
        return float(cost_model.costs(deterministic=True)["flops"])

    dense = flops(1.0)
    smallest = flops(0.0)
    if smallest > target * dense:
        flops(1.0)
        raise ValueError(f"target = {target}: the smallest model with one gate kept per gated tensor keeps "
                         f"{smallest / dense:.3f} of the FLOPs; ask for at least that")
    low, high = 0.0, 1.0
    for _ in range(30):  # the largest common keep-fraction whose FLOPs stay within the target
        middle = (low + high) / 2
        low, high = (middle, high) if flops(middle) <= target * dense else (low, middle)
    kept_flops = flops(low)
    for gate in model_gates:
        gate.log_alpha.requires_grad_(False)
    return kept_flops / dense
