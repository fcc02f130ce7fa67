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
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .graph import ChannelGraph, check_module, evaluating, example_tuple, run_batch, trace_channels
from .stream import apply_hidden_plan, compare_on_kept, prune_hidden
from .layers import L0Layer
from .ops import (LinearRule, fused_head_layout, input_dim, fused_rows, fused_unit_layouts, grouped_heads_kept, head_layouts, inline_encoder,
                  module_rule, quantities, record_pruned_heads, remove_heads, set_attributes, set_head_count, set_kv_groups, set_submodule,
                  unit_rows, weight_product, weight_widths)
from .sites import find_gates, gate_masks, gate_sites, raw_tensor, run_plainly, tied_tensors

__all__ = ["prune", "rebuild", "plain_copy", "PrunePlan", "Selection"]


@dataclass
class Selection:
    """An ``index_select`` of the kept ``index`` entries along ``dim`` of ``module``'s input, added before its calls."""

    module: str
    dim: int
    index: list[int]


@dataclass
class PrunePlan:
    """What prune keeps, as indices into the gated model's modules: enough for :func:`rebuild` to make the pruned
    shapes from a fresh model. :meth:`to_json` / :meth:`from_json` round-trip it through JSON."""

    rows: dict[str, list[int]] = field(default_factory=dict)  # producer -> kept output rows
    followers: dict[str, list[int]] = field(default_factory=dict)  # BatchNorm, norms, depthwise conv -> kept entries
    columns: dict[str, list[int]] = field(default_factory=dict)  # consumer -> kept input columns
    selections: list[Selection] = field(default_factory=list)
    heads: dict[str, list[int]] = field(default_factory=dict)  # nn.MultiheadAttention -> kept heads
    inline: list[str] = field(default_factory=list)  # nn.TransformerEncoderLayer calls rewritten step by step
    tracer: str = "fx"  # "export": the model's own modules sliced in place (its forward unchanged)
    head_layouts: dict[str, dict] = field(default_factory=dict)  # export only: sparsify.head_layouts, each with "kept"
    hidden: dict = field(default_factory=dict)  # l0sparse.core.stream.prune_hidden's plan, applied first; empty: no hidden gate

    def to_json(self) -> dict:
        """A JSON-serialisable dict (the format plans have been saved in: "tracer" and "head_layouts" for export only)."""
        data = {"rows": self.rows, "followers": self.followers, "columns": self.columns,
                "selections": [asdict(selection) for selection in self.selections], "heads": self.heads, "inline": self.inline}
        if self.tracer != "fx":
            data.update(tracer=self.tracer, head_layouts=self.head_layouts)
        if self.hidden:
            data["hidden"] = self.hidden
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> PrunePlan:
        """The plan of :meth:`to_json`'s dict (a saved plan without the newer keys reads as their defaults)."""
        if isinstance(data, PrunePlan):
            return data
        return cls(rows=dict(data["rows"]), followers=dict(data["followers"]), columns=dict(data["columns"]),
                   selections=[Selection(**selection) for selection in data["selections"]], heads=dict(data.get("heads", {})),
                   inline=list(data.get("inline", [])), tracer=data.get("tracer", "fx"), head_layouts=dict(data.get("head_layouts", {})),
                   hidden=dict(data.get("hidden", {})))


@torch.no_grad()
def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every gate folded into its weights and the paper's layers made plain."""
    work = copy.deepcopy(model).eval()
    tied = tied_tensors(work)
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
        if isinstance(module, L0Layer):
            set_submodule(work, name, module.plain())
    run_plainly(work)  # no gates are left to skip units by
    _retie(work, tied)
    return work


def _retie(model: nn.Module, tied: list[list[tuple[str, str]]]) -> None:
    """Share again a tensor that folding a gate copied (a head tied to its embedding) where the copies are still equal
    (the gate is 1 on all of it): else prune's model would hold it twice (issue #27: 162 parameters for 102)."""
    for group in tied:
        modules = [model.get_submodule(name) for name, _ in group]
        tensors = [getattr(module, tensor_name) for module, (_, tensor_name) in zip(modules, group)]
        first = tensors[0]
        if all(isinstance(t, nn.Parameter) and t.shape == first.shape and torch.equal(t, first) for t in tensors):
            for module, (_, tensor_name) in zip(modules, group):
                setattr(module, tensor_name, first)


def _column_open(module: nn.Module) -> Tensor:
    """Per input column of ``module``'s weight (dim 1, or 0 for a weight stored [in, out]): does any weight in it differ
    from zero? On the CPU, where plans are made."""
    columns = input_dim(module)
    return module.weight.ne(0).movedim(columns, 0).reshape(module.weight.shape[columns], -1).any(1).cpu()


def _row_open(module: nn.Module) -> Tensor:
    """Per output row of ``module``'s weight (dim 0, or 1 for a weight stored [in, out]): does any weight differ from zero?"""
    rows = 1 - input_dim(module)
    return module.weight.ne(0).movedim(rows, 0).flatten(1).any(1).cpu()


def _round_up(is_open: Tensor, multiple: int, minimum: int = 1) -> Tensor:
    """``is_open`` with its first closed entries kept too until the count is a multiple of ``multiple`` (or all),
    and at least ``minimum``."""
    count = int(is_open.sum())
    wanted = min(is_open.numel(), -(-max(count, minimum) // multiple) * multiple)
    if wanted > count:
        is_open = is_open.clone()
        is_open[torch.nonzero(~is_open).flatten()[: wanted - count]] = True
    return is_open


def _round_up_granules(is_open: Tensor, multiple: int, minimum: int, granule: int) -> Tensor:
    """:func:`_round_up` where channels go only ``granule`` at a time: a granule is kept whole when any of its
    channels is, and the count is rounded up to a multiple of both ``multiple`` and ``granule``."""
    if granule == 1:
        return _round_up(is_open, multiple, minimum)
    kept = _round_up(is_open.view(-1, granule).any(1), math.lcm(multiple, granule) // granule, -(-minimum // granule))
    return kept.repeat_interleave(granule)


def _make_plan(graph: ChannelGraph, column_gated: set[str] = frozenset(), round_to: int = 1, can_select: bool = True) -> PrunePlan:
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
        is_open, rounded, keep = _space_kept(graph, space, modules, round_to)
        if keep.numel() < space.size:
            for producer in space.producers:
                rows[producer] = keep.tolist()
            for follower in space.followers:
                followers[follower] = keep.tolist()
        for consumer in space.consumers:
            remaining[consumer.name] = (keep[:, None] * consumer.block + torch.arange(consumer.block)).flatten()
            # with round_to 1 the one zero channel kept for an all-closed space needs no columns kept for it
            revived[consumer.name] = (rounded & ~is_open & (round_to > 1))[keep].repeat_interleave(consumer.block)
    _plan_units_inside(modules, round_to, rows, remaining, revived)
    columns, selections = _plan_columns(graph, modules, remaining, revived, column_gated, round_to, can_select)
    heads: dict[str, list[int]] = {}
    for name in sorted(graph.removable_heads):
        is_open = module_rule(modules[name]).open_heads(modules[name])
        if not is_open.all():  # a closed head's output columns are zero after folding
            heads[name] = torch.nonzero(is_open).flatten().tolist() or [0]  # keep one (zero) head rather than none
    inline = sorted(e for e in graph.inlined_encoders if f"{e}.self_attn" in heads)
    return PrunePlan(rows, followers, columns, selections, heads, inline)


def _space_kept(graph: ChannelGraph, space, modules: dict, round_to: int) -> tuple[Tensor, Tensor, Tensor]:
    """(open, kept after rounding, kept indices) of a space's channels: open where some consumer reads it (and, in a
    zero-preserving space, some producer makes it); every channel of a space that cannot shrink."""
    if not space.removable:
        everything = torch.ones(space.size, dtype=torch.bool)
        return everything, everything, torch.arange(space.size)
    is_open = torch.zeros(space.size, dtype=torch.bool)
    for consumer in space.consumers:
        is_open |= _column_open(modules[consumer.name]).view(space.size, consumer.block).any(1)
    if space.zero_preserving and not space.followers and space.producers:
        # channels that every producer outputs as exactly 0 (closed L0Conv2d channels) reach no one
        produced = torch.zeros(space.size, dtype=torch.bool)
        for producer in space.producers:
            module = modules[producer]
            produced |= _row_open(module)
            if module.bias is not None:
                produced |= module.bias.ne(0).cpu()
        is_open &= produced
    # a closed channel kept by rounding has zero columns in every consumer: the output is unchanged
    rounded = _round_up_granules(is_open, round_to, 0 if graph.can_empty(space) else 1, space.granule)
    return is_open, rounded, torch.nonzero(rounded).flatten()  # empty only between Linear layers sliced in place


def _plan_units_inside(modules: dict, round_to: int, rows: dict, remaining: dict, revived: dict) -> None:
    """Add the units that traced leaves slice inside themselves (an encoder layer's feed-forward, as its rule names)."""
    for name, module in modules.items():
        inside = (rule := module_rule(module)) is not None and rule.units_inside(module)
        if not inside:
            continue
        producer, consumer = inside
        is_open = _column_open(module.get_submodule(consumer))
        rounded = _round_up(is_open, round_to)
        keep = torch.nonzero(rounded).flatten()
        if keep.numel() < is_open.numel():
            rows[f"{name}.{producer}"] = keep.tolist()
            remaining[f"{name}.{consumer}"] = keep
            revived[f"{name}.{consumer}"] = (rounded & ~is_open)[keep]


def _plan_fused_units(work: nn.Module, plan: PrunePlan, round_to: int) -> None:
    """Add the units of feed-forward blocks with a fused input projection (:class:`l0sparse.core.ops.FusedUnits`): the
    consumer keeps its open columns (at least one), the producer those units' rows in every segment. The split of the
    fused rows locks their channel space, so the plan has nothing for them yet."""
    modules = dict(work.named_modules())
    for consumer, layout in fused_unit_layouts(work).items():
        producer = layout["producer"]
        if consumer in plan.columns or producer in plan.rows:
            continue
        is_open = _round_up(_column_open(modules[consumer]), round_to)
        if not is_open.all():
            kept = torch.nonzero(is_open).flatten().tolist()
            plan.columns[consumer] = kept
            plan.rows[producer] = unit_rows(kept, is_open.numel(), layout["segments"])


def _plan_columns(graph: ChannelGraph, modules: dict, remaining: dict, revived: dict, column_gated: set[str], round_to: int,
                  can_select: bool) -> tuple[dict[str, list[int]], list[Selection]]:
    """The columns each consumer keeps, and the index_selects that feed it only those (see :func:`_make_plan`)."""
    columns: dict[str, list[int]] = {}
    selections: list[Selection] = []
    for name, fed in remaining.items():
        is_open = _round_up(_column_open(modules[name])[fed] | revived[name], round_to)
        if not can_select:
            is_open = torch.ones_like(is_open)
        kept = fed[is_open]
        columns[name] = kept.tolist()
        if kept.numel() < fed.numel() and name in graph.module_input:
            positions = torch.nonzero(is_open).flatten()
            dim = -1 if isinstance(modules[name], nn.Linear) else 1
            selections.append(Selection(name, dim, positions.tolist()))
    called = {node.target for node in graph.graph_module.graph.nodes if node.op == "call_module"}
    for name in sorted((column_gated & called) - remaining.keys() if can_select else ()):  # not the insides of attention modules
        is_open = _round_up(_column_open(modules[name]), round_to)
        if isinstance(modules[name], nn.Linear) and not is_open.all():
            kept = torch.nonzero(is_open).flatten().tolist()
            columns[name] = kept
            selections.append(Selection(name, -1, kept))
    return columns, selections


def _slice(module: nn.Module, name: str, rows=None, columns=None, follower=None) -> None:
    """Keep ``rows``, ``columns`` or a follower's ``entries`` of ``module``, as its operation's rule slices them."""
    module_rule(module).slice(module, rows=rows, columns=columns, entries=follower)


def _slice_layers(modules: dict[str, nn.Module], plan: PrunePlan) -> None:
    """Slice the plan's producer rows, follower entries and consumer columns, in place."""
    for name, rows in plan.rows.items():
        _slice(modules[name], name, rows=rows)
    for name, entries in plan.followers.items():
        _slice(modules[name], name, follower=entries)
    for name, columns in plan.columns.items():
        if len(columns) != modules[name].weight.shape[input_dim(modules[name])]:
            _slice(modules[name], name, columns=columns)


def _apply_plan(graph: ChannelGraph, plan: PrunePlan) -> fx.GraphModule:
    graph_module = graph.graph_module
    _slice_layers(dict(graph_module.named_modules()), plan)
    for name in plan.inline:
        inline_encoder(graph_module, name)
    for name, kept in plan.heads.items():
        remove_heads(graph_module, name, kept)
    for number, selection in enumerate(plan.selections):
        buffer = f"kept_inputs_{number}"
        device = next(graph_module.parameters(), torch.empty(0)).device  # the index must live where the inputs do
        graph_module.register_buffer(buffer, torch.as_tensor(selection.index, dtype=torch.long, device=device))
        for node in list(graph_module.graph.nodes):
            if node.op == "call_module" and node.target == selection.module:
                with graph_module.graph.inserting_before(node):
                    index = graph_module.graph.get_attr(buffer)
                    picked = graph_module.graph.call_function(torch.index_select, (node.args[0], selection.dim, index))
                node.args = (picked, *node.args[1:])
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


def _head_layouts(gated: nn.Module, work: nn.Module) -> dict[str, dict]:
    """:func:`head_layouts` of ``gated``, each with the heads whose projection columns are not all zero in
    ``work`` (folded): ``"kept"`` (empty when every head, or the block, is closed). Under grouped-query attention
    ``"kept"`` is what stays (:func:`grouped_heads_kept`: closed heads that fill a group included), so that
    ``config.pruned_heads`` records only the heads that left."""
    modules = dict(work.named_modules())
    layouts = head_layouts(gated)
    for layout in layouts.values():
        projection = modules[layout["projection"]]
        is_open = _column_open(projection).view(layout["heads"], layout["head_dim"]).any(1)
        layout["kept"] = torch.nonzero(is_open).flatten().tolist()
        if "kv" in layout:
            layout["kept"] = grouped_heads_kept(layout["kept"], layout["heads"], layout["kv_heads"])[0]
    return layouts


@torch.no_grad()
def _apply_module_plan(work: nn.Module, plan: PrunePlan) -> nn.Module:
    """Slice ``work``'s own modules as ``plan`` says (rows, follower entries, columns, heads) and return it.

    Its forward is unchanged: an attention module's head bookkeeping (``num_attention_heads``,
    ``all_head_size``, ...) is set to the kept heads so that its reshapes fit the smaller projections,
    and a Hugging Face model's ``config.pruned_heads`` records the removed ones (:func:`record_pruned_heads`).
    """
    modules = dict(work.named_modules())
    shared = _shared_settings(modules, plan.head_layouts)  # refused before anything is sliced
    _slice_layers(modules, plan)
    for owner, layout in plan.head_layouts.items():
        kept, head_dim = layout["kept"], layout["head_dim"]
        if len(kept) == layout["heads"]:
            continue
        if "kv" in layout:  # grouped-query attention
            _remove_grouped_heads(modules, owner, layout)
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
    record_pruned_heads(work, plan.head_layouts)  # a Hugging Face model's config.pruned_heads
    for config, attribute, value in shared:  # after the record, which reads the original head count
        setattr(config, attribute, value)
    return work


def _kept_quantities(layout: dict) -> dict[str, int]:
    """:func:`quantities` of what prune keeps of a fused or grouped attention module (:func:`grouped_heads_kept`)."""
    if len(layout["kept"]) == layout["heads"]:
        return quantities(layout["heads"], layout["kv_heads"], layout["head_dim"])
    query_heads, groups = grouped_heads_kept(layout["kept"], layout["heads"], layout["kv_heads"])
    return quantities(len(query_heads), len(groups), layout["head_dim"])


def _shared_settings(modules: dict[str, nn.Module], layouts: dict[str, dict]) -> list[tuple[object, str, int]]:
    """(config, attribute, value) for each ``"shared"`` setting of a fused layout (:class:`l0sparse.core.ops.FusedHeads`): a
    head count that every layer's forward reads from one config. Refused, naming the modules, where the layers sharing
    the config keep different counts (a module of the kind without a plan keeps all its heads)."""
    values: dict[tuple[int, str], dict[int, list[str]]] = {}
    configs: dict[int, object] = {}
    for name, module in modules.items():
        config = getattr(module, "config", None)
        layout = layouts.get(name)
        if layout is None and config is not None and (found := fused_head_layout(name, module)) is not None:
            layout = {**found, "kept": list(range(found["heads"]))}
        if layout is None or not layout.get("shared"):
            continue
        kept = _kept_quantities(layout)
        configs[id(config)] = config
        for attribute, quantity in layout["shared"].items():
            values.setdefault((id(config), attribute), {}).setdefault(kept[quantity], []).append(name)
    for (_, attribute), found in values.items():
        if len(found) > 1:
            listed = "; ".join(f"{value} in {names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                               for value, names in sorted(found.items()))
            raise ValueError(f"prune: the attention modules read config.{attribute} (one value for every layer) but keep different "
                             f"counts: {listed}. Their heads can be pruned only to the same count in every layer: a shape "
                             "(l0sparse.hf.prune_to_shape), or gates that close as many heads in every layer")
    return [(configs[key], attribute, next(iter(found))) for (key, attribute), found in values.items()]


def _remove_grouped_heads(modules: dict[str, nn.Module], owner: str, layout: dict) -> None:
    """Slice a grouped-query attention module to the query heads and key/value heads that
    :func:`grouped_heads_kept` keeps, and set its query heads per key/value head."""
    head_dim = layout["head_dim"]
    query_heads, groups = grouped_heads_kept(layout["kept"], layout["heads"], layout["kv_heads"])
    rows = lambda heads: [h * head_dim + i for h in heads for i in range(head_dim)]  # noqa: E731
    for name in layout["qkv"]:
        _slice(modules[name], name, rows=rows(query_heads))
    for name in layout["kv"]:
        _slice(modules[name], name, rows=rows(groups))
    for name, blocks in layout.get("fused", {}).items():  # fused q/k/v: the rows of the heads kept
        _slice(modules[name], name, rows=fused_rows(blocks, head_dim, query_heads, groups))
    _slice(modules[layout["projection"]], layout["projection"], columns=rows(query_heads))
    set_kv_groups(modules[owner], len(query_heads) // len(groups))
    set_attributes(modules[owner], layout.get("set", {}), quantities(len(query_heads), len(groups), head_dim))


def _check_values(model: nn.Module, example_inputs: tuple) -> None:
    """Refuse what prune cannot fold exactly: tensors without data (meta) and NaN or infinite values."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    named = [(name, t) for name, t in tensors if t.is_floating_point()]
    inputs = example_tuple(example_inputs, "prune").named_tensors()
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
        return_plan: also return the plan (:meth:`PrunePlan.to_json`: a
            JSON-serialisable dict of kept indices per module) that
            :func:`rebuild` needs to make an empty module of the pruned
            shapes, e.g. to load a saved ``state_dict``.
        round_to: round every kept count of channels, units and selected input
            features up to a multiple of this (capped at the layer's size) by
            keeping some closed ones, whose weights are zero, so the outputs do
            not change. Convolutions on CPUs with 16-float SIMD registers
            (AVX-512) run fastest with channel counts that are multiples of 16
            (docs/sparsify.md, "Latency benchmark"). Heads are not rounded, nor
            the kept dimensions of a hidden gate (l0sparse.core.stream; found by l0sparse.hf.hidden): a closed
            dimension kept would enter the LayerNorms' statistics.

    Returns:
        A ``torch.fx.GraphModule`` (or ``(module, plan)``); for a model that
        only torch.export traces, a copy of the model's own class with its
        layers sliced (``plan["tracer"] == "export"``). A model without
        gates gives an unchanged copy, with a warning.
    """
    check_module(model, "prune")
    example_inputs = example_tuple(example_inputs, "prune")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int (1: no rounding), got {round_to!r}")
    _check_values(model, example_inputs)
    if not find_gates(model):
        warnings.warn("prune: the model has no l0sparse gates; returning an unchanged copy", stacklevel=2)
        copied = copy.deepcopy(model)
        return (copied, PrunePlan().to_json()) if return_plan else copied
    # Linear layers whose input columns carry gates (paper layers, "in" and "heads" rules)
    column_gated = {site.name for site in gate_sites(model) if isinstance(module_rule(site.module), LinearRule) and site.dim == 1}
    work = plain_copy(model)
    hidden = prune_hidden(work)  # the closed dimensions of a hidden gate's residual stream (l0sparse.core.stream; found by l0sparse.hf.hidden), first
    graph = trace_channels(work, example_inputs)
    if graph.slices_in_place:  # no fx graph to rewrite: slice the copy's own modules, its forward unchanged
        plan = _make_plan(graph, column_gated, round_to, can_select=False)
        _plan_fused_units(work, plan, round_to)
        plan.tracer, plan.head_layouts = "export", _head_layouts(model, work)
        pruned = _apply_module_plan(work, plan)
    else:
        plan = _make_plan(graph, column_gated, round_to)
        _plan_fused_units(work, plan, round_to)
        pruned = _apply_plan(graph, plan)
    plan.hidden = hidden or {}
    with evaluating(model), torch.no_grad():  # the user's model leaves in the mode it came in, whatever happened
        expected, got = run_batch(model, example_inputs), run_batch(pruned, example_inputs)
    _check_same(expected, got, hidden)
    _warn_kept_closed(model, pruned)
    return (pruned, plan.to_json()) if return_plan else pruned


@torch.no_grad()
def _warn_kept_closed(gated: nn.Module, pruned: nn.Module) -> None:
    """Warn, naming the layers, where closed input columns of a gated Linear all stayed: zeros prune could not remove
    (a space something locks, heads kept to give key/value groups equal counts, a rule placed where nothing follows)."""
    pruned_modules = dict(pruned.named_modules())
    closed: dict[str, tuple[int, int]] = {}
    for name, module, tensor_name, mask in gate_masks(gated):
        after = pruned_modules.get(name)
        if tensor_name != "weight" or not _is_matrix_product(module) or not _is_matrix_product(after) or mask.dim != input_dim(module):
            continue  # a Linear's columns, or a transposed weight's rows (transformers' Conv1D): as its rule reads them
        shut = int((mask.gate.deterministic() == 0).sum()) * mask.block
        width = weight_widths(module)[1]
        if shut and weight_widths(after)[1] == width:
            count, _ = closed.get(name, (0, width))
            closed[name] = (count + shut, width)
    if closed:
        listed = ", ".join(f"{name!r} ({count} of {width})" for name, (count, width) in list(closed.items())[:5])
        more = f" and {len(closed) - 5} more" if len(closed) > 5 else ""
        warnings.warn(f"prune: closed input columns stay as zeros in {listed}{more}: the outputs are exact, but nothing of "
                      "these layers was removed (their channels are locked, or kept for key/value groups of equal size)", stacklevel=3)


def _is_matrix_product(module: nn.Module | None) -> bool:
    """A weight product whose weight is a matrix (a Linear, or a transposed one): its input columns are whole inputs."""
    return module is not None and weight_product(module) is not None and raw_tensor(module, "weight").dim() == 2


def _check_same(expected, got, hidden: dict | None = None) -> None:
    expected_leaves, got_leaves = [], []
    fx.node.map_aggregate(expected, lambda t: expected_leaves.append(t) if isinstance(t, Tensor) else None)
    fx.node.map_aggregate(got, lambda t: got_leaves.append(t) if isinstance(t, Tensor) else None)
    for a, b in zip(expected_leaves, got_leaves):
        a = compare_on_kept(a, b, hidden)  # a hidden gate's stream has its kept dimensions left
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


def _check_plan(model: nn.Module, plan: PrunePlan) -> None:
    """Every module a plan slices exists in ``model``, and its indices are whole numbers within that module's
    rows, columns or entries: a plan of another model fails here, naming the module, not as a KeyError or IndexError
    (or not at all: a name that matched nothing was skipped)."""
    modules = dict(model.named_modules())
    sizes = {"rows": ("out_features", "out_channels", "num_features", "num_channels"),
             "columns": ("in_features", "in_channels"), "followers": ("num_features", "num_channels", "out_channels")}
    for part, attributes in sizes.items():
        for name, indices in getattr(plan, part).items():
            if name not in modules:
                raise ValueError(f"rebuild: the plan's {part} name module {name!r}, which this model does not have; was the "
                                 "plan made for another model?")
            # a grouped conv's columns count all its input channels; a module without such a size is not range-checked
            size = next((getattr(modules[name], a) for a in attributes if isinstance(getattr(modules[name], a, None), int)), None)
            if not (isinstance(indices, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (size or i + 1)
                                                      for i in indices)):
                raise ValueError(f"rebuild: the plan's {part} of {name!r} must list indices in [0, {size}), got {indices!r}; "
                                 "was the plan made for another model, or edited?")


def rebuild(model: nn.Module, plan: PrunePlan | Mapping, example_inputs) -> nn.Module:
    """An untrained module of the pruned shapes, from a fresh model of the original architecture and a plan.

    ``model`` is built the way the original was (gated or not); its weights
    are thrown away, so load the pruned ``state_dict`` into the result::

        pruned, plan = l0sparse.prune(gated, x, return_plan=True)
        torch.save(pruned.state_dict(), "pruned.pt"); json.dump(plan, open("plan.json", "w"))
        ...
        empty = l0sparse.rebuild(MyNet(), json.load(open("plan.json")), x)
        empty.load_state_dict(torch.load("pruned.pt", weights_only=True))
    """
    try:
        plan = PrunePlan.from_json(plan)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"rebuild: plan is not a prune plan ({type(error).__name__}: {error}); pass what "
                         "prune(..., return_plan=True) returned (or its JSON)") from None
    work = plain_copy(model)
    _check_plan(work, plan)
    if plan.hidden:
        apply_hidden_plan(work, plan.hidden)
    if plan.tracer == "export":  # the model's own modules, sliced in place: nothing to trace
        return _apply_module_plan(work, plan)
    graph = trace_channels(work, example_tuple(example_inputs, "rebuild"))
    return _apply_plan(graph, plan)
