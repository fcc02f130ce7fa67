"""Channel spaces of a traced model: which channels must be gated and removed together.

A *space* is a set of channels (features of a Linear, channels of a conv)
that flow through channel-wise operations (activations, BatchNorm, pooling,
depthwise convs, residual additions, flatten) and are finally read by
*consumers*: Linear layers and ungrouped convs, which mix channels. Channels
joined by an addition land in one space. l0sparse gates a space on its
consumers' inputs (their weight columns): when a gate is closed no consumer
reads the channel, so every producer row, BatchNorm entry and consumer column
of that channel can be removed exactly, whatever the channel-wise operations
in between did to its values. A norm over the channels (GroupNorm, a
LayerNorm over C) makes them go only a whole group at a time (``granule``).

A space is *locked* (its channels cannot be removed) when something reads it
that cannot be gated or sliced: the model's output, a norm over more than the
channels, a reshape other than flatten and permute, a concatenation, a grouped
conv, an attention module, or an operation without a rule.

What each operation does to the spaces is its rule's business
(:mod:`l0sparse.core.ops`); this module runs the tracer, walks the graph and
hands each node to its rule.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import re
import sys
import traceback
import typing
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .gates import Gate
from .layers import L0Layer
from .ops import ConvRule, LinearRule, aten_as_torch, aten_owners, function_rule, module_rule, node_inputs, user_rule_applies

__all__ = ["Space", "Consumer", "ChannelGraph", "Batch", "trace_channels", "check_example_batch", "example_tuple", "check_module",
           "run_batch"]


@dataclass
class Consumer:
    """A module that reads a space's channels through its weight columns."""

    name: str
    block: int = 1  # features per channel (after a flatten of a C×H×W map, block = H·W)
    dim: int = 1  # the weight dimension that holds the input channels


@dataclass
class Space:
    """Channels removed together."""

    size: int
    producers: list[str] = field(default_factory=list)  # Linear/conv whose output rows are these channels
    followers: list[str] = field(default_factory=list)  # BatchNorm, depthwise conv: one entry per channel
    consumers: list[Consumer] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)  # why channels cannot be removed
    is_input: bool = False  # the channels of a model input
    zero_preserving: bool = True  # a channel that a producer outputs as exactly 0 reaches every consumer as 0
    granule: int = 1  # channels removed only together, in aligned runs of this many (a GroupNorm's groups)

    @property
    def removable(self) -> bool:
        return not self.locked and not self.is_input and bool(self.consumers)


class ChannelGraph:
    """Result of :func:`trace_channels`: spaces, and for each module the spaces it touches."""

    def __init__(self, graph_module: fx.GraphModule, spaces: list[Space], module_output: dict[str, int],
                 module_input: dict[str, int], shapes: dict[str, tuple[torch.Size, torch.Size]]):
        self.graph_module = graph_module
        self.spaces = spaces
        self.module_output = module_output  # module name -> space of its output channels
        self.module_input = module_input  # module name -> space of its input channels
        self.shapes = shapes  # module name -> (input shape, output shape) of its first call on the example inputs
        # module name -> (input shape, output shape) of every call: a module called twice costs twice
        self.calls: dict[str, list[tuple[torch.Size, torch.Size]]] = {name: [shape] for name, shape in shapes.items()}
        self.attention_shapes: dict[str, tuple[torch.Size, torch.Size]] = {}  # attention module -> (query, key) shapes
        self.attention_module_calls: dict[str, list[tuple[torch.Size, torch.Size]]] = {}  # ... of every call
        # attention modules whose calls prune can rewrite without closed heads, and encoder layers it inlines for that
        self.removable_heads: set[str] = set()
        self.inlined_encoders: set[str] = set()
        # (query shape, key shape) of each scaled_dot_product_attention call outside attention modules
        self.attention_calls: list[tuple[torch.Size, torch.Size]] = []
        self.attention_call_modules: list[tuple[str, ...]] = []  # ... and the modules each ran in (torch.export only)
        self.products: list[tuple[int, tuple[str, ...]]] = []  # matmuls no Linear module owns: (MACs of the batch, modules)
        # MACs of the batch that torch.export's graph shows outside Linear and conv modules but count_flops counts:
        # an nn.MultiheadAttention's projections and its scores when written as bmm; counted, never reduced
        self.other_macs = 0
        # "fx": graph_module is the model's fx graph, runnable and rewritable; "export": read from torch.export's
        # ATen graph, for the analysis only (prune then slices the model's own modules)
        self.tracer = "fx"

    @property
    def slices_in_place(self) -> bool:
        """Whether prune slices the model's own modules, its forward unchanged (no graph to rewrite, so no index_select:
        a column goes only with its channel): the torch.export path. On the fx path prune rewrites the graph."""
        return self.tracer == "export"

    def space_of_output(self, name: str) -> Space | None:
        index = self.module_output.get(name)
        return None if index is None else self.spaces[index]

    def space_of_input(self, name: str) -> Space | None:
        index = self.module_input.get(name)
        return None if index is None else self.spaces[index]

    def can_empty(self, space: Space) -> bool:
        """Whether prune may remove every channel of ``space``: on the torch.export path (layers sliced in place,
        no index_select) when only nn.Linear layers make and read it, which run with zero features (a
        feed-forward block whose units are all closed); elsewhere one zero channel stays."""
        if not self.slices_in_place or not space.removable or space.followers or not space.producers:
            return False
        if not hasattr(self, "_modules"):  # CostModel asks on every costs() call: look the modules up once
            self._modules = dict(self.graph_module.named_modules())
        modules = self._modules
        names = [*space.producers, *(consumer.name for consumer in space.consumers)]
        return all(isinstance(module_rule(modules.get(name)), LinearRule) for name in names)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.spaces: list[Space] = []

    def new(self, size: int, **kwargs) -> int:
        self.parent.append(len(self.parent))
        self.spaces.append(Space(size, **kwargs))
        return len(self.parent) - 1

    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def union(self, a: int, b: int, why: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        first, second = self.spaces[a], self.spaces[b]
        if first.size != second.size:
            self.spaces[a].locked.append(f"{why} joins {first.size} and {second.size} channels")
        # a module called more than once appears in both: list it once, so no weight is gated or counted twice
        first.producers += [name for name in second.producers if name not in first.producers]
        first.followers += [name for name in second.followers if name not in first.followers]
        for consumer in second.consumers:
            _add_consumer(first, consumer)
        first.locked += second.locked
        first.is_input = first.is_input or second.is_input
        first.zero_preserving = first.zero_preserving and second.zero_preserving
        first.granule = math.lcm(first.granule, second.granule)
        self.parent[b] = a
        return a


@dataclass
class _Channels:
    space: int
    dim: int  # channel dimension of this tensor (non-negative)
    block: int = 1  # >1 after flatten: features per channel


def _add_consumer(space: Space, consumer: Consumer) -> None:
    """Add ``consumer`` to ``space`` once; one module reading the channels in two layouts cannot be sliced."""
    same_module = [c for c in space.consumers if c.name == consumer.name]
    if any(c != consumer for c in same_module):
        space.locked.append(f"{consumer.name} reads it in two layouts")
    if consumer not in same_module:
        space.consumers.append(consumer)


def _add_follower(space: Space, name: str) -> None:
    if name not in space.followers:
        space.followers.append(name)


class Batch(tuple):
    """Example inputs: the forward's positional arguments (the tuple itself) and its keyword arguments (``kwargs``)."""

    kwargs: dict

    def __new__(cls, args=(), kwargs: typing.Mapping | None = None) -> Batch:
        batch = super().__new__(cls, args)
        batch.kwargs = dict(kwargs or {})
        return batch

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of the batch with the name an error message gives it (``example_inputs[0]``, ``example_inputs['ids']``)."""
        named = [(f"example_inputs[{i}]", t) for i, t in enumerate(self)]
        named += [(f"example_inputs[{key!r}]", t) for key, t in self.kwargs.items()]
        return [(name, t) for name, t in named if isinstance(t, torch.Tensor)]

    def first_tensor(self) -> torch.Tensor:
        """The tensor whose first dimension counts the examples (the first positional one, else the first keyword one)."""
        tensors = self.named_tensors()
        if not tensors:
            raise ValueError("example_inputs hold no tensor: pass a batch (a tensor, a tuple of the forward's arguments, "
                             "or a dict of its keyword arguments)")
        return tensors[0][1]


def example_tuple(example_inputs, caller: str) -> Batch:
    """``example_inputs`` as a :class:`Batch`: a tensor alone is one positional argument; a tuple or list holds the
    positional arguments; a dict (``{"input_ids": ids, "attention_mask": mask}``) the keyword arguments."""
    if isinstance(example_inputs, Batch):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Batch((example_inputs,))
    if isinstance(example_inputs, (tuple, list)):
        return Batch(tuple(example_inputs))
    if isinstance(example_inputs, typing.Mapping):
        bad = [key for key in example_inputs if not isinstance(key, str)]
        if bad:
            raise TypeError(f"{caller}: example_inputs as a dict maps the forward's argument names to values; "
                            f"got the key {bad[0]!r}")
        return Batch((), example_inputs)
    raise TypeError(f"{caller}: example_inputs must be a batch (a tensor, a tuple or list of the forward's "
                    f"positional arguments, or a dict of its keyword arguments), got {type(example_inputs).__name__}")


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Run the block with ``model`` in eval mode; it leaves in the mode it came in, whatever happened."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_batch(model: nn.Module, batch: Batch):
    """``model`` called on ``batch``: its positional and keyword arguments."""
    return model(*batch, **getattr(batch, "kwargs", {}))


def check_module(model, caller: str) -> None:
    """Refuse a ``model`` that is not an ``nn.Module`` with its type, before anything reads it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")


def check_example_batch(example_inputs: tuple) -> None:
    """Refuse example inputs whose batch is empty: every count is per example, and nothing can be traced on none."""
    for name, tensor in example_tuple(example_inputs, "example_inputs").named_tensors():
        if tensor.dim() >= 1 and tensor.shape[0] == 0:
            raise ValueError(f"{name} has an empty batch (shape {tuple(tensor.shape)}): "
                             "pass at least one example")


def placement_mismatch(model: nn.Module, example_inputs: tuple) -> str | None:
    """Why the inputs cannot meet the model's parameters (device or dtype), or None."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parameter is None:
        return None
    for name, tensor in example_tuple(example_inputs, "example_inputs").named_tensors():
        if tensor.device != parameter.device:
            return (f"{name} is on {tensor.device} but the model's parameters are on {parameter.device}: "
                    "move the inputs or the model so that both are on one device")
        if tensor.is_floating_point() and tensor.dtype != parameter.dtype:
            return (f"{name} is {tensor.dtype} but the model's parameters are {parameter.dtype}: "
                    f"cast the inputs (x.to({parameter.dtype})) or the model")
    return None


def trace_channels(model: nn.Module, example_inputs: tuple) -> ChannelGraph:
    """Trace ``model`` and group its channels into spaces (see the module docstring).

    torch.fx is tried first (the models it follows keep their fx graph, which :func:`l0sparse.prune`
    rewrites); a model it cannot follow (Hugging Face encoders, data-dependent Python) is traced with
    ``torch.export`` and its ATen graph is read at the level of modules (``result.tracer == "export"``).
    """
    check_example_batch(example_inputs)
    graph_module, tracer = _traced_graph(model, example_inputs)
    trace = _Trace(graph_module, model)
    for node in graph_module.graph.nodes:
        trace.visit(node)
    return trace.result(tracer)


class _Trace:
    """One run of :func:`trace_channels`: the spaces found so far, and the moves an operation rule makes on them
    (:class:`l0sparse.core.ops.Trace`). It walks the graph and hands each node to its rule."""

    def __init__(self, graph_module: fx.GraphModule, model: nn.Module) -> None:
        self.graph_module = graph_module
        self.modules = dict(graph_module.named_modules())
        self.model_modules = dict(model.named_modules())
        self.uf = _UnionFind()
        self.channels: dict[fx.Node, _Channels] = {}
        self.module_output: dict[str, int] = {}
        self.module_input: dict[str, int] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self.calls: dict[str, list[tuple[torch.Size, torch.Size]]] = {}
        # every space each module read and wrote, over all its calls: joined at the end so that one module's
        # rows, columns and entries are sliced the same way for every call
        self.spaces_read: dict[str, list[int]] = {}
        self.spaces_written: dict[str, list[int]] = {}
        self.unfollowed: set[str] = set()  # modules with a call whose input channels are not followed
        self.attention_shapes: dict[str, tuple] = {}
        self.attention_calls_by_module: dict[str, list[tuple]] = {}
        self.removable_heads: set[str] = set()
        self.inlined_encoders: set[str] = set()
        self.attention_calls: list[tuple] = []
        self.attention_call_modules: list[tuple[str, ...]] = []
        self.products: list[tuple[int, tuple[str, ...]]] = []
        self.other_macs = 0

    # --- what rules read and do

    def shape(self, node) -> torch.Size | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(meta, "shape", None)

    def space(self, info: _Channels) -> Space:
        return self.uf.spaces[self.uf.find(info.space)]

    def size_of(self, info: _Channels) -> int:
        return self.space(info).size

    def module_paths(self, node: fx.Node) -> tuple[str, ...]:
        return _module_paths(node)

    def lock(self, node, why: str) -> None:
        info = self.channels.get(node) if isinstance(node, fx.Node) else None
        if info is not None:
            self.space(info).locked.append(why)

    def lock_all(self, args, why: str) -> None:
        for arg in node_inputs(args):
            self.lock(arg, why)

    def mark(self, node: fx.Node, space: int, dim: int, block: int = 1) -> None:
        self.channels[node] = _Channels(space, dim, block)

    def pass_on(self, node: fx.Node, source: _Channels, dim: int | None = None, block: int | None = None) -> None:
        """``node``'s output carries ``source``'s channels (at ``dim``, ``block`` features each, if given)."""
        self.mark(node, source.space, source.dim if dim is None else dim, source.block if block is None else block)

    def fresh(self, node: fx.Node, dim: int, why_locked: str | None = None, **kwargs) -> None:
        out_shape = self.shape(node)
        if out_shape is None or len(out_shape) == 0:
            return
        dim = dim % len(out_shape)
        index = self.uf.new(out_shape[dim], **kwargs)
        if why_locked:
            self.uf.spaces[index].locked.append(why_locked)
        self.channels[node] = _Channels(index, dim)

    def consume(self, name: str, source: _Channels, dim: int = 1) -> None:
        """``name`` reads ``source``'s channels through its weight's dimension ``dim``."""
        _add_consumer(self.space(source), Consumer(name, source.block, dim=dim))
        self.module_input[name] = source.space
        self.spaces_read.setdefault(name, []).append(source.space)

    def produce(self, node: fx.Node, name: str, dim: int, why_locked: str | None = None) -> None:
        """``node``'s output dimension ``dim`` holds new channels: the rows of ``name``."""
        self.fresh(node, dim, why_locked=why_locked, producers=[name])
        self.module_output[name] = self.channels[node].space
        self.spaces_written.setdefault(name, []).append(self.channels[node].space)

    def follow(self, node: fx.Node, name: str, source: _Channels, granule: int = 1, zero_preserving: bool = True) -> None:
        """``name`` keeps one entry per channel of ``source`` (BatchNorm, depthwise conv, norms over the channels),
        removable only ``granule`` at a time, and its output carries the same channels."""
        space = self.space(source)
        _add_follower(space, name)
        space.zero_preserving &= zero_preserving
        space.granule = math.lcm(space.granule, granule)
        self.module_input[name] = self.module_output[name] = source.space
        self.spaces_read.setdefault(name, []).append(source.space)
        self.channels[node] = source

    def not_zero_preserving(self, source: _Channels) -> None:
        self.space(source).zero_preserving = False

    def read_unfollowed(self, node: fx.Node, name: str, why: str, source: _Channels | None = None) -> None:
        """``name`` reads its input in a way that cannot drop single channels: lock them."""
        self.lock_all(node.args, why)
        self.unfollowed.add(name)
        if source is not None:
            self.module_input[name] = source.space

    def join(self, a: int, b: int, why: str) -> int:
        return self.uf.union(a, b, why)

    # --- the walk

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            node_shape = self.shape(node)
            if node_shape is not None and len(node_shape) >= 2:
                # an image-like input has its channels at dim 1, a feature vector at the last dim
                self.fresh(node, 1 if len(node_shape) >= 3 else -1, is_input=True)
            return
        if node.op == "output":
            self.lock_all(node.args, "the model output reads it")
            return
        if node.op == "get_attr":
            return
        source = self.channels.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            name, module = node.target, self.modules[node.target]
            in_shape, out_shape = self.shape(node.args[0]) if node.args else None, self.shape(node)
            if in_shape is not None and out_shape is not None:
                self.shapes.setdefault(name, (in_shape, out_shape))
                self.calls.setdefault(name, []).append((in_shape, out_shape))
            rule = module_rule(module)
            if rule is None or not rule.trace(self, node, name, module, source):
                self.lock_all(node.args, f"{type(module).__name__} {name!r} reads it and cannot be sliced")
                self.fresh(node, -1, why_locked=f"made by {type(module).__name__} {name!r}")
            return
        rule = function_rule(node)
        if rule is None or not rule.trace(self, node, source):
            what = getattr(node.target, "__name__", node.target)
            self.lock_all((node.args, node.kwargs), f"{what} reads it")
            self.fresh(node, -1, why_locked=f"made by {what}")

    def result(self, tracer: str) -> ChannelGraph:
        uf = self.uf
        for name, read in self.spaces_read.items():  # a module called more than once: its calls share rows and columns
            for other in read[1:]:
                uf.union(read[0], other, f"{name} (called {len(read)} times)")
            if name in self.unfollowed:
                uf.spaces[uf.find(read[0])].locked.append(f"{name} is called on it and on a tensor whose channels are not followed")
        for name, written in self.spaces_written.items():
            for other in written[1:]:
                uf.union(written[0], other, f"{name} (called {len(written)} times)")
        roots = sorted({uf.find(i) for i in range(len(uf.parent))})
        renumber = {root: position for position, root in enumerate(roots)}
        result = ChannelGraph(
            self.graph_module,
            [uf.spaces[root] for root in roots],
            {name: renumber[uf.find(i)] for name, i in self.module_output.items()},
            {name: renumber[uf.find(i)] for name, i in self.module_input.items()},
            self.shapes,
        )
        result.calls = self.calls
        result.attention_shapes = self.attention_shapes
        result.attention_module_calls = self.attention_calls_by_module
        result.removable_heads, result.inlined_encoders = self.removable_heads, self.inlined_encoders
        result.attention_calls = self.attention_calls
        result.attention_call_modules = self.attention_call_modules
        result.products = self.products
        result.other_macs = self.other_macs
        result.tracer = tracer
        return result


def _traced_graph(model: nn.Module, example_inputs: tuple) -> tuple[fx.GraphModule, str]:
    """A module-level graph of ``model`` with shapes in every node's ``tensor_meta``, and the tracer that made it."""
    example_inputs = example_tuple(example_inputs, "trace")
    try:
        if example_inputs.kwargs:  # fx's graph takes positional arguments only
            raise TypeError("keyword example_inputs are traced with torch.export")
        graph_module = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as fx_error:  # torch.fx raises many kinds: fall back on torch.export
        return _exported_graph(model, example_inputs, fx_error), "export"
    printed = io.StringIO()
    try:
        # ShapeProp prints the failing node's traceback to stderr before raising: the error raised here says it all
        with contextlib.redirect_stderr(printed):
            ShapeProp(graph_module).propagate(*example_inputs)
    except Exception as error:
        mismatch = placement_mismatch(model, example_inputs) or _integer_inputs(model, example_inputs, error)
        if mismatch is not None:  # not a shape error, whatever the failing layer said
            raise ValueError(mismatch) from error
        raise ValueError(f"example_inputs do not fit the model{_expected_input(model, example_inputs)}: {type(error).__name__}: {error}") from error
    sys.stderr.write(printed.getvalue())  # what the model itself printed, on a successful run
    return graph_module, "fx"


def _integer_inputs(model: nn.Module, example_inputs: tuple, error: Exception) -> str | None:
    """Why integer inputs failed where float weights multiply them (not a shape problem), or None."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    text = f"{error} {error.__cause__ or ''}"
    for position, tensor in enumerate(example_inputs):
        if (isinstance(tensor, torch.Tensor) and parameter is not None and not tensor.is_floating_point()
                and ("dtype" in text or "scalar type" in text)):
            return (f"example_inputs[{position}] is {tensor.dtype} but the model multiplies it with {parameter.dtype} weights: "
                    f"cast it (x.to({parameter.dtype})); integer inputs suit a model that starts with an embedding")
    return None


def _exported_graph(model: nn.Module, example_inputs: tuple, fx_error: Exception) -> fx.GraphModule:
    """``model`` traced by ``torch.export`` and rewritten so that :func:`trace_channels` reads it as an fx graph.

    Its ATen graph becomes: a ``call_module`` node for each ``aten.linear`` / ``aten.conv*`` that a Linear or
    conv module makes (found through ``nn_module_stack``, so a parametrized weight still counts as the module's),
    the torch function of each channel-wise or binary ATen op that the analysis knows, ``get_attr`` nodes for
    parameters, buffers and constants, and every other op as it is (an unknown op locks its channels).
    """
    mismatch = placement_mismatch(model, example_inputs)
    if mismatch is not None:
        raise ValueError(mismatch)
    try:
        # a failed export logs and prints its partial graph; the error raised here says where it failed
        with warnings.catch_warnings(), _quiet_logger("torch.fx.experimental.symbolic_shapes"), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            exported = torch.export.export(_tensor_outputs(model), tuple(example_inputs), kwargs=example_inputs.kwargs)
    except Exception as export_error:
        try:  # the model's own forward fails too: the inputs are at fault, not the tracers
            run_batch(model, example_inputs)
        except Exception as error:
            integer = _integer_inputs(model, example_inputs, error)
            if integer is not None:
                raise ValueError(integer) from error
            raise ValueError(f"example_inputs do not fit the model{_expected_input(model, example_inputs)}: "
                             f"{type(error).__name__}: {error}") from error
        raise ValueError(_untraceable_message(model, fx_error, export_error)) from export_error
    signature = exported.graph_signature
    held = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
            **getattr(signature, "inputs_to_lifted_tensor_constants", {})}
    modules = dict(model.named_modules())
    module_ops, function_ops = aten_owners(), aten_as_torch()
    state = {**dict(exported.named_parameters()), **dict(exported.named_buffers()), **exported.constants}
    graph = fx.Graph()
    root: dict[str, object] = {}
    env: dict[fx.Node, fx.Node] = {}
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in held:
            target = held[node.name]
            root[target] = state.get(target, torch.empty(0))
            copied = graph.get_attr(target)
        elif node.op == "call_function" and node.target in module_ops and node.args and (
                owner := _owning_module(node, modules, module_ops[node.target])) is not None:
            root[owner] = modules[owner]
            # the module's input: the op's first argument that is no parameter (addmm takes the bias first: Conv1D's)
            data = next((arg for arg in node.args if isinstance(arg, fx.Node) and arg.name not in held), node.args[0])
            copied = graph.call_module(owner, (env[data],))
        elif node.op == "call_function" and node.target in function_ops:  # an op a module rule names, outside such a module, too
            copied = graph.node_copy(node, lambda n: env[n])
            copied.target = function_ops[node.target]
        else:
            copied = graph.node_copy(node, lambda n: env[n])
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            copied.meta["tensor_meta"] = _Shape(value.shape)
        env[node] = copied
    return fx.GraphModule(root, graph)


def _tensor_outputs(model: nn.Module) -> nn.Module:
    """A view of ``model`` (the same submodules, parameters and names) whose forward returns only the tensors of
    ``model``'s output: what the analysis reads. Objects torch.export cannot return (a language model's KV cache)
    are left out, so the user's model and its config stay untouched."""
    view = copy.copy(model)  # shallow: the module dicts are shared, so every name and parameter is the model's own
    forward = model.forward

    def tensors_only(*args, **kwargs):
        leaves = torch.utils._pytree.tree_leaves(forward(*args, **kwargs))
        return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))

    view.forward = tensors_only
    return view


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence a logger below ERROR for a while: a failed export logs its graph, and our error says it all."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class _Shape:
    """What the analysis reads of a node's ``tensor_meta``: its shape."""

    shape: torch.Size


def _module_paths(node: fx.Node) -> tuple[str, ...]:
    """The names of the modules whose calls made ``node``, outermost first (from torch.export's ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    # a ModuleList sliced from its start (Hugging Face's `self.layers[: config.num_hidden_layers]`) can be recorded as
    # "layers.slice(None, 2, None).0": its items keep their indices, so the path is "layers.0"
    return tuple(_FROM_START.sub("", re.sub(r"@\d+$", "", path)) for path, _ in stack.values())


_FROM_START = re.compile(r"\.slice\((?:None|0), [^,()]*, (?:None|1)\)")


def _owning_module(node: fx.Node, modules: dict[str, nn.Module], rules: tuple) -> str | None:
    """The innermost module whose call made ``node``, if one of ``rules`` applies to it (its weight then is the module's)."""
    paths = _module_paths(node)  # a module's second call is recorded as "name@1": stripped
    if not paths:
        return None
    path = paths[-1]
    module = modules.get(path)
    return path if module is not None and any(rule.applies(module) for rule in rules) else None


def _untraceable_message(model: nn.Module, fx_error: Exception, export_error: Exception) -> str:
    """Which tracer failed where, and the submodules that torch.fx can trace (to gate them one by one)."""
    traceable = [name for name, child in model.named_children() if _fx_traces(child)]
    hint = (f"gate and prune traceable submodules one at a time instead, e.g. {traceable[:3]} "
            "(sparsify(model.<name>, rules, example_inputs=<its input>))" if traceable else
            "gate and prune traceable submodules one at a time instead (sparsify(model.<name>, rules, example_inputs=<its input>))")
    return (f"l0sparse could not trace {type(model).__name__}: torch.fx failed at {_where(fx_error)} "
            f"({type(fx_error).__name__}: {_first_line(fx_error)}) and torch.export failed at {_where(export_error)} "
            f"({type(export_error).__name__}: {_first_line(export_error)}); models with data-dependent control flow "
            f"cannot be traced whole: {hint}")


def _fx_traces(module: nn.Module) -> bool:
    try:
        _Tracer().trace(module)
    except Exception:
        return False
    return True


def _where(error: BaseException) -> str:
    """The last frame of ``error``'s traceback outside torch (the user's line), as ``file:line in function``."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith(torch_dir)]
    cause = error.__cause__ or error.__context__
    if not frames and cause is not None:
        return _where(cause)
    if not frames:
        return "an unknown place"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _expected_input(model: nn.Module, example_inputs: tuple) -> str:
    """What the first layer expects, for the error message."""
    tensors = [t for _, t in example_tuple(example_inputs, "example_inputs").named_tensors()]
    got = ", ".join(str(tuple(t.shape)) for t in tensors)
    for name, module in model.named_modules():
        rule = module_rule(module)
        if isinstance(module, nn.Embedding):  # a token model: its Linear layers' widths say nothing of its inputs
            got_dtypes = ", ".join(str(t.dtype).removeprefix("torch.") for t in tensors)
            return f" (got shape {got}, dtype {got_dtypes}; the first layer {name!r} is an nn.Embedding: it takes integer ids)"
        if isinstance(rule, LinearRule):
            return f" (got shape {got}; the first layer {name!r} expects {module.in_features} features in the last dimension)"
        if isinstance(rule, ConvRule):
            return f" (got shape {got}; the first layer {name!r} expects {module.in_channels} channels in dimension 1)"
    return f" (got shape {got})"


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the paper's layers and gates kept as leaves."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (L0Layer, Gate)) or user_rule_applies(module) or super().is_leaf_module(module, qualified_name)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        graph = super().trace(root, concrete_args)
        # `from __future__ import annotations` leaves string annotations that torch.jit.script cannot read
        # in the generated code: resolve them against the forward's module, or drop them
        try:
            hints = typing.get_type_hints(type(root).forward)
        except Exception:  # an annotation that does not resolve: leave the types out
            hints = {}
        for node in graph.nodes:
            if isinstance(node.type, str):
                key = "return" if node.op == "output" else node.target.lstrip("*")
                node.type = hints.get(key)
        return graph
