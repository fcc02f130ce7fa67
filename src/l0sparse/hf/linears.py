"""transformers' own forms of a Linear layer, read as the Linear each is by rules registered when ``l0sparse.hf`` is
imported (matched by class name, so that registering them imports nothing of transformers):

- ``Conv1D`` (GPT-2, and the models that copy its layers): a Linear whose weight is stored transposed, ``[in, out]``,
  computed as ``addmm(bias, x.view(-1, in), weight).view(..., out)``: input columns are the weight's dimension 0
  (:attr:`l0sparse.core.ops.WeightProduct.in_dim`), output rows its dimension 1 and the bias;
- ``FalconLinear``: an ``nn.Linear`` with a forward of its own, ``input @ weight.T (+ bias)``, which torch.export shows
  as a ``matmul`` (and an ``add``) instead of a ``linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.ops import LinearRule, WeightProduct, register_rule
from ..core.sites import raw_tensor


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (or a subclass: parametrize's ``ParametrizedConv1D``): that class name, ``nf`` outputs, ``nx``
    inputs and a weight stored (nx, nf). Asked of every module a rule is looked up for: the class name first, and a gated
    weight read without running its parametrization (which would draw a gate sample)."""
    if not any(kind.__name__ == "Conv1D" for kind in type(module).__mro__):
        return False
    widths = (getattr(module, "nx", None), getattr(module, "nf", None))
    weight = raw_tensor(module, "weight") if parametrize.is_parametrized(module, "weight") else module._parameters.get("weight")
    return all(isinstance(width, int) for width in widths) and isinstance(weight, torch.Tensor) and tuple(weight.shape) == widths


class Conv1DRule(WeightProduct):
    """``Conv1D`` as a Linear with a transposed weight: traced as a consumer of its input channels (the weight's rows)
    and a producer of its output channels (the weight's columns and the bias); ``"in"`` gates on its inputs."""

    kinds = (nn.Module,)  # applies() decides, by class name
    widths = ("nf", "nx")
    in_dim = 0
    aten = (torch.ops.aten.addmm.default,)  # its computation under torch.export: the input is addmm's first non-parameter
    granularities = ("in",)
    default_granularity = None  # as nn.Linear under decoder_rules: gated where a rule names it

    def applies(self, module: nn.Module) -> bool:
        return is_conv1d(module)

    def block_projection(self, module: nn.Module) -> nn.Module:
        return module

    def trace(self, trace, node, name, module, source) -> bool:
        in_shape = trace.shape(node.args[0])
        if source is not None and in_shape is not None and source.dim == len(in_shape) - 1:
            trace.consume(name, source, dim=self.in_dim)
        else:
            trace.read_unfollowed(node, name, f"{name} reads it along a non-channel dimension")
        trace.produce(node, name, -1)
        return True

    @torch.no_grad()
    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        if rows is not None:
            index = torch.as_tensor(rows, dtype=torch.long, device=module.weight.device)
            module.weight.data = module.weight.data.index_select(1, index).clone()
            module.bias.data = module.bias.data.index_select(0, index).clone()
            module.nf = len(rows)
        if columns is not None:
            index = torch.as_tensor(columns, dtype=torch.long, device=module.weight.device)
            module.weight.data = module.weight.data.index_select(0, index).clone()
            module.nx = len(columns)

    def positions(self, out_shape) -> int:
        return math.prod(out_shape[:-1])


class FalconLinearRule(LinearRule):
    """``FalconLinear`` as the nn.Linear it subclasses: its call is the ``matmul`` torch.export shows (a bias, where it
    has one, is added after it)."""

    aten = (torch.ops.aten.matmul.default,)

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and any(kind.__name__ == "FalconLinear" for kind in type(module).__mro__)


_handles: list = []


def register_linear_rules() -> None:
    """Register :class:`Conv1DRule` and :class:`FalconLinearRule` (once; ``import l0sparse.hf`` does it)."""
    if not _handles:
        _handles.extend(register_rule(rule) for rule in (Conv1DRule(), FalconLinearRule()))
