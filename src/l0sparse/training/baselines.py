"""The baselines L0 is measured against, each at a FLOPs budget.

Magnitude pruning (MLP and LeNet-5): structured L1-norm pruning of units and
channels (``torch.nn.utils.prune.ln_structured`` on output rows), with one
keep-ratio for every hidden layer found by bisection so that the pruned
network keeps ``target`` of the dense FLOPs. The masks stay on during
fine-tuning (PyTorch's prune re-applies them).

Importance pruning (transformer encoders gated by ``sparsify``), two methods,
each setting the least important gates shut for good down to ``target`` of
the FLOPs:

- ``"taylor"`` (:func:`taylor_importance`, :func:`cost_ranked_prune_`; issue
  #26): every gate scored by the loss gradient of its mask, the first-order
  Taylor term |Σ W ∂L/∂W| of the weights it multiplies (Michel, Levy &
  Neubig, 2019, for heads; Molchanov et al., 2019, for units); all gates of
  every layer ranked in one pool by score per MAC that the gate's unit costs,
  so the method chooses its own split between heads and units.
- ``"heads-magnitude-units"`` (:func:`gate_importance`,
  :func:`importance_prune_`; the baseline of issue #12): heads by the loss
  gradient of a head mask, feed-forward units by the norm of their weights,
  normalised per layer, each kind ranked on its own and kept in one common
  fraction.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..core.costs import CostModel, count_flops
from ..core.gates import Gate, accumulation_dtype
from ..core.graph import evaluating
from ..core.models import LeNet5
from ..core.sites import find_gates, gate_masks

__all__ = ["hidden_layers", "pruned_flops", "magnitude_prune", "gate_importance", "importance_prune_", "taylor_importance",
           "cost_ranked_prune_", "taylor_start_", "keep_open_as_"]

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


@contextmanager
def _gates_held_open(model: nn.Module):
    """Every gate of ``model`` fixed open (log α = +30: z = 1, the gated weights are the raw ones) and the model in eval
    mode (no dropout) inside; log α, the mode and the gradients as they were (none) afterwards, also when it fails."""
    model_gates = find_gates(model)
    log_alphas = [gate.log_alpha.detach().clone() for gate in model_gates]
    try:
        with torch.no_grad():
            for gate in model_gates:
                gate.log_alpha.fill_(FIXED_OPEN)
        with evaluating(model):
            yield model_gates
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for gate, log_alpha in zip(model_gates, log_alphas):
                gate.log_alpha.copy_(log_alpha)


def gate_importance(model: nn.Module, batches, loss_fn) -> dict[int, torch.Tensor]:
    """The ``"heads-magnitude-units"`` score of every gate of a ``sparsify``-gated model, by ``id(gate)``, normalised
    per gate tensor: heads by importance, everything else by magnitude (for :func:`importance_prune_`).

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
    raw = {id(mask): getattr(module.parametrizations, tensor_name).original for _, module, tensor_name, mask in masks}
    scores = {id(mask.gate): torch.zeros_like(mask.gate.log_alpha, requires_grad=False) for _, _, _, mask in masks}
    batch_count = 0
    with _gates_held_open(model):
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
    model_gates = _checked_gates(model, target, scores, "gate_importance")
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
                _set_fixed(gate, mine)

    def flops(fraction: float) -> float:
        keep(fraction)
        return float(cost_model.costs(deterministic=True)["flops"])

    dense = _dense_or_refuse(flops, 1.0, 0.0, target)
    low, high = 0.0, 1.0
    for _ in range(30):  # the largest common keep-fraction whose FLOPs stay within the target
        middle = (low + high) / 2
        low, high = (middle, high) if flops(middle) <= target * dense else (low, middle)
    return _freeze(model_gates, flops(low)) / dense


def taylor_importance(model: nn.Module, batches, loss_fn) -> dict[int, torch.Tensor]:
    """The ``"taylor"`` score of every gate of a gated model, by ``id(gate)``: Σ over ``batches`` of |∂L/∂z| at z = 1.

    ∂L/∂z is the loss gradient of the gate's mask, which for a gate that
    multiplies weights W equals the first-order Taylor term Σ W ∂L/∂W over
    every weight it multiplies (in every tensor, summed before the absolute
    value): for a head, Michel et al.'s |∂L/∂ξ_h| (the head's columns of the
    output projection); for a feed-forward unit, its column of the second
    Linear; for a hidden dimension (:func:`l0sparse.hf.gate_hidden`), its
    embedding columns, the rows of every Linear that writes the stream and
    every LayerNorm output it multiplies. It is read off the gate's output
    directly (a forward hook multiplies it by ones that require a gradient),
    so every kind of gate, a paper layer's included, is scored the same way.
    ``batches`` are ``(inputs, targets)`` pairs, the loss ``loss_fn(model(inputs),
    targets)``; the absolute value is taken per batch and summed, as Michel et
    al.'s code does. No normalisation: the scores of all gates compare, and
    :func:`cost_ranked_prune_` divides them by what each gate's unit costs.
    The gates are held fully open and the model in eval mode while scoring;
    log α, the mode and the weights' gradients (none) are left as they were,
    also when the loss fails.
    """
    model_gates = find_gates(model)
    if not model_gates:
        raise ValueError("taylor_importance: model has no gates; gate it first (l0sparse.sparsify, l0sparse.hf.encoder_rules)")
    scores = {id(g): torch.zeros(g.shape, dtype=accumulation_dtype(g.log_alpha.dtype), device=g.log_alpha.device)
              for g in model_gates}
    uses: dict[int, list[torch.Tensor]] = {}

    def probe(gate: Gate, args, output: torch.Tensor) -> torch.Tensor:  # z · ξ with ξ = 1: ∂L/∂ξ = ∂L/∂z
        xi = torch.ones_like(output, requires_grad=True)
        uses.setdefault(id(gate), []).append(xi)
        return output.detach() * xi

    batch_count = 0
    with _gates_held_open(model):
        handles = [gate.register_forward_hook(probe) for gate in model_gates]
        try:
            for inputs, targets in batches:
                batch_count += 1
                uses.clear()
                loss = loss_fn(model(inputs), targets)
                _add_batch_scores(model_gates, uses, loss, scores)
        finally:
            for handle in handles:
                handle.remove()
    if batch_count == 0:
        raise ValueError("taylor_importance: batches is empty; the scores need at least one (inputs, targets) batch")
    return scores


def _add_batch_scores(model_gates: list[Gate], uses: dict[int, list[torch.Tensor]], loss: torch.Tensor, scores: dict) -> None:
    """Add one batch's |∂L/∂z| to ``scores``: ``uses`` holds, per gate, the ξ of each of its uses in the forward."""
    unused = [gate.owner or type(gate).__name__ for gate in model_gates if id(gate) not in uses]
    if unused:
        raise ValueError(f"taylor_importance: the gates of {unused[0]!r} are not used by the model's forward, so they cannot be scored")
    xis = [xi for gate in model_gates for xi in uses[id(gate)]]
    grads = iter(torch.autograd.grad(loss, xis, allow_unused=True))
    for gate in model_gates:
        per_use = [next(grads) for _ in uses[id(gate)]]
        if all(grad is None for grad in per_use):
            raise ValueError(f"taylor_importance: the loss does not depend on the gates of {gate.owner!r} (not on "
                             "the path from the inputs to the loss): they cannot be scored")
        # every use of the gate adds to one derivative per gate (over a sample shape in front of its own too)
        gradient = sum(grad.reshape(-1, *gate.shape).sum(0) for grad in per_use if grad is not None)
        scores[id(gate)] += gradient.to(scores[id(gate)].dtype).abs()


@torch.no_grad()
def cost_ranked_prune_(model: nn.Module, target: float, example_inputs, scores: dict[int, torch.Tensor]) -> float:
    """Shut the gates of least score per MAC for good, down to ``target`` of the model's FLOPs (MACs).

    Every gate of every layer (heads, feed-forward units, hidden dimensions:
    all kinds) goes into one ranking by ``scores`` (from
    :func:`taylor_importance`) divided by the gate's cost, the MACs that
    closing its unit alone saves with every other gate open
    (:meth:`l0sparse.CostModel.gate_costs`); a gate whose closing alone saves
    nothing ranks first. The longest head of that ranking whose FLOPs stay
    within the target is kept (bisection on its length; ties in gate order),
    and every gate tensor (a layer's heads, a layer's units) keeps its best
    gate besides, so how many heads and how many units go is the ranking's
    choice, not a fixed share. Kept gates get log α = +30, the rest -30 (their
    samples are exactly 1 and 0), all frozen (``requires_grad = False``).
    Returns the fraction of the FLOPs kept; a target below the smallest such
    model (one gate per tensor) is a ValueError.
    """
    model_gates = _checked_gates(model, target, scores, "taylor_importance")
    for gate in model_gates:
        score = scores[id(gate)]
        if not isinstance(score, torch.Tensor) or score.shape != gate.shape:
            shape = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"scores for the gates of {gate.owner!r} must be a tensor of their shape {tuple(gate.shape)}, got {shape}")
        if not bool(torch.isfinite(score).all()) or bool((score < 0).any()):
            raise ValueError(f"scores for the gates of {gate.owner!r} must be finite and >= 0 (a score is a size of a "
                             "gradient), got some that are not")
    cost_model = CostModel(model, example_inputs)
    with torch.enable_grad():  # gate_costs differentiates the cost model
        costs = cost_model.gate_costs("flops")
    ratios, best, offset = [], [], 0
    for gate in model_gates:
        cost = costs[id(gate)].detach().flatten().double().cpu()
        score = scores[id(gate)].detach().flatten().double().cpu()
        ratio = torch.where(cost > 0, score / cost.clamp_min(torch.finfo(torch.float64).tiny), math.inf)
        ratios.append(ratio)
        best.append(offset + int(ratio.argmax()))  # every gate tensor (layer) keeps its best gate
        offset += ratio.numel()
    order = torch.cat(ratios).argsort(descending=True, stable=True)
    required = torch.zeros(offset, dtype=torch.bool)
    required[best] = True

    def flops(count: int) -> float:  # the first ``count`` gates of the ranking kept, and each tensor's best
        kept = required.clone()
        kept[order[:count]] = True
        start = 0
        for gate in model_gates:
            _set_fixed(gate, kept[start: start + gate.log_alpha.numel()])
            start += gate.log_alpha.numel()
        return float(cost_model.costs(deterministic=True)["flops"])

    dense = _dense_or_refuse(flops, offset, 0, target)
    low, high = 0, offset  # flops(low) fits; the FLOPs grow with the count, so bisect for the longest that fits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if flops(middle) <= target * dense else (low, middle - 1)
    return _freeze(model_gates, flops(low)) / dense


def taylor_start_(model: nn.Module, target: float, example_inputs, scores: dict[int, torch.Tensor]) -> float:
    """Start L0 training from :func:`cost_ranked_prune_`'s choice at ``target``, not fixed: a kept gate gets the
    log α of its ``droprate_init`` (P(z ≠ 0) as a fresh gate's), a removed one the mirror image (−log α: nearly
    shut), and every gate trains again. Returns the fraction of the FLOPs the choice keeps."""
    kept = cost_ranked_prune_(model, target, example_inputs, scores)
    with torch.no_grad():
        for gate in find_gates(model):
            start = math.log(1 - gate.droprate_init) - math.log(gate.droprate_init)
            gate.log_alpha.copy_(torch.where(gate.log_alpha > 0, start, -start))
            gate.log_alpha.requires_grad_(True)
    return kept


def keep_open_as_(model: nn.Module, other: nn.Module) -> None:
    """Fix every gate of ``model`` open where ``other``'s gate of the same place is open at test time (Eq. 13: what
    prune keeps) and shut elsewhere, for good (``structure_from``: another run's structure trained as the baseline
    trains). ``other`` is the same model gated the same way; a mismatch is refused, naming the first gate."""
    model_gates, other_gates = find_gates(model), find_gates(other)
    if len(model_gates) != len(other_gates):
        raise ValueError(f"keep_open_as_: the other model has {len(other_gates)} gates, this one {len(model_gates)}: "
                         "structure_from needs a run of the same model gated the same way")
    for gate, theirs in zip(model_gates, other_gates):
        if gate.owner != theirs.owner or gate.log_alpha.shape != theirs.log_alpha.shape:
            raise ValueError(f"keep_open_as_: the gate of {gate.owner!r} {tuple(gate.log_alpha.shape)} has no match in the other "
                             f"model (found {theirs.owner!r} {tuple(theirs.log_alpha.shape)}): structure_from needs a run of "
                             "the same model gated the same way")
    with torch.no_grad():
        for gate, theirs in zip(model_gates, other_gates):
            _set_fixed(gate, theirs.is_open().flatten().to(gate.log_alpha.device))
    _freeze(model_gates, 0.0)


def _checked_gates(model: nn.Module, target: float, scores: dict, scorer: str) -> list[Gate]:
    """``model``'s gates, once ``target`` is a fraction in (0, 1] and ``scores`` has an entry for each."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0 < target <= 1):
        raise ValueError(f"target must be a fraction in (0, 1], got {target!r}")
    if not isinstance(scores, dict):
        raise ValueError(f"scores must be a dict of id(gate) -> tensor (from {scorer}), got {type(scores).__name__}")
    model_gates = find_gates(model)
    if not model_gates:
        raise ValueError("model has no gates to prune; gate it first (l0sparse.sparsify, l0sparse.hf.encoder_rules)")
    missing = [gate.owner for gate in model_gates if id(gate) not in scores]
    if missing:
        raise ValueError(f"scores has no entry for the gates of {missing[0]!r}: compute them with {scorer} on this model")
    return model_gates


def _set_fixed(gate: Gate, kept: torch.Tensor) -> None:
    """Fix ``gate`` open where ``kept`` (flat, in its order) and shut elsewhere."""
    gate.log_alpha.copy_(torch.where(kept, FIXED_OPEN, FIXED_SHUT).view_as(gate.log_alpha))


def _dense_or_refuse(flops, everything, least, target: float) -> float:
    """The dense FLOPs, ``flops(everything)``; a ValueError, with every gate reopened, if ``flops(least)`` (one gate
    per tensor) is above ``target`` of them."""
    dense = flops(everything)
    smallest = flops(least)
    if smallest > target * dense:
        flops(everything)
        raise ValueError(f"target = {target}: the smallest model with one gate kept per gated tensor keeps "
                         f"{smallest / dense:.3f} of the FLOPs; ask for at least that")
    return dense


def _freeze(model_gates: list[Gate], kept_flops: float) -> float:
    """Stop training the gates (their values are fixed for good); returns ``kept_flops``."""
    for gate in model_gates:
        gate.log_alpha.requires_grad_(False)
    return kept_flops
