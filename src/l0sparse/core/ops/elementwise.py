"""Element-wise operations: activations and pooling (the channels pass on), functions of one tensor and numbers, and
sums and products that join the spaces of their operands (residual connections)."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .base import FunctionRule, ModuleRule, aten, node_inputs


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


class ChannelwiseFunctions(FunctionRule):
    aten = {
        aten.relu.default: torch.relu, aten.relu_.default: torch.relu, aten.gelu.default: F.gelu, aten.silu.default: F.silu,
        aten.silu_.default: F.silu, aten.tanh.default: torch.tanh, aten.sigmoid.default: torch.sigmoid,
        aten.hardtanh.default: F.hardtanh, aten.hardswish.default: F.hardswish, aten.dropout.default: F.dropout,
        aten.leaky_relu.default: F.leaky_relu, aten.elu.default: F.elu, aten.mish.default: F.mish, aten.softplus.default: F.softplus,
        aten.max_pool1d.default: F.max_pool1d, aten.max_pool2d.default: F.max_pool2d, aten.avg_pool1d.default: F.avg_pool1d,
        aten.avg_pool2d.default: F.avg_pool2d, aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
        aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    }
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

    aten = {
        aten.pow.Tensor_Scalar: torch.pow, aten.erf.default: torch.erf, aten.sqrt.default: torch.sqrt, aten.rsqrt.default: torch.rsqrt,
        aten.reciprocal.default: torch.reciprocal, aten.square.default: torch.square, aten.clamp.default: torch.clamp,
        aten.clip.default: torch.clip, aten.exp.default: torch.exp, aten.expm1.default: torch.expm1, aten.neg.default: torch.neg,
        aten.abs.default: torch.abs, aten.div.Tensor: operator.truediv,
    }
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

    aten = {aten.add.Tensor: operator.add, aten.add_.Tensor: operator.add, aten.sub.Tensor: operator.sub, aten.mul.Tensor: operator.mul,
            aten.mul_.Tensor: operator.mul}
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
