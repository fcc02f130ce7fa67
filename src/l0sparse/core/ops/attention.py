"""PyTorch's own attention (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, ``F.scaled_dot_product_attention``):
its rules, its counts, and the fx rewrites with which prune removes closed heads."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from torch.nn.utils import parametrize

from ..sites import GateMask
from .base import FunctionRule, ModuleRule, aten, set_submodule


def attention_module_is_plain(module: nn.MultiheadAttention) -> bool:
    """Projections + scaled dot-product attention, nothing else: what prune can rebuild with fewer heads."""
    return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn


class AttentionRule(ModuleRule):
    """nn.MultiheadAttention: its channels are locked; its calls are recorded, and the plain ones (no masks,
    only the output read) can lose their closed heads."""

    kinds = (nn.MultiheadAttention,)
    granularities = ("heads",)
    default_granularity = "heads"
    covers_submodules = True

    def block_projection(self, module):
        return module.out_proj

    def head_count(self, module) -> int:
        return module.num_heads

    def open_heads(self, module) -> torch.Tensor:
        """Per head: whether any of its ``out_proj`` columns is non-zero (a closed head's are zero once gates are folded)."""
        head_dim = module.embed_dim // module.num_heads
        return module.out_proj.weight.ne(0).any(0).view(module.num_heads, head_dim).any(1)

    def check_heads(self, name, module, num_heads) -> None:
        if num_heads is not None and num_heads != module.num_heads:
            raise ValueError(f"sparsify: rule ('heads', {num_heads}) on {name!r}: the module has {module.num_heads} heads")
        if not module._qkv_same_embed_dim:
            raise ValueError(f"sparsify: {name!r}: 'heads' needs query, key and value of the same size")

    def gate_heads(self, name, module, new_gate) -> None:
        """One gate per head over the head's block of ``out_proj``'s columns."""
        gate = new_gate(module.num_heads, "heads", module)
        parametrize.register_parametrization(module.out_proj, "weight",
                                             GateMask(gate, dim=1, block=module.embed_dim // module.num_heads))

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
    granularities = ("heads",)
    default_granularity = "heads"
    covers_submodules = True
    block_refusal = "an encoder layer holds two blocks; put the rule on its 'self_attn' or 'linear2' and 'skip' the layer"

    def head_count(self, module) -> int:
        return module.self_attn.num_heads

    def check_heads(self, name, module, num_heads) -> None:
        AttentionRule().check_heads(name, module.self_attn, num_heads)

    def gate_heads(self, name, module, new_gate) -> None:
        """The heads of its attention, and its feed-forward hidden units (one gate each, on ``linear2``'s columns)."""
        AttentionRule().gate_heads(name, module.self_attn, new_gate)
        units = new_gate(module.linear1.out_features, "out", module.linear1)
        units.producers = (module.linear1,)
        parametrize.register_parametrization(module.linear2, "weight", GateMask(units, dim=1))

    def units_inside(self, module) -> tuple[str, str]:
        return "linear1", "linear2"

    def expected_costs(self, module, in_shapes: list, units, attention, ungated_params: int) -> tuple:
        """(MACs over the calls, parameters) with ``units`` feed-forward units kept (a count, or an expected one) and
        the attention's own count: ``attention(submodule, query_length, key_length)`` gives its (MACs, parameters)."""
        embed, full_units = module.linear1.in_features, module.linear1.out_features
        macs, attention_params, tokens = 0, 0, 0
        for in_shape in in_shapes:
            sequences, tokens = attention_layout(module.self_attn, in_shape)
            attention_macs, attention_params = attention("self_attn", tokens, tokens)
            macs = macs + sequences * (attention_macs + 2 * tokens * embed * units)
        feed_forward = 2 * embed * full_units + full_units
        full_attention = attention_cost(module.self_attn, tokens, tokens)[1]
        return macs, ungated_params - feed_forward - full_attention + attention_params + units * (2 * embed + 1)

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


class ScaledDotProductAttention(FunctionRule):
    """Attention written as a function (a pruned model's, an exported model's): its calls are recorded for the
    counts, and its channels locked."""

    aten = {aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention}
    functions = frozenset({F.scaled_dot_product_attention})

    def trace(self, trace, node, source) -> bool:
        trace.attention_calls.append((trace.shape(node.args[0]), trace.shape(node.args[1])))
        trace.attention_call_modules.append(trace.module_paths(node))
        return False


class AtenProducts(FunctionRule):
    """Products of torch.export's graph that no Linear module owns (an nn.MultiheadAttention's projections, its
    scores as bmm: counted as fixed; matmuls elsewhere, such as eager attention's scores, recorded with the modules
    they ran in): their channels locked."""

    functions = frozenset({aten.linear.default, aten.bmm.default, aten.matmul.default})

    def trace(self, trace, node, source) -> bool:
        out_shape = trace.shape(node)
        if node.target is aten.linear.default and out_shape is not None and trace.shape(node.args[1]) is not None:
            trace.other_macs += math.prod(out_shape) * trace.shape(node.args[1])[-1]
        elif node.target is not aten.linear.default and out_shape is not None and trace.shape(node.args[0]) is not None:
            macs = math.prod(out_shape) * trace.shape(node.args[0])[-1]
            if any(isinstance(trace.model_modules.get(path), (nn.MultiheadAttention, nn.TransformerEncoderLayer))
                   for path in trace.module_paths(node)):
                trace.other_macs += macs
            else:  # eager attention's scores and weighted values: fewer where prune removes heads (CostModel)
                trace.products.append((macs, trace.module_paths(node)))
        return False
