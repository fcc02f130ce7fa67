"""Layers that mix channels through a weight (Linear, convolutions): traced as consumers and producers of channel
spaces, sliced by rows and columns, counted as weight products."""

from __future__ import annotations

import math

from torch import nn

from ..layers import L0Conv2d, L0Linear
from .base import ModuleRule, aten, index_of, keep_along


class WeightProduct(ModuleRule):
    """A layer that mixes channels through a weight of shape (out, in, *kernel): it consumes the space of
    its input channels and produces a new space of output channels (rows)."""

    widths: tuple[str, str]  # the module's attributes that hold its output and input widths
    #: the weight's dimension that holds the input columns (the output rows are the other of its first two): 1 for
    #: Linear and convolutions, 0 for a layer whose weight is stored transposed, [in, out] (transformers' Conv1D)
    in_dim: int = 1

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        if rows is not None:
            keep_along(module, ("weight", "bias"), index_of(rows))
            setattr(module, self.widths[0], len(rows))
        if columns is not None:
            keep_along(module, ("weight",), index_of(columns), dim=1)
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
    aten = (aten.linear.default,)
    granularities = ("in", "out", "weight")
    default_granularity = "in"

    def block_projection(self, module):
        return module

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
    aten = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)

    granularities = ("in", "out", "weight")
    default_granularity = "out"

    def applies(self, module) -> bool:
        return isinstance(module, self.kinds) and not isinstance(module, nn.modules.conv._ConvTransposeNd)

    def allows(self, module, granularity) -> bool:  # a grouped conv has no per-input-channel columns
        return granularity in self.granularities and (granularity != "in" or module.groups == 1)

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
            keep_along(module, ("weight", "bias"), index_of(entries))
            module.in_channels = module.out_channels = module.groups = len(entries)
        super().slice(module, rows, columns)

    def positions(self, out_shape) -> int:
        return out_shape[0] * math.prod(out_shape[2:])
