"""Fold the deterministic gates into the weights and remove every closed unit, channel and input.

``prune(model, example_inputs)`` returns a ``torch.fx.GraphModule`` made only
of PyTorch modules and functions (nothing from l0sparse): the same
computation as the gated model in eval mode, with smaller layers. Where a
layer reads only some features of a tensor that others read in full (the
paper's input gates, for instance), a ``torch.index_select`` picks them.

A model that torch.fx cannot trace but torch.export can (Hugging Face
encoders) has no fx graph to rewrite: ``prune`` then returns a plain copy of
the model itself (its own class, no gate left) with its Linear, conv and
BatchNorm layers sliced and the closed heads of its attention modules
removed (see docs/design.md, "Tracing").
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .gates import Gate
from .graph import ChannelGraph, trace_channels
from .layers import L0Conv2d, L0Linear
from .models import L0LeNet5, L0MLP
from .sparsify import gate_masks, head_layouts, set_head_count

__all__ = ["prune", "rebuild", "plain_copy"]


def _has_gates(model: nn.Module) -> bool:
    return any(isinstance(module, Gate) for module in model.modules())


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every gate folded into its weights and the paper's layers made plain."""
    work = copy.deepcopy(model).eval()
    for module in work.modules():
        if parametrize.is_parametrized(module):
            # not parametrize.remove_parametrizations: a deep copy shares the parametrized class with the
            # original, and removing the property from that class would break the original model
            folded = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            del module._modules["parametrizations"]
            module.__class__ = module.__class__.__bases__[0]
            for name, value in folded.items():
                module.register_parameter(name, nn.Parameter(value))
    for name, module in list(work.named_modules()):
        if isinstance(module, L0Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight.copy_(module.weight * module.gate.deterministic())
            if module.bias is not None:
                plain.bias.copy_(module.bias)
            _set_submodule(work, name, plain.to(module.weight))
        elif isinstance(module, L0Conv2d):
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                              module.dilation, module.groups, bias=module.bias is not None)
            z_hat = module.gate.deterministic()
            plain.weight.copy_(module.weight * z_hat[:, None, None, None])
            if module.bias is not None:
                plain.bias.copy_(module.bias * z_hat)
            _set_submodule(work, name, plain.to(module.weight))
    for module in work.modules():
        if isinstance(module, (L0MLP, L0LeNet5)):  # no gates are left to skip units by
            module.conditional = False
    return work


def _column_alive(weight: Tensor) -> Tensor:
    """Per input column (dim 1): does any weight in it differ from zero?"""
    return weight.ne(0).movedim(1, 0).reshape(weight.shape[1], -1).any(1)


def _round_up(alive: Tensor, multiple: int, minimum: int = 1) -> Tensor:
    """``alive`` with its first dead entries revived until the count is a multiple of ``multiple`` (or all),
    and at least ``minimum``."""
    count = int(alive.sum())
    wanted = min(alive.numel(), -(-max(count, minimum) // multiple) * multiple)
    if wanted > count:
        alive = alive.clone()
        alive[torch.nonzero(~alive).flatten()[: wanted - count]] = True
    return alive


def _make_plan(graph: ChannelGraph, column_gated: set[str] = frozenset(), round_to: int = 1, can_select: bool = True) -> dict:
    """Which rows, follower entries and columns each module keeps, and which inputs get an index_select.

    ``column_gated`` names the Linear layers with gates on their inputs: one that reads a tensor the
    channel analysis does not follow (a head-gated output projection after a reshape) still drops its
    closed columns, through an index_select on its last dimension, which a Linear always reads.
    ``round_to`` rounds every kept count of channels, units and selected inputs up to a multiple of it.
    ``can_select=False`` (a model sliced in place, whose forward cannot gain an index_select) keeps every
    column that a consumer is fed, closed or not: they are zero, so the outputs do not change.
    """
    modules = dict(graph.graph_module.named_modules())
    rows: dict[str, list[int]] = {}
    followers: dict[str, list[int]] = {}
    remaining: dict[str, Tensor] = {}  # consumer -> original column indices still fed to it
    revived: dict[str, Tensor] = {}  # consumer -> its fed columns that rounding keeps although they are zero
    for space in graph.spaces:
        if not space.consumers:
            continue
        columns_alive = {c.name: _column_alive(modules[c.name].weight) for c in space.consumers}
        if space.removable:
            alive = torch.zeros(space.size, dtype=torch.bool)
            for consumer in space.consumers:
                alive |= columns_alive[consumer.name].view(space.size, consumer.block).any(1)
            if space.zero_preserving and not space.followers and space.producers:
                # channels that every producer outputs as exactly 0 (closed L0Conv2d channels) reach no one
                produced = torch.zeros(space.size, dtype=torch.bool)
                for producer in space.producers:
                    module = modules[producer]
                    produced |= module.weight.ne(0).flatten(1).any(1)
                    if module.bias is not None:
                        produced |= module.bias.ne(0)
                alive &= produced
            # a dead channel kept by rounding has zero columns in every consumer: the output is unchanged
            rounded = _round_up(alive, round_to, minimum=0 if graph.can_empty(space) else 1)
            keep = torch.nonzero(rounded).flatten()  # empty only between Linear layers sliced in place
        else:
            rounded = alive = torch.ones(space.size, dtype=torch.bool)
            keep = torch.arange(space.size)
        if keep.numel() < space.size:
            for producer in space.producers:
                rows[producer] = keep.tolist()
            for follower in space.followers:
                followers[follower] = keep.tolist()
        for consumer in space.consumers:
            blocks = (keep[:, None] * consumer.block + torch.arange(consumer.block)).flatten()
            remaining[consumer.name] = blocks
            # with round_to 1 the one zero channel kept for an all-closed space needs no columns kept for it
            revived[consumer.name] = (rounded & ~alive & (round_to > 1))[keep].repeat_interleave(consumer.block)
    for name, module in modules.items():
        if isinstance(module, nn.TransformerEncoderLayer):  # a traced leaf: its feed-forward units are sliced inside it
            alive = _column_alive(module.linear2.weight)
            rounded = _round_up(alive, round_to)
            keep = torch.nonzero(rounded).flatten()
            if keep.numel() < alive.numel():
                rows[f"{name}.linear1"] = keep.tolist()
                remaining[f"{name}.linear2"] = keep
                revived[f"{name}.linear2"] = (rounded & ~alive)[keep]
    columns: dict[str, list[int]] = {}
    selections: list[dict] = []
    for name, fed in remaining.items():
        alive = _round_up(_column_alive(modules[name].weight)[fed] | revived[name], round_to)
        if not can_select:
            alive = torch.ones_like(alive)
        kept = fed[alive]
        columns[name] = kept.tolist()
        if kept.numel() < fed.numel() and name in graph.module_input:
            positions = torch.nonzero(alive).flatten()
            dim = -1 if isinstance(modules[name], nn.Linear) else 1
            selections.append({"module": name, "dim": dim, "index": positions.tolist()})
    called = {node.target for node in graph.graph_module.graph.nodes if node.op == "call_module"}
    for name in sorted((column_gated & called) - remaining.keys() if can_select else ()):  # not the insides of attention modules
        alive = _round_up(_column_alive(modules[name].weight), round_to)
        if isinstance(modules[name], nn.Linear) and not alive.all():
            kept = torch.nonzero(alive).flatten().tolist()
            columns[name] = kept
            selections.append({"module": name, "dim": -1, "index": kept})
    heads: dict[str, list[int]] = {}
    for name in sorted(graph.removable_heads):
        attention = modules[name]
        head_dim = attention.embed_dim // attention.num_heads
        alive = attention.out_proj.weight.ne(0).any(0).view(attention.num_heads, head_dim).any(1)
        if not alive.all():  # a closed head's out_proj columns are zero after folding
            heads[name] = torch.nonzero(alive).flatten().tolist() or [0]  # keep one (zero) head rather than none
    inline = sorted(e for e in graph.inlined_encoders if f"{e}.self_attn" in heads)
    return {"rows": rows, "followers": followers, "columns": columns, "selections": selections, "heads": heads, "inline": inline}


def _inline_encoder(graph_module: fx.GraphModule, name: str) -> None:
    """Replace calls of the TransformerEncoderLayer ``name`` by its eval-mode computation, one node per step.

    Its attention then becomes a call of its own, which :func:`_remove_heads` can rewrite; the layer
    itself is replaced by an ``nn.ModuleDict`` of the submodules the nodes call (dropout is the identity in eval).
    """
    layer = graph_module.get_submodule(name)
    graph = graph_module.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == name]:
        with graph.inserting_before(node):
            def call(submodule: str, *args, **kwargs):
                return graph.call_module(f"{name}.{submodule}", args, kwargs)

            def attention(x):
                return graph.call_function(operator.getitem, (call("self_attn", x, x, x, need_weights=False), 0))

            def feed_forward(x):
                hidden = call("linear1", x)
                hidden = call("activation", hidden) if isinstance(layer.activation, nn.Module) else graph.call_function(layer.activation, (hidden,))
                return call("linear2", hidden)

            source = node.args[0]
            if layer.norm_first:
                x = graph.call_function(operator.add, (source, attention(call("norm1", source))))
                x = graph.call_function(operator.add, (x, feed_forward(call("norm2", x))))
            else:
                x = call("norm1", graph.call_function(operator.add, (source, attention(source))))
                x = call("norm2", graph.call_function(operator.add, (x, feed_forward(x))))
        node.replace_all_uses_with(x)
        graph.erase_node(node)
    parts = {part: getattr(layer, part) for part in ("self_attn", "linear1", "linear2", "norm1", "norm2")}
    if isinstance(layer.activation, nn.Module):
        parts["activation"] = layer.activation
    _set_submodule(graph_module, name, nn.ModuleDict(parts))


@torch.no_grad()
def _remove_heads(graph_module: fx.GraphModule, name: str, kept: list[int]) -> None:
    """Rebuild the calls of the MultiheadAttention ``name`` with only the ``kept`` heads.

    nn.MultiheadAttention cannot hold fewer heads than its width allows, so it becomes an
    ``nn.ModuleDict`` of four Linear layers (q/k/v projections to the kept heads' rows, the output
    projection from their columns) and the calls become ``F.scaled_dot_product_attention`` on them.
    """
    attention = graph_module.get_submodule(name)
    embed, head_dim = attention.embed_dim, attention.embed_dim // attention.num_heads
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
    parts = {}
    for position, part in enumerate(("q_proj", "k_proj", "v_proj")):
        weight = attention.in_proj_weight[position * embed:(position + 1) * embed]
        bias = None if attention.in_proj_bias is None else attention.in_proj_bias[position * embed:(position + 1) * embed]
        linear = nn.Linear(embed, len(rows), bias=bias is not None).to(weight)
        linear.weight.copy_(weight[rows])
        if bias is not None:
            linear.bias.copy_(bias[rows])
        parts[part] = linear
    out_proj = attention.out_proj
    parts["out_proj"] = nn.Linear(len(rows), embed, bias=out_proj.bias is not None).to(out_proj.weight)
    parts["out_proj"].weight.copy_(out_proj.weight[:, rows])
    if out_proj.bias is not None:
        parts["out_proj"].bias.copy_(out_proj.bias)
    _set_submodule(graph_module, name, nn.ModuleDict(parts))
    graph = graph_module.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == name]:
        with graph.inserting_before(node):
            def split_heads(x, part: str):
                projected = graph.call_module(f"{name}.{part}", (x,))
                if not attention.batch_first:  # (length, batch, ·) -> (batch, length, ·)
                    projected = graph.call_method("transpose", (projected, 0, 1))
                return graph.call_method("transpose", (graph.call_method("unflatten", (projected, -1, (len(kept), head_dim))), 1, 2))

            query, key, value = node.args[:3]
            heads = graph.call_function(F.scaled_dot_product_attention,
                                        (split_heads(query, "q_proj"), split_heads(key, "k_proj"), split_heads(value, "v_proj")))
            merged = graph.call_method("flatten", (graph.call_method("transpose", (heads, 1, 2)), -2))
            if not attention.batch_first:
                merged = graph.call_method("transpose", (merged, 0, 1))
            output = graph.call_module(f"{name}.out_proj", (merged,))
        for user in list(node.users):  # getitem(·, 0): the trace checked that nothing reads the weights
            user.replace_all_uses_with(output)
            graph.erase_node(user)
        graph.erase_node(node)


@torch.no_grad()
def _slice(module: nn.Module, name: str, rows=None, columns=None, follower=None) -> None:
    if follower is not None:
        index = torch.as_tensor(follower, dtype=torch.long)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for attribute in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(module, attribute)
                if tensor is not None:
                    tensor.data = tensor.data[index].clone()
            module.num_features = len(index)
        else:  # depthwise conv
            module.weight.data = module.weight.data[index].clone()
            if module.bias is not None:
                module.bias.data = module.bias.data[index].clone()
            module.in_channels = module.out_channels = module.groups = len(index)
        return
    if rows is not None:
        index = torch.as_tensor(rows, dtype=torch.long)
        module.weight.data = module.weight.data[index].clone()
        if module.bias is not None:
            module.bias.data = module.bias.data[index].clone()
        if isinstance(module, nn.Linear):
            module.out_features = len(index)
        else:
            module.out_channels = len(index)
    if columns is not None:
        index = torch.as_tensor(columns, dtype=torch.long)
        module.weight.data = module.weight.data[:, index].clone()
        if isinstance(module, nn.Linear):
            module.in_features = len(index)
        else:
            module.in_channels = len(index)


def _slice_layers(modules: dict[str, nn.Module], plan: dict) -> None:
    """Slice the plan's producer rows, follower entries and consumer columns, in place."""
    for name, rows in plan["rows"].items():
        _slice(modules[name], name, rows=rows)
    for name, entries in plan["followers"].items():
        _slice(modules[name], name, follower=entries)
    for name, columns in plan["columns"].items():
        if len(columns) != modules[name].weight.shape[1]:
            _slice(modules[name], name, columns=columns)


def _apply_plan(graph: ChannelGraph, plan: dict) -> fx.GraphModule:
    graph_module = graph.graph_module
    _slice_layers(dict(graph_module.named_modules()), plan)
    for name in plan.get("inline", []):
        _inline_encoder(graph_module, name)
    for name, kept in plan.get("heads", {}).items():
        _remove_heads(graph_module, name, kept)
    for number, selection in enumerate(plan["selections"]):
        buffer = f"kept_inputs_{number}"
        graph_module.register_buffer(buffer, torch.as_tensor(selection["index"], dtype=torch.long))
        for node in list(graph_module.graph.nodes):
            if node.op == "call_module" and node.target == selection["module"]:
                with graph_module.graph.inserting_before(node):
                    index = graph_module.graph.get_attr(buffer)
                    picked = graph_module.graph.call_function(torch.index_select, (node.args[0], selection["dim"], index))
                node.args = (picked, *node.args[1:])
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


def _head_layouts(gated: nn.Module, work: nn.Module) -> dict[str, dict]:
    """:func:`head_layouts` of ``gated``, each with the heads whose projection columns are not all zero in
    ``work`` (folded): ``"kept"`` (empty when every head, or the block, is closed)."""
    modules = dict(work.named_modules())
    layouts = head_layouts(gated)
    for layout in layouts.values():
        projection = modules[layout["projection"]]
        alive = projection.weight.ne(0).any(0).view(layout["heads"], layout["head_dim"]).any(1)
        layout["kept"] = torch.nonzero(alive).flatten().tolist()
    return layouts


@torch.no_grad()
def _apply_module_plan(work: nn.Module, plan: dict) -> nn.Module:
    """Slice ``work``'s own modules as ``plan`` says (rows, follower entries, columns, heads) and return it.

    Its forward is unchanged: an attention module's head bookkeeping (``num_attention_heads``,
    ``all_head_size``, ...) is set to the kept heads so that its reshapes fit the smaller projections.
    """
    modules = dict(work.named_modules())
    _slice_layers(modules, plan)
    for owner, layout in plan.get("head_layouts", {}).items():
        kept, head_dim = layout["kept"], layout["head_dim"]
        if len(kept) == layout["heads"]:
            continue
        if kept:
            index = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept]).tolist()
            heads, width = len(kept), head_dim
        else:  # the forward's reshapes need a head: one zero head, as narrow as the module's bookkeeping allows
            heads, width = 1, layout.get("min_width", head_dim)
            index = list(range(width))
        for name in layout["qkv"]:
            _slice(modules[name], name, rows=index)
        _slice(modules[layout["projection"]], layout["projection"], columns=index)
        set_head_count(modules[owner], layout["heads"], heads, head_dim, width)
    return work


def _as_tuple(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)


def _check_values(model: nn.Module, example_inputs: tuple) -> None:
    """Refuse what prune cannot fold exactly: tensors without data (meta) and NaN or infinite values."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    named = [(name, t) for name, t in tensors if t.is_floating_point()]
    inputs = [(f"example_inputs[{i}]", t) for i, t in enumerate(example_inputs) if isinstance(t, Tensor)]
    on_meta = [name for name, t in named + inputs if t.is_meta]
    if on_meta:
        raise ValueError(f"prune reads the weights' values to find the closed units, but {on_meta[0]!r} is on the meta device, "
                         "which holds none: materialise the model first (model.to_empty(device=...) and load_state_dict)")
    for name, tensor in named + [(n, t) for n, t in inputs if t.is_floating_point()]:
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(tensor.isnan().sum())
            raise ValueError(f"prune: {name!r} has {nan} NaN and {int((~finite).sum()) - nan} infinite values; the pruned model "
                             "would carry them. Training has diverged: prune the last checkpoint with finite values")


def prune(model: nn.Module, example_inputs, return_plan: bool = False, round_to: int = 1):
    """A physically smaller plain PyTorch model with the gated model's eval outputs.

    Args:
        model: a model with gates (from :func:`l0sparse.sparsify` or the paper's layers).
        example_inputs: a batch (tensor or tuple of forward arguments) to trace with.
        return_plan: also return the plan (JSON-serialisable: kept indices per
            module) that :func:`rebuild` needs to make an empty module of the
            pruned shapes, e.g. to load a saved ``state_dict``.
        round_to: round every kept count of channels, units and selected input
            features up to a multiple of this (capped at the layer's size) by
            keeping some closed ones, whose weights are zero, so the outputs do
            not change. Convolutions on CPUs with 16-float SIMD registers
            (AVX-512) run fastest with channel counts that are multiples of 16
            (docs/sparsify.md, "Latency benchmark"). Heads are not rounded.

    Returns:
        A ``torch.fx.GraphModule`` (or ``(module, plan)``); for a model that
        only torch.export traces, a copy of the model's own class with its
        layers sliced (``plan["tracer"] == "export"``). A model without
        gates gives an unchanged copy, with a warning.
    """
    example_inputs = _as_tuple(example_inputs)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int (1: no rounding), got {round_to!r}")
    _check_values(model, example_inputs)
    if not _has_gates(model):
        warnings.warn("prune: the model has no l0sparse gates; returning an unchanged copy", stacklevel=2)
        copied = copy.deepcopy(model)
        return (copied, {"rows": {}, "followers": {}, "columns": {}, "selections": [], "heads": {}, "inline": []}) if return_plan else copied
    # Linear layers whose input columns carry gates (paper layers, "in" and "heads" rules)
    column_gated = {name for name, module, tensor_name, mask in gate_masks(model) if isinstance(module, nn.Linear) and mask.dim == 1}
    column_gated |= {name for name, module in model.named_modules() if isinstance(module, L0Linear)}
    work = plain_copy(model)
    graph = trace_channels(work, example_inputs)
    if graph.tracer == "export":  # no fx graph to rewrite: slice the copy's own modules, its forward unchanged
        plan = _make_plan(graph, column_gated, round_to, can_select=False)
        plan["tracer"] = "export"
        plan["head_layouts"] = _head_layouts(model, work)
        pruned = _apply_module_plan(work, plan)
    else:
        plan = _make_plan(graph, column_gated, round_to)
        pruned = _apply_plan(graph, plan)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected, got = model(*example_inputs), pruned(*example_inputs)
    finally:  # the user's model leaves in the mode it came in, whatever happened
        model.train(was_training)
    _check_same(expected, got)
    return (pruned, plan) if return_plan else pruned


def _check_same(expected, got) -> None:
    expected_leaves, got_leaves = [], []
    fx.node.map_aggregate(expected, lambda t: expected_leaves.append(t) if isinstance(t, Tensor) else None)
    fx.node.map_aggregate(got, lambda t: got_leaves.append(t) if isinstance(t, Tensor) else None)
    for a, b in zip(expected_leaves, got_leaves):
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):  # NaN compares false: no check would be made
            raise ValueError("prune: the gated model's output on example_inputs is not finite (NaN or inf), so the pruned "
                             "model cannot be checked against it: look for an overflow in the model or its inputs")
        scale = float(a.abs().max()) if a.numel() else 0.0
        error = float((a - b).abs().max()) if a.numel() and a.shape == b.shape else 0.0
        if a.shape != b.shape or not math.isfinite(error) or error > 1e-4 * max(scale, 1e-12) + 1e-6:
            raise RuntimeError(
                f"prune: the pruned model's output differs from the gated model's by {error:.3g} (output scale {scale:.3g}); "
                "an operation in the model is not handled exactly; please report it"
            )


def rebuild(model: nn.Module, plan: dict, example_inputs) -> nn.Module:
    """An untrained module of the pruned shapes, from a fresh model of the original architecture and a plan.

    ``model`` is built the way the original was (gated or not); its weights
    are thrown away, so load the pruned ``state_dict`` into the result::

        pruned, plan = l0sparse.prune(gated, x, return_plan=True)
        torch.save(pruned.state_dict(), "pruned.pt"); json.dump(plan, open("plan.json", "w"))
        ...
        empty = l0sparse.rebuild(MyNet(), json.load(open("plan.json")), x)
        empty.load_state_dict(torch.load("pruned.pt", weights_only=True))
    """
    if plan.get("tracer") == "export":  # the model's own modules, sliced in place: nothing to trace
        return _apply_module_plan(plain_copy(model), plan)
    graph = trace_channels(plain_copy(model), _as_tuple(example_inputs))
    return _apply_plan(graph, plan)
