"""Channel spaces of a traced model: which channels must be gated and removed together.

A *space* is a set of channels (features of a Linear, channels of a conv)
that flow through channel-wise operations (activations, BatchNorm, pooling,
depthwise convs, residual additions, flatten) and are finally read by
*consumers*: Linear layers and ungrouped convs, which mix channels. Channels
joined by an addition land in one space. l0sparse gates a space on its
consumers' inputs (their weight columns): when a gate is closed no consumer
reads the channel, so every producer row, BatchNorm entry and consumer column
of that channel can be removed exactly, whatever the channel-wise operations
in between did to its values.

A space is *locked* (its channels cannot be removed) when something reads it
that cannot be gated or sliced: the model's output, a LayerNorm over the
channels, a reshape other than flatten, a concatenation, a grouped conv, an
attention module, or an operation this module does not know.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import os
import re
import traceback
import typing
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .gates import Gate
from .layers import L0Conv2d, L0Linear

__all__ = ["Space", "Consumer", "ChannelGraph", "trace_channels", "check_example_batch"]

# Channel-wise modules and functions: channel c of the output depends on channel c of the input only.
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
)
_CHANNELWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, torch.tanh, torch.sigmoid, F.hardtanh,
    F.hardswish, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.sigmoid, F.softplus,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "contiguous", "clone", "detach"}
# f(0) != 0: a channel that is exactly zero before them is not zero after
_NOT_ZERO_PRESERVING = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.BatchNorm1d, nn.BatchNorm2d)
_NOT_ZERO_PRESERVING_FUNCTIONS = {torch.sigmoid, F.softplus}
_BINARY = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "add_", "mul_"}

_aten = torch.ops.aten
# ATen ops of torch.export's graph that a module of these kinds makes from its input (see _exported_graph)
_LINEAR_KINDS = (nn.Linear, L0Linear)
_CONV_KINDS = (nn.modules.conv._ConvNd, L0Conv2d)
_ATEN_MODULE_OPS = {_aten.linear.default: _LINEAR_KINDS, _aten.conv1d.default: _CONV_KINDS, _aten.conv2d.default: _CONV_KINDS,
                    _aten.conv3d.default: _CONV_KINDS, _aten.batch_norm.default: (nn.BatchNorm1d, nn.BatchNorm2d)}
# ATen ops read as the torch functions the analysis knows (same argument order)
_ATEN_AS_TORCH = {
    _aten.relu.default: torch.relu, _aten.relu_.default: torch.relu, _aten.gelu.default: F.gelu, _aten.silu.default: F.silu,
    _aten.silu_.default: F.silu, _aten.tanh.default: torch.tanh, _aten.sigmoid.default: torch.sigmoid,
    _aten.hardtanh.default: F.hardtanh, _aten.hardswish.default: F.hardswish, _aten.dropout.default: F.dropout,
    _aten.add.Tensor: operator.add, _aten.add_.Tensor: operator.add, _aten.sub.Tensor: operator.sub,
    _aten.mul.Tensor: operator.mul, _aten.mul_.Tensor: operator.mul, _aten.flatten.using_ints: torch.flatten,
    _aten.mean.dim: torch.mean, _aten.sum.dim_IntList: torch.sum, _aten.leaky_relu.default: F.leaky_relu,
    _aten.elu.default: F.elu, _aten.mish.default: F.mish, _aten.softplus.default: F.softplus,
    _aten.max_pool1d.default: F.max_pool1d, _aten.max_pool2d.default: F.max_pool2d,
    _aten.avg_pool1d.default: F.avg_pool1d, _aten.avg_pool2d.default: F.avg_pool2d,
    _aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d, _aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    _aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
}


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
        # MACs of the batch that torch.export's graph shows outside Linear and conv modules but count_flops counts:
        # an nn.MultiheadAttention's projections and its scores when written as bmm; counted, never reduced
        self.other_macs = 0
        # "fx": graph_module is the model's fx graph, runnable and rewritable; "export": read from torch.export's
        # ATen graph, for the analysis only (prune then slices the model's own modules)
        self.tracer = "fx"

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
        if self.tracer != "export" or not space.removable or space.followers or not space.producers:
            return False
        if not hasattr(self, "_modules"):  # CostModel asks on every costs() call: look the modules up once
            self._modules = dict(self.graph_module.named_modules())
        modules = self._modules
        names = [*space.producers, *(consumer.name for consumer in space.consumers)]
        return all(isinstance(modules.get(name), (nn.Linear, L0Linear)) for name in names)


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


def _is_depthwise(conv: nn.Module) -> bool:
    return isinstance(conv, nn.modules.conv._ConvNd) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def check_example_batch(example_inputs: tuple) -> None:
    """Refuse example inputs whose batch is empty: every count is per example, and nothing can be traced on none."""
    for position, tensor in enumerate(example_inputs):
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[0] == 0:
            raise ValueError(f"example_inputs[{position}] has an empty batch (shape {tuple(tensor.shape)}): "
                             "pass at least one example")


def _placement_mismatch(model: nn.Module, example_inputs: tuple) -> str | None:
    """Why the inputs cannot meet the model's parameters (device or dtype), or None."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parameter is None:
        return None
    for position, tensor in enumerate(example_inputs):
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.device != parameter.device:
            return (f"example_inputs[{position}] is on {tensor.device} but the model's parameters are on {parameter.device}: "
                    "move the inputs or the model so that both are on one device")
        if tensor.is_floating_point() and tensor.dtype != parameter.dtype:
            return (f"example_inputs[{position}] is {tensor.dtype} but the model's parameters are {parameter.dtype}: "
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
    modules = dict(graph_module.named_modules())
    uf = _UnionFind()
    channels: dict[fx.Node, _Channels] = {}
    module_output: dict[str, int] = {}
    module_input: dict[str, int] = {}
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    calls: dict[str, list[tuple[torch.Size, torch.Size]]] = {}
    attention_calls_by_module: dict[str, list[tuple]] = {}
    # every space each module read and wrote, over all its calls: joined at the end so that one module's
    # rows, columns and entries are sliced the same way for every call
    spaces_read: dict[str, list[int]] = {}
    spaces_written: dict[str, list[int]] = {}
    read_unfollowed: set[str] = set()  # modules with a call whose input channels are not followed
    attention_shapes: dict[str, tuple] = {}
    removable_heads: set[str] = set()
    inlined_encoders: set[str] = set()
    attention_calls: list[tuple] = []
    attention_call_modules: list[tuple[str, ...]] = []
    other_macs = 0
    model_modules = dict(model.named_modules())

    def shape(node) -> torch.Size | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(meta, "shape", None)

    def lock(node, why: str) -> None:
        info = channels.get(node) if isinstance(node, fx.Node) else None
        if info is not None:
            uf.spaces[uf.find(info.space)].locked.append(why)

    def lock_all(args, why: str) -> None:
        for arg in _flatten_args(args):
            lock(arg, why)

    def fresh(node, dim: int, why_locked: str | None = None, **kwargs) -> None:
        out_shape = shape(node)
        if out_shape is None or len(out_shape) == 0:
            return
        dim = dim % len(out_shape)
        index = uf.new(out_shape[dim], **kwargs)
        if why_locked:
            uf.spaces[index].locked.append(why_locked)
        channels[node] = _Channels(index, dim)

    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            node_shape = shape(node)
            if node_shape is not None and len(node_shape) >= 2:
                # an image-like input has its channels at dim 1, a feature vector at the last dim
                fresh(node, 1 if len(node_shape) >= 3 else -1, is_input=True)
            continue
        if node.op == "output":
            lock_all(node.args, "the model output reads it")
            continue
        if node.op == "get_attr":
            continue
        tensor_args = [a for a in _flatten_args((node.args, node.kwargs)) if a in channels]
        if node.op == "call_module":
            module = modules[node.target]
            name = node.target
            source = channels.get(node.args[0]) if node.args else None
            in_shape, out_shape = shape(node.args[0]) if node.args else None, shape(node)
            if in_shape is not None and out_shape is not None:
                shapes.setdefault(name, (in_shape, out_shape))
                calls.setdefault(name, []).append((in_shape, out_shape))
            if isinstance(module, (nn.Linear, L0Linear)):
                if source is not None and source.dim == len(in_shape) - 1:
                    _add_consumer(uf.spaces[uf.find(source.space)], Consumer(name, source.block, dim=1))
                    module_input[name] = source.space
                    spaces_read.setdefault(name, []).append(source.space)
                else:
                    lock_all(node.args, f"{name} reads it along a non-channel dimension")
                    read_unfollowed.add(name)
                fresh(node, -1, producers=[name])
                module_output[name] = channels[node].space
                spaces_written.setdefault(name, []).append(channels[node].space)
                continue
            if (isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)) or isinstance(module, L0Conv2d):
                if _is_depthwise(module) and source is not None and source.dim == 1 and source.block == 1:
                    _add_follower(uf.spaces[uf.find(source.space)], name)
                    uf.spaces[uf.find(source.space)].zero_preserving &= module.bias is None
                    channels[node] = source
                    module_input[name] = module_output[name] = source.space
                    spaces_read.setdefault(name, []).append(source.space)
                    continue
                if module.groups == 1 and source is not None and source.dim == 1 and source.block == 1:
                    _add_consumer(uf.spaces[uf.find(source.space)], Consumer(name, 1, dim=1))
                    module_input[name] = source.space
                    spaces_read.setdefault(name, []).append(source.space)
                else:
                    lock_all(node.args, f"{name} (groups={module.groups}) cannot drop single input channels")
                    read_unfollowed.add(name)
                    if source is not None:
                        module_input[name] = source.space
                grouped = f"{name} is a grouped conv (groups={module.groups}): its channels go in groups" if module.groups > 1 else None
                fresh(node, 1, why_locked=grouped, producers=[name])
                module_output[name] = channels[node].space
                spaces_written.setdefault(name, []).append(channels[node].space)
                continue
            if isinstance(module, _CHANNELWISE_MODULES) and source is not None:
                if isinstance(module, _NOT_ZERO_PRESERVING):
                    uf.spaces[uf.find(source.space)].zero_preserving = False
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    _add_follower(uf.spaces[uf.find(source.space)], name)
                    module_input[name] = module_output[name] = source.space
                    spaces_read.setdefault(name, []).append(source.space)
                channels[node] = source
                continue
            if isinstance(module, nn.Flatten) and source is not None:
                _flatten(node, source, module.start_dim, module.end_dim, shape, channels, lock)
                continue
            if isinstance(module, nn.MultiheadAttention) and len(node.args) >= 2:
                attention_shapes.setdefault(name, (shape(node.args[0]), shape(node.args[1])))
                attention_calls_by_module.setdefault(name, []).append((shape(node.args[0]), shape(node.args[1])))
                if _plain_attention_call(node, module, shape):
                    removable_heads.add(name)
            if isinstance(module, nn.TransformerEncoderLayer) and _plain_encoder_call(node, module, shape):
                removable_heads.add(f"{name}.self_attn")
                inlined_encoders.add(name)
            lock_all(node.args, f"{type(module).__name__} {name!r} reads it and cannot be sliced")
            fresh(node, -1, why_locked=f"made by {type(module).__name__} {name!r}")
            continue
        # call_function / call_method
        target = node.target
        source = channels.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        method = target if node.op == "call_method" else None
        if (node.op == "call_function" and target in _CHANNELWISE_FUNCTIONS) or method in _CHANNELWISE_METHODS:
            if source is not None:
                channels[node] = source
                if target in _NOT_ZERO_PRESERVING_FUNCTIONS or method == "sigmoid":
                    uf.spaces[uf.find(source.space)].zero_preserving = False
            continue
        if (node.op == "call_function" and target in _BINARY) or method in _BINARY_METHODS:
            _binary(node, tensor_args, channels, uf, shape, lock)
            continue
        if (node.op == "call_function" and target is torch.flatten) or method == "flatten":
            if source is not None:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                _flatten(node, source, start, end, shape, channels, lock)
            continue
        if (node.op == "call_function" and target in (torch.mean, torch.sum, torch.amax)) or method in ("mean", "sum", "amax"):
            if source is not None and _reduces_other_dims(node, source, shape):
                channels[node] = _Channels(source.space, source.dim, 1)
                continue
        if method in ("size", "dim") or (node.op == "call_function" and target in (getattr, operator.getitem) and source is None):
            continue
        if node.op == "call_function" and target is F.scaled_dot_product_attention:
            attention_calls.append((shape(node.args[0]), shape(node.args[1])))
            attention_call_modules.append(_module_paths(node))
        if node.op == "call_function" and target is _aten.linear.default and shape(node) is not None and shape(node.args[1]) is not None:
            other_macs += math.prod(shape(node)) * shape(node.args[1])[-1]
        if node.op == "call_function" and target in (_aten.bmm.default, _aten.matmul.default) and shape(node) is not None and any(
                isinstance(model_modules.get(path), (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for path in _module_paths(node)):
            other_macs += math.prod(shape(node)) * shape(node.args[0])[-1]
        lock_all((node.args, node.kwargs), f"{getattr(target, '__name__', target)} reads it")
        fresh(node, -1, why_locked=f"made by {getattr(target, '__name__', target)}")

    for name, read in spaces_read.items():  # a module called more than once: its calls share rows and columns
        for other in read[1:]:
            uf.union(read[0], other, f"{name} (called {len(read)} times)")
        if name in read_unfollowed:
            uf.spaces[uf.find(read[0])].locked.append(f"{name} is called on it and on a tensor whose channels are not followed")
    for name, written in spaces_written.items():
        for other in written[1:]:
            uf.union(written[0], other, f"{name} (called {len(written)} times)")

    roots = sorted({uf.find(i) for i in range(len(uf.parent))})
    renumber = {root: position for position, root in enumerate(roots)}
    spaces = [uf.spaces[root] for root in roots]
    result = ChannelGraph(
        graph_module,
        spaces,
        {name: renumber[uf.find(i)] for name, i in module_output.items()},
        {name: renumber[uf.find(i)] for name, i in module_input.items()},
        shapes,
    )
    result.calls = calls
    result.attention_shapes = attention_shapes
    result.attention_module_calls = attention_calls_by_module
    result.removable_heads, result.inlined_encoders = removable_heads, inlined_encoders
    result.attention_calls = attention_calls
    result.attention_call_modules = attention_call_modules
    result.other_macs = other_macs
    result.tracer = tracer
    return result


def _traced_graph(model: nn.Module, example_inputs: tuple) -> tuple[fx.GraphModule, str]:
    """A module-level graph of ``model`` with shapes in every node's ``tensor_meta``, and the tracer that made it."""
    try:
        graph_module = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as fx_error:  # torch.fx raises many kinds: fall back on torch.export
        return _exported_graph(model, example_inputs, fx_error), "export"
    try:
        ShapeProp(graph_module).propagate(*example_inputs)
    except Exception as error:
        mismatch = _placement_mismatch(model, example_inputs)
        if mismatch is not None:  # not a shape error, whatever the failing layer said
            raise ValueError(mismatch) from error
        raise ValueError(f"example_inputs do not fit the model{_expected_input(model, example_inputs)}: {type(error).__name__}: {error}") from error
    return graph_module, "fx"


def _exported_graph(model: nn.Module, example_inputs: tuple, fx_error: Exception) -> fx.GraphModule:
    """``model`` traced by ``torch.export`` and rewritten so that :func:`trace_channels` reads it as an fx graph.

    Its ATen graph becomes: a ``call_module`` node for each ``aten.linear`` / ``aten.conv*`` that a Linear or
    conv module makes (found through ``nn_module_stack``, so a parametrized weight still counts as the module's),
    the torch function of each channel-wise or binary ATen op that the analysis knows, ``get_attr`` nodes for
    parameters, buffers and constants, and every other op as it is (an unknown op locks its channels).
    """
    mismatch = _placement_mismatch(model, example_inputs)
    if mismatch is not None:
        raise ValueError(mismatch)
    try:
        # a failed export logs and prints its partial graph; the error raised here says where it failed
        with warnings.catch_warnings(), _quiet_logger("torch.fx.experimental.symbolic_shapes"), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, tuple(example_inputs))
    except Exception as export_error:
        try:  # the model's own forward fails too: the inputs are at fault, not the tracers
            model(*example_inputs)
        except Exception as error:
            raise ValueError(f"example_inputs do not fit the model{_expected_input(model, example_inputs)}: "
                             f"{type(error).__name__}: {error}") from error
        raise ValueError(_untraceable_message(model, fx_error, export_error)) from export_error
    signature = exported.graph_signature
    held = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
            **getattr(signature, "inputs_to_lifted_tensor_constants", {})}
    modules = dict(model.named_modules())
    state = {**dict(exported.named_parameters()), **dict(exported.named_buffers()), **exported.constants}
    graph = fx.Graph()
    root: dict[str, object] = {}
    env: dict[fx.Node, fx.Node] = {}
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in held:
            target = held[node.name]
            root[target] = state.get(target, torch.empty(0))
            copied = graph.get_attr(target)
        elif node.op == "call_function" and node.target in _ATEN_MODULE_OPS and node.args:
            owner = _owning_module(node, modules, _ATEN_MODULE_OPS[node.target])
            if owner is None:
                copied = graph.node_copy(node, lambda n: env[n])
            else:
                root[owner] = modules[owner]
                copied = graph.call_module(owner, (env[node.args[0]],))
        elif node.op == "call_function" and node.target in _ATEN_AS_TORCH:
            copied = graph.node_copy(node, lambda n: env[n])
            copied.target = _ATEN_AS_TORCH[node.target]
        else:
            copied = graph.node_copy(node, lambda n: env[n])
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            copied.meta["tensor_meta"] = _Shape(value.shape)
        env[node] = copied
    return fx.GraphModule(root, graph)


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
    return tuple(re.sub(r"@\d+$", "", path) for path, _ in stack.values())


def _owning_module(node: fx.Node, modules: dict[str, nn.Module], kinds: tuple) -> str | None:
    """The innermost module whose call made ``node``, if it is one of ``kinds`` (its weight then is the module's)."""
    paths = _module_paths(node)  # a module's second call is recorded as "name@1": stripped
    if not paths:
        return None
    path = paths[-1]
    module = modules.get(path)
    return path if isinstance(module, kinds) else None


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


def _attention_module_is_plain(module: nn.MultiheadAttention) -> bool:
    """Projections + scaled dot-product attention, nothing else: what prune can rebuild with fewer heads."""
    return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn


def _plain_attention_call(node: fx.Node, module: nn.MultiheadAttention, shape) -> bool:
    """``attention(q, k, v)`` on batched inputs, no masks, and only its output (not the weights) read."""
    masks = [node.kwargs.get(key) for key in ("key_padding_mask", "attn_mask")]
    only_output_read = all(user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0 for user in node.users)
    return (_attention_module_is_plain(module) and len(node.args) == 3 and all(m is None for m in masks)
            and not node.kwargs.get("is_causal", False) and only_output_read and all(
                shape(a) is not None and len(shape(a)) == 3 for a in node.args))


def _plain_encoder_call(node: fx.Node, module: nn.TransformerEncoderLayer, shape) -> bool:
    """``layer(src)`` on a batched input without masks, around an attention prune can rebuild."""
    no_masks = len(node.args) == 1 and all(node.kwargs.get(k) is None for k in ("src_mask", "src_key_padding_mask"))
    return (no_masks and not node.kwargs.get("is_causal", False) and _attention_module_is_plain(module.self_attn)
            and shape(node.args[0]) is not None and len(shape(node.args[0])) == 3)


def _expected_input(model: nn.Module, example_inputs: tuple) -> str:
    """What the first layer expects, for the error message."""
    got = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, L0Linear)):
            return f" (got shape {got}; the first layer {name!r} expects {module.in_features} features in the last dimension)"
        if isinstance(module, (nn.modules.conv._ConvNd, L0Conv2d)):
            return f" (got shape {got}; the first layer {name!r} expects {module.in_channels} channels in dimension 1)"
    return f" (got shape {got})"


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the paper's layers and gates kept as leaves."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (L0Linear, L0Conv2d, Gate)) or super().is_leaf_module(module, qualified_name)

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


def _flatten_args(args) -> list:
    found: list = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, fx.Node) else None)
    return found


def _flatten(node, source: _Channels, start: int, end: int, shape, channels, lock) -> None:
    in_shape = shape(node.args[0])
    ndim = len(in_shape)
    start, end = start % ndim, end % ndim
    if source.block == 1 and start == source.dim and end == ndim - 1:
        channels[node] = _Channels(source.space, start, math.prod(in_shape[start + 1:]))
    elif source.dim < start or (source.dim > end):
        channels[node] = _Channels(source.space, source.dim - (end - start if source.dim > end else 0), source.block)
    else:
        lock(node.args[0], "a flatten that splits its channels")


def _binary(node, tensor_args, channels, uf, shape, lock) -> None:
    out_shape = shape(node)
    if out_shape is None:
        return
    infos = [(a, channels[a]) for a in tensor_args]
    untracked = [a for a in _flatten_args(node.args) if a not in channels and shape(a) is not None and math.prod(shape(a)) > 1]
    if untracked:  # mixed with a tensor whose channels are unknown: slicing ours would break the shapes
        for arg, _ in infos:
            lock(arg, f"{node.target} combines it with an untracked tensor")
        return
    additive = node.target in (operator.add, operator.sub, torch.add, torch.sub, operator.iadd, "add", "sub", "add_")
    if additive and len(infos) < len([a for a in node.args if a is not None]):
        for _, info in infos:  # x + constant: a zero channel becomes the constant
            uf.spaces[uf.find(info.space)].zero_preserving = False
    # operands whose channel dimension lines up with the result's join the same space
    joined = None
    for arg, info in infos:
        arg_shape = shape(arg)
        offset = len(out_shape) - len(arg_shape)
        if info.block != 1 or arg_shape[info.dim] != out_shape[info.dim + offset]:
            if arg_shape[info.dim] != 1:
                lock(arg, f"{node.target} broadcasts it")
            continue
        if joined is None:
            joined = _Channels(info.space, info.dim + offset)
        elif joined.dim == info.dim + offset:
            joined = _Channels(uf.union(joined.space, info.space, f"{node.target}"), joined.dim)
        else:
            lock(arg, f"{node.target} joins it along another dimension")
    if joined is not None:
        channels[node] = joined


def _reduces_other_dims(node, source: _Channels, shape) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or source.block != 1:
        return False
    ndim = len(shape(node.args[0]))
    dims = [d % ndim for d in ((dims,) if isinstance(dims, int) else dims)]
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if source.dim in dims:
        return False
    return keepdim or all(d > source.dim for d in dims)
