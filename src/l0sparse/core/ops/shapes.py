"""Operations that move or merge dimensions: flatten, permute, reductions over other dimensions, and shape queries."""

from __future__ import annotations

import operator

import torch
from torch import nn

from .base import FunctionRule, ModuleRule, aten, flatten


class FlattenRule(ModuleRule):
    kinds = (nn.Flatten,)

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None:
            return False
        flatten(trace, node, source, module.start_dim, module.end_dim)
        return True


class FlattenFunctions(FunctionRule):
    aten = {aten.flatten.using_ints: torch.flatten}
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

    aten = {aten.permute.default: torch.permute}
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


class ReshapeFunctions(FunctionRule):
    """``view`` and ``reshape`` that keep the last dimension whole where the channels are (merging or splitting the
    positions before it: a Conv1D's ``x.view(-1, x.size(-1))`` and back): the channels pass on, still last. Any other
    reshape of the channels (into heads) is left to lock them."""

    aten = {aten.view.default: torch.reshape, aten.reshape.default: torch.reshape}
    functions = frozenset({torch.reshape})
    methods = frozenset({"view", "reshape"})

    def trace(self, trace, node, source) -> bool:
        in_shape, out_shape = trace.shape(node.args[0]), trace.shape(node)
        if source is None or source.block != 1 or in_shape is None or out_shape is None or len(out_shape) == 0:
            return False
        if source.dim != len(in_shape) - 1 or out_shape[-1] != in_shape[-1]:
            return False
        trace.pass_on(node, source, dim=len(out_shape) - 1)
        return True


class ReduceFunctions(FunctionRule):
    """Means, sums and maxima over other dimensions (global pooling): the channels pass on."""

    aten = {aten.mean.dim: torch.mean, aten.sum.dim_IntList: torch.sum}
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
