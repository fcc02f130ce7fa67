"""Normalisations over the channels (BatchNorm, GroupNorm, a LayerNorm over the channel dimension): followers of a space."""

from __future__ import annotations


from torch import nn

from .base import ModuleRule, aten, index_of, keep_along


class BatchNormRule(ModuleRule):
    """Per-channel statistics and affine: a follower (one entry per channel); a zero channel leaves it as β."""

    kinds = (nn.BatchNorm1d, nn.BatchNorm2d)
    aten = (aten.batch_norm.default,)

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None:
            return False
        trace.follow(node, name, source, zero_preserving=False)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        keep_along(module, ("weight", "bias", "running_mean", "running_var"), index_of(entries))
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
    aten = (aten.group_norm.default,)

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None or source.dim != 1 or source.block != 1 or trace.size_of(source) != module.num_channels:
            return False
        trace.follow(node, name, source, granule=module.num_channels // module.num_groups, zero_preserving=False)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        per_group = module.num_channels // module.num_groups
        keep_along(module, ("weight", "bias"), index_of(entries))
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
    aten = (aten.layer_norm.default,)

    def trace(self, trace, node, name, module, source) -> bool:
        in_shape = trace.shape(node.args[0])
        if source is None or source.block != 1 or in_shape is None or source.dim != len(in_shape) - 1:
            return False
        if tuple(module.normalized_shape) != (in_shape[-1],):
            return False
        trace.follow(node, name, source, granule=in_shape[-1], zero_preserving=False)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        keep_along(module, ("weight", "bias"), index_of(entries))
        module.normalized_shape = (len(entries),)
