"""One rule per kind of operation: how it is traced into channel spaces, sliced by prune, and counted.

:func:`l0sparse.core.graph.trace_channels` walks a graph and hands each node to the rule of its module
(:func:`module_rule`) or function (:func:`function_rule`); :func:`l0sparse.prune` slices a module
through its rule's :meth:`ModuleRule.slice`; :class:`l0sparse.CostModel` and :func:`l0sparse.count_flops`
count a weight product through :meth:`WeightProduct.positions` and :meth:`WeightProduct.pair_macs`.
Adding an operation is adding a rule here. Anything without a rule locks the channels it reads.
Attention also has its counts here, the fx rewrites that remove closed heads, and the head bookkeeping
of other libraries' attention modules (Hugging Face), which prune and CostModel share.

A rule's ``trace`` receives the trace (:class:`Trace`: the moves it may make on the spaces), the
node, and the channels of the node's first argument (``source``: a space, the dimension that holds its
channels, and the features per channel after a flatten), and returns False when it does not apply,
which locks the channels as an unknown operation would.
"""

from __future__ import annotations

import math
import operator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import L0Conv2d, L0Linear
from .sites import gate_masks

__all__ = [
    "Trace", "ModuleRule", "WeightProduct", "LinearRule", "ConvRule", "BatchNormRule", "GroupNormRule", "ChannelLayerNormRule",
    "AttentionRule", "EncoderLayerRule", "FunctionRule", "ScalarFunctions", "MODULE_RULES", "FUNCTION_RULES", "module_rule", "weight_product",
    "function_rule", "aten_owner_kinds", "node_inputs", "is_depthwise",
    # attention: counts, the rewrites that remove closed heads, and the head bookkeeping of other libraries' modules
    "attention_cost", "attention_layout", "scaled_dot_product_macs", "inline_encoder", "remove_heads", "set_submodule",
    "head_layouts", "declared_head_count", "set_head_count", "record_pruned_heads", "query_key_value",
]

_aten = torch.ops.aten


class Trace(Protocol):
    """What :mod:`l0sparse.core.graph` offers a rule while tracing (see ``graph._Trace``)."""

    modules: dict[str, nn.Module]  # the traced graph's
    model_modules: dict[str, nn.Module]  # the model's own (torch.export's graph holds only some)
    channels: dict  # node -> its channels (space, dim, block)
    # what attention rules record for the counts and for prune's head removal
    attention_shapes: dict
    attention_calls_by_module: dict
    removable_heads: set
    inlined_encoders: set
    attention_calls: list
    attention_call_modules: list
    other_macs: int
    products: list

    def shape(self, node) -> torch.Size | None: ...
    def size_of(self, source) -> int: ...
    def pass_on(self, node: fx.Node, source, dim: int | None = None, block: int | None = None) -> None: ...
    def lock(self, node, why: str) -> None: ...
    def lock_all(self, args, why: str) -> None: ...
    def fresh(self, node: fx.Node, dim: int, why_locked: str | None = None) -> None: ...
    def consume(self, name: str, source, dim: int = 1) -> None: ...
    def produce(self, node: fx.Node, name: str, dim: int, why_locked: str | None = None) -> None: ...
    def follow(self, node: fx.Node, name: str, source, granule: int = 1, zero_preserving: bool = True) -> None: ...
    def not_zero_preserving(self, source) -> None: ...
    def read_unfollowed(self, node: fx.Node, name: str, why: str, source=None) -> None: ...
    def join(self, a: int, b: int, why: str) -> int: ...
    def mark(self, node: fx.Node, space: int, dim: int, block: int = 1) -> None: ...
    def module_paths(self, node: fx.Node) -> tuple[str, ...]: ...


class ModuleRule:
    """How one kind of module is traced, sliced and counted. ``kinds``: the module classes it covers;
    ``aten``: the ATen ops of torch.export's graph that such a module makes from its input."""

    kinds: tuple[type, ...] = ()
    aten: tuple = ()

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, self.kinds)

    def trace(self, trace: Trace, node: fx.Node, name: str, module: nn.Module, source) -> bool:
        return False

    def slice(self, module: nn.Module, rows=None, columns=None, entries=None) -> None:
        """Keep ``rows`` (output channels), ``columns`` (input channels) or ``entries`` (a follower's channels)."""
        raise NotImplementedError(f"{type(module).__name__} cannot be sliced")

    def dense_macs(self, module: nn.Module, inputs: tuple, output) -> int | None:
        """MACs of one call of ``module`` with nothing removed, for :func:`l0sparse.count_flops`; None: not counted."""
        return None


def _index(kept) -> torch.Tensor:
    return torch.as_tensor(kept, dtype=torch.long)


@torch.no_grad()
def _keep(module: nn.Module, attributes: tuple[str, ...], index: torch.Tensor, dim: int = 0) -> None:
    """Keep ``index`` along ``dim`` of each of ``module``'s tensors named in ``attributes`` (absent ones skipped)."""
    for attribute in attributes:
        tensor = getattr(module, attribute, None)
        if tensor is not None:
            tensor.data = tensor.data.index_select(dim, index.to(tensor.device)).clone()


class WeightProduct(ModuleRule):
    """A layer that mixes channels through a weight of shape (out, in, *kernel): it consumes the space of
    its input channels and produces a new space of output channels (rows)."""

    widths: tuple[str, str]  # the module's attributes that hold its output and input widths

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        if rows is not None:
            _keep(module, ("weight", "bias"), _index(rows))
            setattr(module, self.widths[0], len(rows))
        if columns is not None:
            _keep(module, ("weight",), _index(columns), dim=1)
            setattr(module, self.widths[1], len(columns))

    def positions(self, out_shape) -> int:
        """Output positions of one call (each computes every kept row × column pair once)."""
        raise NotImplementedError

    def pair_macs(self, weight_shape) -> int:
        """MACs per (output row, input column) pair at one position: the kernel's size."""
        return math.prod(weight_shape[2:])

    def macs(self, weight_shape, out_shape) -> int:
        """MACs of one dense call."""
        return self.positions(out_shape) * self.pair_macs(weight_shape) * weight_shape[0] * weight_shape[1]

    def dense_macs(self, module, inputs, output) -> int:
        return self.macs(module.weight.shape, output.shape)


class LinearRule(WeightProduct):
    kinds = (nn.Linear, L0Linear)
    widths = ("out_features", "in_features")
    aten = (_aten.linear.default,)

    def trace(self, trace, node, name, module, source) -> bool:
        in_shape = trace.shape(node.args[0])
        if source is not None and source.dim == len(in_shape) - 1:
            trace.consume(name, source)
        else:
            trace.read_unfollowed(node, name, f"{name} reads it along a non-channel dimension")
        trace.produce(node, name, -1)
        return True

    def positions(self, out_shape) -> int:
        return math.prod(out_shape[:-1])


def is_depthwise(conv: nn.Module) -> bool:
    return isinstance(conv, nn.modules.conv._ConvNd) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class ConvRule(WeightProduct):
    """Convolutions: an ungrouped one consumes and produces, a depthwise one follows its space (one filter per
    channel), any other grouped one locks both sides (its channels go in groups)."""

    kinds = (nn.modules.conv._ConvNd, L0Conv2d)
    widths = ("out_channels", "in_channels")
    aten = (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default)

    def applies(self, module) -> bool:
        return isinstance(module, self.kinds) and not isinstance(module, nn.modules.conv._ConvTransposeNd)

    def trace(self, trace, node, name, module, source) -> bool:
        on_channels = source is not None and source.dim == 1 and source.block == 1
        if is_depthwise(module) and on_channels:
            trace.follow(node, name, source, zero_preserving=module.bias is None)
            return True
        if module.groups == 1 and on_channels:
            trace.consume(name, source)
        else:
            trace.read_unfollowed(node, name, f"{name} (groups={module.groups}) cannot drop single input channels", source)
        grouped = f"{name} is a grouped conv (groups={module.groups}): its channels go in groups" if module.groups > 1 else None
        trace.produce(node, name, 1, why_locked=grouped)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        if entries is not None:  # depthwise: one filter per channel
            _keep(module, ("weight", "bias"), _index(entries))
            module.in_channels = module.out_channels = module.groups = len(entries)
        super().slice(module, rows, columns)

    def positions(self, out_shape) -> int:
        return out_shape[0] * math.prod(out_shape[2:])


class BatchNormRule(ModuleRule):
    """Per-channel statistics and affine: a follower (one entry per channel); a zero channel leaves it as β."""

    kinds = (nn.BatchNorm1d, nn.BatchNorm2d)
    aten = (_aten.batch_norm.default,)

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None:
            return False
        trace.follow(node, name, source, zero_preserving=False)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        _keep(module, ("weight", "bias", "running_mean", "running_var"), _index(entries))
        module.num_features = len(entries)


class GroupNormRule(ModuleRule):
    """GroupNorm over the channels (dim 1): a follower whose channels go only a whole group at a time.

    Its statistics are per group, so removing every channel of a group leaves the other groups' outputs
    as they were, while removing part of a group would change its mean and variance: the space's channels
    are removed in granules of ``num_channels / num_groups`` (``num_groups`` shrinks with them). A gate
    on the consumers closes a channel after the norm; a closed L0Conv2d channel is a zero before it,
    which still counts in its group's statistics, so it is not removed unless its consumers' columns are.
    """

    kinds = (nn.GroupNorm,)
    aten = (_aten.group_norm.default,)

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None or source.dim != 1 or source.block != 1 or trace.size_of(source) != module.num_channels:
            return False
        trace.follow(node, name, source, granule=module.num_channels // module.num_groups, zero_preserving=False)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        per_group = module.num_channels // module.num_groups
        _keep(module, ("weight", "bias"), _index(entries))
        module.num_channels, module.num_groups = len(entries), len(entries) // per_group


class ChannelLayerNormRule(ModuleRule):
    """LayerNorm over the channels alone (``normalized_shape == (C,)`` on the channel dimension, last: a
    channels-last LayerNorm as in ConvNeXt, or one over a Linear's features).

    It is a GroupNorm of one group: its statistics read every channel, so its space keeps all of them
    (one granule of C) unless none is read at all. Consumer gates (after the norm) still drop their
    closed columns, with an index_select where the layer is rewritten; a closed L0Conv2d channel (a zero
    before the norm) counts in the statistics and is never removed. Other LayerNorms lock their input.
    """

    kinds = (nn.LayerNorm,)
    aten = (_aten.layer_norm.default,)

    def trace(self, trace, node, name, module, source) -> bool:
        in_shape = trace.shape(node.args[0])
        if source is None or source.block != 1 or in_shape is None or source.dim != len(in_shape) - 1:
            return False
        if tuple(module.normalized_shape) != (in_shape[-1],):
            return False
        trace.follow(node, name, source, granule=in_shape[-1], zero_preserving=False)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        _keep(module, ("weight", "bias"), _index(entries))
        module.normalized_shape = (len(entries),)


# Channel-wise modules: channel c of the output depends on channel c of the input only; f(0) != 0 for the second group
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh, nn.Hardswish,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_NOT_ZERO_PRESERVING = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)


class ChannelwiseRule(ModuleRule):
    """Activations, pooling, dropout: the channels pass through unchanged in number."""

    kinds = _CHANNELWISE_MODULES + _CHANNELWISE_NOT_ZERO_PRESERVING

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None:
            return False
        if isinstance(module, _CHANNELWISE_NOT_ZERO_PRESERVING):
            trace.not_zero_preserving(source)
        trace.pass_on(node, source)
        return True


class FlattenRule(ModuleRule):
    kinds = (nn.Flatten,)

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None:
            return False
        flatten(trace, node, source, module.start_dim, module.end_dim)
        return True


def attention_module_is_plain(module: nn.MultiheadAttention) -> bool:
    """Projections + scaled dot-product attention, nothing else: what prune can rebuild with fewer heads."""
    return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn


class AttentionRule(ModuleRule):
    """nn.MultiheadAttention: its channels are locked; its calls are recorded, and the plain ones (no masks,
    only the output read) can lose their closed heads."""

    kinds = (nn.MultiheadAttention,)

    def trace(self, trace, node, name, module, source) -> bool:
        if len(node.args) >= 2:
            query, key = trace.shape(node.args[0]), trace.shape(node.args[1])
            trace.attention_shapes.setdefault(name, (query, key))
            trace.attention_calls_by_module.setdefault(name, []).append((query, key))
            masks = [node.kwargs.get(key) for key in ("key_padding_mask", "attn_mask")]
            only_output_read = all(user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0
                                   for user in node.users)
            if (attention_module_is_plain(module) and len(node.args) == 3 and all(m is None for m in masks)
                    and not node.kwargs.get("is_causal", False) and only_output_read
                    and all(trace.shape(a) is not None and len(trace.shape(a)) == 3 for a in node.args)):
                trace.removable_heads.add(name)
        return False

    def dense_macs(self, module, inputs, output) -> int:
        (sequences, query_length), (_, key_length) = attention_layout(module, inputs[0].shape), attention_layout(module, inputs[1].shape)
        return attention_cost(module, query_length, key_length)[0] * sequences


class EncoderLayerRule(ModuleRule):
    """nn.TransformerEncoderLayer: a leaf whose channels are locked; a plain call (a batched input, no masks) is
    inlined by prune so that its attention can lose closed heads, and its feed-forward units are sliced inside it."""

    kinds = (nn.TransformerEncoderLayer,)

    def trace(self, trace, node, name, module, source) -> bool:
        no_masks = len(node.args) == 1 and all(node.kwargs.get(k) is None for k in ("src_mask", "src_key_padding_mask"))
        shape = trace.shape(node.args[0]) if node.args else None
        if (no_masks and not node.kwargs.get("is_causal", False) and attention_module_is_plain(module.self_attn)
                and shape is not None and len(shape) == 3):
            trace.removable_heads.add(f"{name}.self_attn")
            trace.inlined_encoders.add(name)
        return False

    def dense_macs(self, module, inputs, output) -> int:
        sequences, tokens = attention_layout(module.self_attn, inputs[0].shape)
        feed_forward = 2 * tokens * module.linear1.in_features * module.linear1.out_features
        return (attention_cost(module.self_attn, tokens, tokens)[0] + feed_forward) * sequences


# --- attention: its counts, and the rewrites that remove closed heads --------------------------------------------


def attention_cost(attention: nn.MultiheadAttention, query_length: int, key_length: int, heads=None) -> tuple:
    """(MACs per example, parameters) of multi-head attention with ``heads`` of its heads (all by default).

    MACs: Q/K/V and output projections, scores and weighted values. ``heads`` may be a tensor (an
    expected count); both costs are linear in it, plus the output bias and any bias_k/bias_v.
    """
    embed = attention.embed_dim
    inner = (attention.num_heads if heads is None else heads) * (embed // attention.num_heads)
    flops = (query_length + 2 * key_length) * embed * inner + query_length * inner * embed + 2 * query_length * key_length * inner
    in_bias = 3 if attention.in_proj_bias is not None else 0
    fixed = sum(t.numel() for t in (attention.out_proj.bias, attention.bias_k, attention.bias_v) if t is not None)
    return flops, inner * (3 * embed + in_bias + embed) + fixed


def attention_layout(attention: nn.MultiheadAttention, shape) -> tuple[int, int]:
    """(sequences, tokens per sequence) of an attention input of ``shape``: (L, E) unbatched, (N, L, E) batch
    first, (L, N, E) otherwise."""
    if len(shape) != 3:
        return 1, shape[0]
    return (shape[0], shape[1]) if attention.batch_first else (shape[1], shape[0])


def scaled_dot_product_macs(query_shape, key_shape) -> int:
    """Scores and weighted values of scaled_dot_product_attention: 2 · (batch · heads · L_q) · L_k · head_dim."""
    return 2 * math.prod(query_shape[:-1]) * key_shape[-2] * query_shape[-1]


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def inline_encoder(graph_module: fx.GraphModule, name: str) -> None:
    """Replace calls of the TransformerEncoderLayer ``name`` by its eval-mode computation, one node per step.

    Its attention then becomes a call of its own, which :func:`remove_heads` can rewrite; the layer
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
    set_submodule(graph_module, name, nn.ModuleDict(parts))


@torch.no_grad()
def remove_heads(graph_module: fx.GraphModule, name: str, kept: list[int]) -> None:
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
    set_submodule(graph_module, name, nn.ModuleDict(parts))
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


# where attention modules of other libraries (Hugging Face BERT-like encoders) keep their head count and
# the width of all heads together: prune must update them when it removes heads
_HEAD_COUNT_NAMES = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_HEADS_WIDTH_NAMES = ("all_head_size", "dim", "inner_dim")
# ... and the width of one head, which prune sets to 1 where every head is closed (a forward cannot run with none)
_HEAD_DIM_NAMES = ("attention_head_size", "head_dim", "dim_per_head")


def _head_count_holder(module: nn.Module) -> tuple[nn.Module, str] | None:
    """The first submodule of ``module`` (itself included) with an int head-count attribute, and its name."""
    for submodule in module.modules():
        for attribute in _HEAD_COUNT_NAMES:
            value = getattr(submodule, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return submodule, attribute
    return None


def declared_head_count(module: nn.Module) -> int | None:
    """The head count an attention module of another library declares (``num_attention_heads``, ``n_heads``...), or None."""
    holder = _head_count_holder(module)
    return None if holder is None else getattr(*holder)


def set_head_count(module: nn.Module, before: int, after: int, head_dim: int, new_head_dim: int | None = None) -> None:
    """Update an attention module's head bookkeeping from ``before`` heads of ``head_dim`` each to ``after``
    heads of ``new_head_dim`` (default: ``head_dim``) each."""
    holder = _head_count_holder(module)
    if holder is None:
        return
    submodule, attribute = holder
    new_head_dim = head_dim if new_head_dim is None else new_head_dim
    width_names = [name for name in _HEADS_WIDTH_NAMES if getattr(submodule, name, None) == before * head_dim]
    dim_names = [name for name in _HEAD_DIM_NAMES if getattr(submodule, name, None) == head_dim] if new_head_dim != head_dim else []
    setattr(submodule, attribute, after)
    for width in width_names:  # only the width of all heads together, next to the count
        setattr(submodule, width, after * new_head_dim)
    for name in dim_names:
        setattr(submodule, name, new_head_dim)


def record_pruned_heads(model: nn.Module, layouts: dict[str, dict]) -> None:
    """Hugging Face's record of removed heads, kept as its own ``prune_heads`` keeps it: on the config of each
    model inside ``model`` (a Hugging Face ``PreTrainedModel``), ``config.pruned_heads`` maps a layer index (the
    first index in the attention module's name) to the sorted ORIGINAL indices of its removed heads, merged
    with what it held (``config.num_attention_heads`` stays the original count), and an attention module's
    own ``pruned_heads`` set, where it has one, says the same. ``layouts``: :func:`head_layouts`, each with ``"kept"``."""
    configs = set()
    for prefix, holder in model.named_modules():
        config = getattr(holder, "config", None)
        if config is None or id(config) in configs or not callable(getattr(config, "to_dict", None)):
            continue
        configs.add(id(config))  # an outer model (BertForSequenceClassification) shares its config with the inner one
        start = f"{prefix}." if prefix else ""
        recorded = {int(layer): set(heads) for layer, heads in (getattr(config, "pruned_heads", None) or {}).items()}
        for owner, layout in layouts.items():
            index = next((int(part) for part in owner.removeprefix(start).split(".") if part.isdigit()), None)
            if not owner.startswith(start) or index is None or len(layout["kept"]) == layout["heads"]:
                continue
            before = recorded.get(index, set())
            original = getattr(config, "num_attention_heads", layout["heads"] + len(before))
            remaining = [head for head in range(original) if head not in before]  # the module's heads, by original index
            if len(remaining) != layout["heads"]:  # not the count the record implies: nothing can be mapped
                continue
            recorded[index] = before | {head for position, head in enumerate(remaining) if position not in layout["kept"]}
            for module in model.get_submodule(owner).modules():
                if isinstance(getattr(module, "pruned_heads", None), set):
                    module.pruned_heads = set(recorded[index])
        if recorded:
            config.pruned_heads = {layer: sorted(heads) for layer, heads in sorted(recorded.items())}


def _smallest_width(module: nn.Module, head_dim: int) -> int:
    """The fewest q/k/v rows an attention module whose heads are all closed can keep: 1 where the module
    declares its head width (prune can narrow its one zero head), else one whole head. A module that declares
    key/value groups (a decoder's: rotary position embeddings turn each head's full width) keeps a whole head."""
    if any(hasattr(module, name) for name in _KV_GROUP_NAMES):
        return head_dim
    holder = _head_count_holder(module)
    found = holder is not None and any(getattr(holder[0], name, None) == head_dim for name in _HEAD_DIM_NAMES)
    return 1 if found else head_dim


# where a grouped-query attention module (Llama, Mistral, Qwen2...) keeps the query heads per key/value head: its
# forward repeats each key/value head that many times, so prune sets it to the query heads kept per group
_KV_GROUP_NAMES = ("num_key_value_groups",)


def grouped_projections(attention: nn.Module, projection: nn.Linear) -> dict | None:
    """The layout of a grouped-query attention module whose output projection is ``projection``: ``{"q": [name],
    "kv": [key, value names], "heads": query heads, "kv_heads": key/value heads, "head_dim": ...}``, or None.

    Found by shape: one Linear as wide as the projection's input (the queries), two more of one narrower width
    (keys and values), and the width of one head declared by the module (``head_dim``...), which tells how many
    query heads share a key/value head. Query head h reads key/value head h // (heads / kv_heads), as the
    forward's repeat of each key/value head makes it."""
    linears = [(inner, linear) for inner, linear in attention.named_modules() if isinstance(linear, nn.Linear) and linear is not projection]
    queries = [inner for inner, linear in linears if linear.out_features == projection.in_features]
    narrower = [(inner, linear.out_features) for inner, linear in linears if linear.out_features < projection.in_features]
    head_dim = next((getattr(attention, name) for name in _HEAD_DIM_NAMES if isinstance(getattr(attention, name, None), int)), None)
    if len(queries) != 1 or len(narrower) != 2 or narrower[0][1] != narrower[1][1] or not head_dim:
        return None
    width = narrower[0][1]
    if projection.in_features % head_dim or width % head_dim or projection.in_features % width:
        return None
    return {"q": queries, "kv": [inner for inner, _ in narrower], "heads": projection.in_features // head_dim,
            "kv_heads": width // head_dim, "head_dim": head_dim}


def grouped_heads_kept(kept: list[int], heads: int, kv_heads: int) -> tuple[list[int], list[int]]:
    """(query heads, key/value heads) that prune keeps in a grouped-query attention module where the query heads
    ``kept`` are open. The forward gives every key/value head the same number of query heads, so each group that
    keeps any keeps as many as the fullest group (closed ones, zero in the output projection, fill the others); a
    group with none goes with its key and value rows; where every head is closed one head of group 0 stays."""
    per_group = heads // kv_heads
    members = {group: [h for h in kept if h // per_group == group] for group in range(kv_heads)}
    groups = [group for group in range(kv_heads) if members[group]] or [0]
    width = max(1, max(len(members[group]) for group in groups))
    query_heads = []
    for group in groups:
        fill = [h for h in range(group * per_group, (group + 1) * per_group) if h not in members[group]]
        query_heads += sorted(members[group] + fill[: width - len(members[group])])
    return query_heads, groups


def set_kv_groups(module: nn.Module, groups: int) -> None:
    """Set a grouped-query attention module's query heads per key/value head (its forward repeats keys and values so)."""
    for name in _KV_GROUP_NAMES:
        if hasattr(module, name):
            setattr(module, name, groups)


def head_layouts(model: nn.Module) -> dict[str, dict]:
    """Per attention module of the user's own gated with ``("heads", n)`` or ``"block"`` whose heads prune
    can remove: ``{"projection": name of its output projection, "qkv": names of its three other Linear
    layers as wide as the projection's input (q, k, v), "heads": its head count, "head_dim": the width of
    one head, "min_width": the q/k/v rows kept when every head is closed}`` (JSON-serialisable). For
    grouped-query attention (:func:`grouped_projections`) ``"qkv"`` names the queries alone, ``"kv"`` the keys
    and values, and ``"kv_heads"`` their head count."""
    layouts = {}
    modules = dict(model.named_modules())
    for name, module, _, mask in gate_masks(model):
        owner = getattr(mask.gate, "owner", None)
        attention = modules.get(owner)
        if getattr(mask.gate, "granularity", None) not in ("heads", "block") or attention is None or owner in layouts or isinstance(
                attention, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.Linear)):
            continue
        qkv = query_key_value(attention, module)
        grouped = grouped_projections(attention, module) if len(qkv) != 3 else None
        if grouped is not None:  # grouped-query attention: query heads, and key/value heads with their groups
            layouts[owner] = {"projection": name, "qkv": [f"{owner}.{inner}" for inner in grouped["q"]],
                              "kv": [f"{owner}.{inner}" for inner in grouped["kv"]], "heads": grouped["heads"],
                              "kv_heads": grouped["kv_heads"], "head_dim": grouped["head_dim"], "min_width": grouped["head_dim"]}
            continue
        heads = declared_head_count(attention) or (mask.gate.log_alpha.numel() if mask.gate.granularity == "heads" else None)
        if len(qkv) != 3 or heads is None:  # a fused qkv layer, no output projection, no head count: no head can go
            continue
        head_dim = module.in_features // heads
        layouts[owner] = {"projection": name, "qkv": [f"{owner}.{inner}" for inner in qkv], "heads": heads,
                          "head_dim": head_dim, "min_width": _smallest_width(attention, head_dim)}
    return layouts


def query_key_value(attention: nn.Module, projection: nn.Linear) -> list[str]:
    """Names (inside ``attention``) of its Linear layers other than ``projection`` that make ``projection``'s input width."""
    return [inner for inner, linear in attention.named_modules()
            if isinstance(linear, nn.Linear) and linear is not projection and linear.out_features == projection.in_features]


MODULE_RULES: tuple[ModuleRule, ...] = (
    LinearRule(), ConvRule(), BatchNormRule(), GroupNormRule(), ChannelLayerNormRule(), ChannelwiseRule(), FlattenRule(),
    AttentionRule(), EncoderLayerRule(),
)


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of ``module``'s kind, or None (an operation the analysis does not know)."""
    return next((rule for rule in MODULE_RULES if rule.applies(module)), None)


def weight_product(module: nn.Module) -> WeightProduct | None:
    """The rule of a Linear or convolution (what mixes channels through a weight), else None."""
    rule = module_rule(module)
    return rule if isinstance(rule, WeightProduct) else None


def aten_owner_kinds() -> dict:
    """ATen op -> the module classes whose calls make it (for reading torch.export's graph at module level)."""
    owners: dict = {}
    for rule in MODULE_RULES:
        for op in rule.aten:
            owners[op] = owners.get(op, ()) + rule.kinds
    return owners


# --- functions and methods --------------------------------------------------------------------------------------


class FunctionRule:
    """How a call_function / call_method node is traced: ``functions`` and ``methods`` it covers."""

    functions: frozenset = frozenset()
    methods: frozenset = frozenset()

    def trace(self, trace: Trace, node: fx.Node, source) -> bool:
        return False


class ChannelwiseFunctions(FunctionRule):
    functions = frozenset({
        torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, torch.tanh, torch.sigmoid, F.hardtanh,
        F.hardswish, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.softplus,
    })
    methods = frozenset({"relu", "relu_", "tanh", "sigmoid", "contiguous", "clone", "detach"})
    not_zero_preserving = frozenset({torch.sigmoid, F.softplus, "sigmoid"})

    def trace(self, trace, node, source) -> bool:
        if source is not None:
            trace.pass_on(node, source)
            if node.target in self.not_zero_preserving:
                trace.not_zero_preserving(source)
        return True


class ScalarFunctions(FunctionRule):
    """Element-wise functions of one tensor and scalar settings: a power, a root, erf, a clamp, a division by a
    number (the pieces of GELU written out, as ``gelu_new``'s ``pow(x, 3)`` and tanh, ``gelu_python``'s erf).
    A channel's values change, not its place: the channels pass on. Any other tensor among the arguments (a
    tensor exponent or divisor) is not this rule's: the channels lock. Whether an exact 0 stays 0 depends on
    the function (and for a power or a clamp on its settings)."""

    functions = frozenset({
        torch.pow, operator.pow, torch.erf, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.square, torch.clamp,
        torch.clip, torch.exp, torch.expm1, torch.neg, operator.neg, torch.abs, operator.truediv, torch.div,
    })
    methods = frozenset({"pow", "erf", "sqrt", "rsqrt", "reciprocal", "square", "clamp", "clip", "exp", "expm1", "neg",
                         "abs", "div", "__truediv__"})
    _never_zero_at_zero = frozenset({torch.rsqrt, torch.reciprocal, torch.exp, "rsqrt", "reciprocal", "exp"})

    def trace(self, trace, node, source) -> bool:
        if node_inputs((node.args[1:], node.kwargs)):  # another tensor takes part
            return False
        if source is None:
            return True
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)
        settings = [*node.args[1:], *node.kwargs.values()]
        if node.target in self._never_zero_at_zero:
            keeps_zero = False
        elif name in ("pow", "__pow__"):  # 0 ** p is 0 for p > 0 only
            exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
            keeps_zero = isinstance(exponent, (int, float)) and exponent > 0
        elif name in ("clamp", "clip"):  # 0 stays 0 when the range holds it
            low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
            keeps_zero = (low is None or low <= 0) and (high is None or high >= 0)
        elif name in ("truediv", "div", "__truediv__"):
            keeps_zero = all(not isinstance(v, (int, float)) or v != 0 for v in settings)
        else:
            keeps_zero = True
        trace.pass_on(node, source)
        if not keeps_zero:
            trace.not_zero_preserving(source)
        return True


class BinaryFunctions(FunctionRule):
    """Additions and products: operands whose channels line up join one space (a residual connection)."""

    functions = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, operator.iadd, operator.imul})
    methods = frozenset({"add", "sub", "mul", "add_", "mul_"})
    additive = frozenset({operator.add, operator.sub, torch.add, torch.sub, operator.iadd, "add", "sub", "add_"})

    def trace(self, trace, node, source) -> bool:
        out_shape = trace.shape(node)
        if out_shape is None:
            return True
        infos = [(a, trace.channels[a]) for a in node_inputs((node.args, node.kwargs)) if a in trace.channels]
        untracked = [a for a in node_inputs(node.args) if a not in trace.channels and trace.shape(a) is not None
                     and math.prod(trace.shape(a)) > 1]
        if untracked:  # mixed with a tensor whose channels are unknown: slicing ours would break the shapes
            for arg, _ in infos:
                trace.lock(arg, f"{node.target} combines it with an untracked tensor")
            return True
        if node.target in self.additive and len(infos) < len([a for a in node.args if a is not None]):
            for _, info in infos:  # x + constant: a zero channel becomes the constant
                trace.not_zero_preserving(info)
        # operands whose channel dimension lines up with the result's join the same space
        joined = None
        for arg, info in infos:
            arg_shape = trace.shape(arg)
            offset = len(out_shape) - len(arg_shape)
            if info.block != 1 or arg_shape[info.dim] != out_shape[info.dim + offset]:
                if arg_shape[info.dim] != 1:
                    trace.lock(arg, f"{node.target} broadcasts it")
                continue
            if joined is None:
                joined = (info.space, info.dim + offset)
            elif joined[1] == info.dim + offset:
                joined = (trace.join(joined[0], info.space, f"{node.target}"), joined[1])
            else:
                trace.lock(arg, f"{node.target} joins it along another dimension")
        if joined is not None:
            trace.mark(node, *joined)
        return True


class FlattenFunctions(FunctionRule):
    functions = frozenset({torch.flatten})
    methods = frozenset({"flatten"})

    def trace(self, trace, node, source) -> bool:
        if source is not None:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            flatten(trace, node, source, start, end)
        return True


class PermuteFunctions(FunctionRule):
    """``permute``: the channels move to another dimension (channels-last layouts)."""

    functions = frozenset({torch.permute})
    methods = frozenset({"permute"})

    def trace(self, trace, node, source) -> bool:
        if source is None or source.block != 1:
            return False
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        ndim = len(trace.shape(node.args[0]))
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return False
        trace.pass_on(node, source, dim=[d % ndim for d in dims].index(source.dim))
        return True


class ReduceFunctions(FunctionRule):
    """Means, sums and maxima over other dimensions (global pooling): the channels pass on."""

    functions = frozenset({torch.mean, torch.sum, torch.amax})
    methods = frozenset({"mean", "sum", "amax"})

    def trace(self, trace, node, source) -> bool:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if source is None or dims is None or source.block != 1:
            return False
        ndim = len(trace.shape(node.args[0]))
        dims = [d % ndim for d in ((dims,) if isinstance(dims, int) else dims)]
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if source.dim in dims or not (keepdim or all(d > source.dim for d in dims)):
            return False
        trace.pass_on(node, source, block=1)
        return True


class ShapeQueries(FunctionRule):
    """``size``, ``dim``, attribute and item reads of untracked values: nothing to follow or lock."""

    functions = frozenset({getattr, operator.getitem})
    methods = frozenset({"size", "dim"})

    def trace(self, trace, node, source) -> bool:
        return node.op == "call_method" or source is None


class ScaledDotProductAttention(FunctionRule):
    """Attention written as a function (a pruned model's, an exported model's): its calls are recorded for the
    counts, and its channels locked."""

    functions = frozenset({F.scaled_dot_product_attention})

    def trace(self, trace, node, source) -> bool:
        trace.attention_calls.append((trace.shape(node.args[0]), trace.shape(node.args[1])))
        trace.attention_call_modules.append(trace.module_paths(node))
        return False


class AtenProducts(FunctionRule):
    """Products of torch.export's graph that no Linear module owns (an nn.MultiheadAttention's projections, its
    scores as bmm: counted as fixed; matmuls elsewhere, such as eager attention's scores, recorded with the modules
    they ran in): their channels locked."""

    functions = frozenset({_aten.linear.default, _aten.bmm.default, _aten.matmul.default})

    def trace(self, trace, node, source) -> bool:
        out_shape = trace.shape(node)
        if node.target is _aten.linear.default and out_shape is not None and trace.shape(node.args[1]) is not None:
            trace.other_macs += math.prod(out_shape) * trace.shape(node.args[1])[-1]
        elif node.target is not _aten.linear.default and out_shape is not None and trace.shape(node.args[0]) is not None:
            macs = math.prod(out_shape) * trace.shape(node.args[0])[-1]
            if any(isinstance(trace.model_modules.get(path), (nn.MultiheadAttention, nn.TransformerEncoderLayer))
                   for path in trace.module_paths(node)):
                trace.other_macs += macs
            else:  # eager attention's scores and weighted values: fewer where prune removes heads (CostModel)
                trace.products.append((macs, trace.module_paths(node)))
        return False


FUNCTION_RULES: tuple[FunctionRule, ...] = (
    ChannelwiseFunctions(), ScalarFunctions(), BinaryFunctions(), FlattenFunctions(), PermuteFunctions(), ReduceFunctions(), ShapeQueries(),
    ScaledDotProductAttention(), AtenProducts(),
)


def function_rule(node: fx.Node) -> FunctionRule | None:
    """The rule of a call_function / call_method node, or None."""
    for rule in FUNCTION_RULES:
        if (node.op == "call_function" and node.target in rule.functions) or (node.op == "call_method" and node.target in rule.methods):
            return rule
    return None


def flatten(trace: Trace, node: fx.Node, source, start: int, end: int) -> None:
    """A flatten of dims ``start..end``: of the channel dim and all after it makes blocks of features per channel."""
    in_shape = trace.shape(node.args[0])
    ndim = len(in_shape)
    start, end = start % ndim, end % ndim
    if source.block == 1 and start == source.dim and end == ndim - 1:
        trace.pass_on(node, source, dim=start, block=math.prod(in_shape[start + 1:]))
    elif source.dim < start or (source.dim > end):
        trace.pass_on(node, source, dim=source.dim - (end - start if source.dim > end else 0))
    else:
        trace.lock(node.args[0], "a flatten that splits its channels")


def node_inputs(args) -> list:
    """The fx nodes among ``args`` (nested in tuples, lists and dicts)."""
    found: list = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, fx.Node) else None)
    return found
