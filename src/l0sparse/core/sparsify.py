"""Gate an unmodified model in place through ``torch.nn.utils.parametrize``.

``sparsify(model, rules, example_inputs)`` registers a :class:`GateMask`
parametrization on the weights it gates; the user's classes are untouched.
After it, ``module.weight`` is the gated weight, the raw weight lives at
``module.parametrizations.weight.original`` and each gate's log α at
``module.parametrizations.weight.<i>.gate.log_alpha`` (state_dict keys
``<module>.parametrizations.weight.original`` and
``<module>.parametrizations.weight.<i>.gate.log_alpha``). A gate shared by
several weights appears under each of them; it is one parameter.

Granularities (``rules`` values):

- ``"in"``: one gate per input feature / channel of a Linear or ungrouped
  conv, on its weight columns (the paper's choice for Linear layers).
- ``"out"``: one gate per output unit / channel, placed on the weight columns
  of every layer that reads those channels (see :mod:`l0sparse.core.graph`), so a
  closed channel is removed exactly whatever BatchNorm, activations or
  residual additions lie in between; channels joined by an addition share
  one gate (the paper's choice for convs).
- ``"weight"``: one gate per weight.
- ``"heads"``: one gate per attention head of ``nn.MultiheadAttention`` (on
  the output projection's columns of that head); for
  ``nn.TransformerEncoderLayer`` the heads and the feed-forward hidden units.
  For an attention module of the user's own, give the head count:
  ``("heads", 8)``. The gate goes on the module's output projection, taken
  to be its last ``nn.Linear`` (in registration order): one gate for each
  block of ``in_features / 8`` columns, whose closing removes that head's
  contribution exactly. The module's other layers get no gates of their own.
- ``"block"``: one gate for a whole block: all input columns of the
  module's output projection (the module itself if it is an ``nn.Linear``,
  ``out_proj`` of ``nn.MultiheadAttention``, else its last ``nn.Linear``).
  Closed, the module gives what it gives with every head (every hidden
  unit) removed: the projection's bias alone. On a Hugging Face attention
  module it removes the whole attention block, on a feed-forward output
  projection (``"encoder.layer.*.output.dense"``) the whole feed-forward
  block. ``"in+block"`` (a Linear) and ``("heads+block", n)`` (an attention
  module; ``"heads+block"`` for ``nn.MultiheadAttention``) add the block gate
  to the unit or head gates, which it multiplies (CoFi's layer gates).
- ``"skip"``: leave the module alone.

In training, every weight that a shared gate multiplies draws its own sample
(like independent dropout masks over shared probabilities); in eval mode all
of them see the same deterministic gate (Eq. 13).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .gates import Gate
from .graph import check_module, evaluating, example_tuple, trace_channels
from .layers import L0Layer
from .ops import declared_head_count, fused_head_layout, grouped_projections, head_layouts, input_dim, module_rule, query_key_value
from .sites import GateMask, gate_masks, raw_tensor, sum_per_gate
from .stream import hidden_gate

__all__ = ["sparsify", "GateMask", "GRANULARITIES", "gate_masks", "sum_per_gate", "head_layouts"]

GRANULARITIES = ("in", "out", "weight", "heads", "block", "in+block", "heads+block", "skip")
_HEAD_RULES = ("heads", "heads+block")  # the granularities a tuple rule ("heads", n) may name
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _rule_for(name: str, module: nn.Module, rules: Mapping) -> str | None:
    if name in rules:
        return rules[name]
    for key, value in rules.items():
        if isinstance(key, str) and any(ch in key for ch in "*?[") and fnmatch.fnmatchcase(name, key):
            return value
    for key, value in rules.items():
        if isinstance(key, type) and isinstance(module, key):
            return value
    return None


def _default_rule(module: nn.Module) -> str | None:
    rule = module_rule(module)
    return rule.default_granularity if rule is not None else None


def _covers_submodules(module: nn.Module) -> bool:
    """Whether the module's rule gates its submodules itself (PyTorch's attention): they get no rules of their own."""
    rule = module_rule(module)
    return rule is not None and rule.covers_submodules


def _check_rules(rules) -> dict:
    if rules is None:
        return {}
    if not isinstance(rules, Mapping):
        raise ValueError(f"rules must be a mapping of module names, glob patterns or types to one of {GRANULARITIES}, got {type(rules).__name__}")
    for key, value in rules.items():
        if not isinstance(key, (str, type)):
            raise ValueError(f"rules keys must be module names, glob patterns or module types, got {key!r}")
        if isinstance(value, tuple):
            if not (len(value) == 2 and value[0] in _HEAD_RULES and isinstance(value[1], int) and not isinstance(value[1], bool) and value[1] >= 1):
                raise ValueError(f"rules[{key!r}] = {value!r}: a tuple rule is ('heads', number_of_heads) or "
                                 "('heads+block', number_of_heads) with a positive int")
        elif value not in GRANULARITIES:
            raise ValueError(f"rules[{key!r}] = {value!r}: the granularity must be one of {GRANULARITIES}, ('heads', number_of_heads) "
                             "or ('heads+block', number_of_heads)")
    return dict(rules)


def _output_projection(module: nn.Module) -> nn.Linear | None:
    """A user attention module's output projection: its last nn.Linear that maps back to the width the others read
    (Phi-3 registers ``o_proj`` before its fused ``qkv_proj``); the last nn.Linear where none does."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) and m is not module]
    back = [m for m in linears if all(other.in_features == m.out_features for other in linears if other is not m)]
    return (back or linears)[-1] if linears else None


def _block_projection(module: nn.Module) -> nn.Linear | None:
    """The Linear whose input columns a ``"block"`` gate covers: as the module's rule says (a Linear itself, ``out_proj``),
    or for a module without a rule (an attention module of the user's own) its output projection."""
    rule = module_rule(module)
    return rule.block_projection(module) if rule is not None else _output_projection(module)


def sparsify(model: nn.Module, rules: Mapping | None = None, example_inputs: tuple | Tensor | None = None, **gate_kwargs) -> nn.Module:
    """Attach Hard Concrete gates to ``model`` in place and return it.

    Args:
        model: any ``nn.Module``; its classes are not changed.
        rules: maps module names (``"features.3"``), glob patterns
            (``"encoder.*.linear1"``) or module types (``nn.Conv2d``) to a
            granularity in ``GRANULARITIES`` (``"in"``, ``"out"``, ``"weight"``,
            ``"heads"``, ``"block"``, ``"in+block"``, ``"heads+block"``,
            ``"skip"``) or ``("heads", n)`` / ``("heads+block", n)``. Exact
            names win over patterns, patterns over types, types over the
            defaults: Linear ``"in"``, ConvNd ``"out"``, attention ``"heads"``.
        example_inputs: a batch (a tensor or a tuple of the forward's
            arguments). Needed for ``"out"`` gates, which must find every
            layer that reads a channel by tracing the model with torch.fx.
        **gate_kwargs: ``beta``, ``gamma``, ``zeta``, ``droprate_init``,
            ``clamp_log_alpha`` of :class:`l0sparse.Gate`.

    Raises:
        ValueError: a rule names a module it cannot gate, a granularity is
            unknown, or ``"out"`` gates are asked for without example inputs.
    """
    check_module(model, "sparsify")
    rules = _check_rules(rules)
    _check_not_gated(model)
    _check_rules_match(model, rules)
    if example_inputs is not None:
        example_inputs = example_tuple(example_inputs, "sparsify")
    plan, head_counts = _plan(model, rules)
    graph = _trace_for_out_gates(model, plan, example_inputs)
    placement = _Placement(model, graph, gate_kwargs, head_counts)
    for name, module, rule, _explicit in plan:
        granularity, block = rule.removesuffix("+block"), rule.endswith("block")
        if granularity != "block":  # "block" alone: the block gate only, below
            _GATE_BY_GRANULARITY[granularity](placement, name, module)
        if block:
            projection = _block_projection(module)
            gate = _new_gate(1, name, "block", projection, gate_kwargs)
            columns = input_dim(projection)
            width = raw_tensor(projection, "weight").shape[columns]  # not the gated weight: reading it would draw a sample
            parametrize.register_parametrization(projection, "weight", GateMask(gate, dim=columns, block=width))
    return model


def _plan(model: nn.Module, rules: dict) -> tuple[list[tuple[str, nn.Module, str, bool]], dict[str, int]]:
    """Where gates go: (name, module, granularity, explicit) per gated module, checked, and the head counts that
    ``("heads", n)`` rules give. Nothing is registered yet, so a refusal leaves the model as it was."""
    plan: list[tuple[str, nn.Module, str, bool]] = []
    handled: set[str] = set()
    head_counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in handled):
            continue  # inside an attention module that its own rule handles
        explicit = _rule_for(name, module, rules)
        if isinstance(explicit, tuple):  # ("heads", n): an attention module of the user's own
            head_counts[name] = explicit[1]
            explicit = explicit[0]
        granularity = explicit or _default_rule(module)
        if isinstance(module, (L0Layer, Gate)):
            handled.add(name)
            continue  # already gated by the paper's layers
        if granularity is None:
            if explicit is None and list(module.parameters(recurse=False)) and not isinstance(module, _NORMS) and module_rule(module) is None:
                warnings.warn(f"sparsify: {name!r} ({type(module).__name__}) has weights but no gate: no rule supports it", stacklevel=3)
            continue
        if granularity == "skip":
            if _covers_submodules(module):
                handled.add(name)
            if explicit is not None:
                warnings.warn(f"sparsify: {name!r} ({type(module).__name__}) skipped by rule", stacklevel=3)
            continue
        _check_supported(name, module, granularity, head_counts.get(name))
        if granularity.startswith("heads") or (granularity == "block" and _block_projection(module) is not module):
            handled.add(name)  # its q/k/v and projection get no gates of their own
        plan.append((name, module, granularity, explicit is not None))
    return plan, head_counts


def _trace_for_out_gates(model: nn.Module, plan: list, example_inputs):
    """The channel graph that 'out' gates need (every layer that reads a channel), or None when none is asked for."""
    if not any(granularity == "out" for _, _, granularity, _ in plan):
        return None
    if example_inputs is None:
        needs = [name for name, _, g, _ in plan if g == "out"]
        raise ValueError(
            f"example_inputs is required: 'out' gates on {needs[:3]} must trace the model to find the layers that "
            "read each channel; pass a batch, e.g. sparsify(model, example_inputs=(torch.randn(1, 3, 32, 32),))"
        )
    with evaluating(model), torch.no_grad():  # a failed trace leaves the model in the mode it was in
        graph = trace_channels(model, example_inputs)
    _check_out_rules(graph, plan)
    return graph


@dataclass
class _Placement:
    """What placing one granularity needs: the model's modules, the channel graph ('out'), the gates' settings,
    ``("heads", n)`` counts, and the gate of each channel space gated so far (coupled modules share it)."""

    model: nn.Module
    graph: object
    gate_kwargs: dict
    head_counts: dict[str, int]
    space_gates: dict[int, Gate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())


def _gate_inputs(placement: _Placement, name: str, module: nn.Module) -> None:
    columns = input_dim(module)  # 1, or 0 for a weight stored [in, out]
    gate = _new_gate(raw_tensor(module, "weight").shape[columns], name, "in", module, placement.gate_kwargs)
    parametrize.register_parametrization(module, "weight", GateMask(gate, dim=columns))


def _gate_weights(placement: _Placement, name: str, module: nn.Module) -> None:
    gate = _new_gate(module.weight.shape, name, "weight", module, placement.gate_kwargs)
    parametrize.register_parametrization(module, "weight", GateMask(gate, dim=None))


def _gate_outputs(placement: _Placement, name: str, module: nn.Module) -> None:
    """One gate per output channel, on every consumer of the module's output channels."""
    graph, modules = placement.graph, placement.modules
    why = _why_output_channels_cannot_be_gated(graph, name)
    if why is not None:  # explicit rules were refused before any gate was added: this is a default one
        warnings.warn(f"sparsify: cannot gate the output channels of {name!r}: {why} (left ungated)", stacklevel=3)
        return
    index = graph.module_output[name]
    space = graph.spaces[index]
    if index in placement.space_gates:
        return  # coupled with a module gated already: one gate for the shared channels
    gate = _new_gate(space.size, name, "out", module, placement.gate_kwargs)
    # it pays λ for the rows of the layers that produce its channels, as L0Conv2d's gates do (not for the
    # columns it multiplies): BatchNorm is not charged, a depthwise conv's filter is
    gate.producers = tuple(modules[producer] for producer in space.producers) + tuple(
        modules[follower] for follower in space.followers if isinstance(modules[follower], nn.modules.conv._ConvNd))
    placement.space_gates[index] = gate
    for consumer in space.consumers:
        parametrize.register_parametrization(modules[consumer.name], "weight", GateMask(gate, dim=consumer.dim, block=consumer.block))


def _check_not_gated(model: nn.Module) -> None:
    """A second sparsify would stack a second gate on every weight (and double the penalty): refuse it."""
    masks = list(gate_masks(model))
    gated = sorted({name or type(model).__name__ for name, *_ in masks})
    hidden = hidden_gate(model)
    only_hidden = hidden is not None and all(mask.gate is hidden for *_, mask in masks)
    if gated and only_hidden:  # gate_hidden alone: the user meant to sparsify first
        raise ValueError(f"sparsify: the model already has l0sparse gates (on {gated[:3]}), the hidden gate of "
                         "l0sparse.hf.gate_hidden: call sparsify first, then gate_hidden; for a fresh start, build the model again")
    if gated:
        raise ValueError(f"sparsify: the model already has l0sparse gates (on {gated[:3]}): sparsify a model once, with "
                         "every rule in one call; for a fresh start, build the model again")


def _check_rules_match(model: nn.Module, rules: dict) -> None:
    """A name or pattern that matches no module is a typo, not a no-op (module types may simply be absent)."""
    names = [name for name, _ in model.named_modules()]
    for key in rules:
        if isinstance(key, str) and not any(fnmatch.fnmatchcase(name, key) for name in names):
            shown = [name for name in names if name][:6]
            raise ValueError(f"sparsify: rules[{key!r}] matches no module of {type(model).__name__}; "
                             f"rule keys are module names or glob patterns over them, such as {shown}")


def _why_output_channels_cannot_be_gated(graph, name: str) -> str | None:
    """Why an 'out' gate on ``name`` is impossible (not traced, locked, unread), or None when it is possible."""
    index = graph.module_output.get(name)
    space = None if index is None else graph.spaces[index]
    if space is None:
        return "they are not traced"
    if space.locked or not space.consumers:
        return "; ".join(space.locked[:2]) if space.locked else "no layer reads them"
    return None


def _check_out_rules(graph, plan: list) -> None:
    """Refuse an explicit 'out' rule that cannot be honoured before any gate is registered (the model stays as it was)."""
    for name, _, granularity, explicit in plan:
        why = _why_output_channels_cannot_be_gated(graph, name) if granularity == "out" and explicit else None
        if why is not None:
            raise ValueError(f"sparsify: cannot gate the output channels of {name!r}: {why}")


def _new_gate(shape, owner: str, granularity: str, module: nn.Module, gate_kwargs: dict) -> Gate:
    reference = next(module.parameters())
    gate = Gate(shape, **gate_kwargs).to(device=reference.device)
    gate.owner, gate.granularity = owner, granularity
    return gate


def _check_supported(name: str, module: nn.Module, granularity: str, num_heads: int | None = None) -> None:
    """Refuse, naming the module, a granularity its rule does not allow (checked before any gate is registered)."""
    rule = module_rule(module)
    if granularity.endswith("block"):
        _check_block(name, module, granularity)
        if granularity == "block":
            return
        granularity = granularity.removesuffix("+block")
    has_heads = rule is not None and rule.allows(module, "heads")
    if num_heads is not None and not has_heads:
        _check_own_attention(name, module, num_heads)
        return
    if granularity == "heads" and has_heads:
        rule.check_heads(name, module, num_heads)
        return
    if rule is None or not rule.allows(module, granularity):
        hint = " (a grouped conv has no per-input-channel columns; use 'out')" if granularity == "in" and getattr(module, "groups", 1) != 1 else ""
        raise ValueError(f"sparsify: rule {granularity!r} does not apply to {name!r} ({type(module).__name__}){hint}")


def _check_own_attention(name: str, module: nn.Module, num_heads: int) -> None:
    """A ``("heads", n)`` rule on an attention module of the user's own (or a library's): its output projection
    must split into ``n`` heads, and a declared head count or grouped-query layout must agree."""
    projection = _block_projection(module)
    inputs = raw_tensor(projection, "weight").shape[input_dim(projection)] if projection is not None else 0
    if projection is None or inputs % num_heads:
        found = "it has no nn.Linear" if projection is None else f"its last Linear has {inputs} inputs"
        raise ValueError(f"sparsify: rule ('heads', {num_heads}) on {name!r} ({type(module).__name__}): the output projection "
                         f"must be its last nn.Linear with inputs divisible by {num_heads}; {found}")
    grouped = fused_head_layout(name, module) or grouped_projections(module, projection)  # fused: the layout an adapter's rule gives
    if grouped is not None and num_heads not in (grouped["heads"], grouped["kv_heads"]):  # a gate across heads removes none
        raise ValueError(f"sparsify: rule ('heads', {num_heads}) on {name!r} ({type(module).__name__}): the module has "
                         f"{grouped['heads']} query heads in {grouped['kv_heads']} key/value groups; give ('heads', "
                         f"{grouped['heads']}) for a gate per query head or ('heads', {grouped['kv_heads']}) for one per group")
    if grouped is not None:
        return
    declared = declared_head_count(module)
    if declared is not None and declared != num_heads:  # gates across head boundaries could not remove heads
        raise ValueError(f"sparsify: rule ('heads', {num_heads}) on {name!r} ({type(module).__name__}): the module has "
                         f"{declared} heads")
    if declared is not None and len(query_key_value(module, projection)) != 3:
        warnings.warn(f"sparsify: ('heads', {num_heads}) on {name!r} ({type(module).__name__}): its last nn.Linear does not "
                      "follow three q/k/v Linear layers of its input width, so prune cannot remove whole heads; put the rule "
                      "on the module that holds q, k, v and the output projection (for BERT: 'encoder.layer.*.attention')",
                      stacklevel=5)


def _check_block(name: str, module: nn.Module, granularity: str) -> None:
    """Refuse a block rule on a module that has no output projection for its one gate to cover."""
    where = f"rule {granularity!r} on {name!r} ({type(module).__name__})"
    allowed = ("'block' on an nn.Linear (a feed-forward output projection), nn.MultiheadAttention or an attention module "
               "whose last nn.Linear is its output projection; 'in+block' on an nn.Linear; ('heads+block', n) on an attention module")
    rule = module_rule(module)
    if rule is not None and rule.block_refusal is not None:
        raise ValueError(f"sparsify: {where}: {rule.block_refusal}. Allowed: {allowed}")
    if granularity == "in+block" and _block_projection(module) is not module:
        raise ValueError(f"sparsify: {where}: 'in+block' needs an nn.Linear. Allowed: {allowed}")
    if granularity != "in+block" and _block_projection(module) is None:
        raise ValueError(f"sparsify: {where}: it has no output projection. Allowed: {allowed}")


def _gate_heads(placement: _Placement, name: str, module: nn.Module) -> None:
    """One gate per head: through the module's rule (PyTorch's attention), or on the output projection's column
    blocks of an attention module of the user's own (its ``("heads", n)`` rule)."""
    rule, gate_kwargs, num_heads = module_rule(module), placement.gate_kwargs, placement.head_counts.get(name)
    if rule is not None and rule.allows(module, "heads"):
        rule.gate_heads(name, module, lambda shape, granularity, charged: _new_gate(shape, name, granularity, charged, gate_kwargs))
        return
    projection = _block_projection(module)
    gate = _new_gate(num_heads, name, "heads", projection, gate_kwargs)
    columns = input_dim(projection)
    parametrize.register_parametrization(projection, "weight", GateMask(gate, dim=columns, block=raw_tensor(projection, "weight").shape[columns] // num_heads))


#: how each granularity is placed (a block gate comes on top, in sparsify)
_GATE_BY_GRANULARITY = {"in": _gate_inputs, "weight": _gate_weights, "heads": _gate_heads, "out": _gate_outputs}
