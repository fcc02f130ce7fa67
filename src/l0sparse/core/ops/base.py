"""What every rule is made of: the trace a rule moves on (:class:`Trace`), the two kinds of rule (:class:`ModuleRule`,
:class:`FunctionRule`), and the small helpers rules share."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import fx, nn


aten = torch.ops.aten  # the ATen namespace, as rules name the ops torch.export makes


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
    #: the granularities :func:`l0sparse.sparsify` may put on such a module, and the one it puts there by default
    granularities: tuple[str, ...] = ()
    default_granularity: str | None = None
    #: the rule gates and counts the module's submodules itself (attention): none of them gets a gate or a count of its own
    covers_submodules: bool = False
    #: why a "block" gate cannot go on such a module, where the general "no output projection" says too little
    block_refusal: str | None = None
    #: whether torch.fx keeps such modules leaves (a rule that only describes a module's insides, such as
    #: :meth:`head_layout`, lets fx trace through it)
    leaf: bool = True

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, self.kinds)

    def allows(self, module: nn.Module, granularity: str) -> bool:
        """Whether ``granularity`` (no ``+block``) may go on ``module``."""
        return granularity in self.granularities

    def block_projection(self, module: nn.Module) -> nn.Module | None:
        """The Linear whose input columns one ``"block"`` gate on ``module`` covers, or None (no block gate)."""
        return None

    def head_count(self, module: nn.Module) -> int | None:
        """The module's number of attention heads (what a ``"heads"`` gate has one entry per), or None."""
        return None

    def check_heads(self, name: str, module: nn.Module, num_heads: int | None) -> None:
        """Refuse (ValueError naming ``name``) a ``"heads"`` rule the module cannot take, before any gate is added."""

    def gate_heads(self, name: str, module: nn.Module, new_gate) -> None:
        """Attach the ``"heads"`` gates; ``new_gate(shape, granularity, charged_module)`` makes each."""
        raise NotImplementedError(f"{type(module).__name__} has no heads to gate")

    def head_layout(self, module: nn.Module) -> dict | None:
        """Where the heads of an attention module with FUSED projections lie (:class:`l0sparse.core.ops.fused.FusedHeads`),
        or None: an attention module of separate q/k/v Linear layers is read by structure instead."""
        return None

    def unit_layout(self, module: nn.Module) -> dict | None:
        """Where the units of a feed-forward block with a FUSED input projection lie
        (:class:`l0sparse.core.ops.fused.FusedUnits`), or None."""
        return None

    def units_inside(self, module: nn.Module) -> tuple[str, str] | None:
        """(producer, consumer) names inside the module whose units prune slices within it (a traced leaf), or None."""
        return None

    def trace(self, trace: Trace, node: fx.Node, name: str, module: nn.Module, source) -> bool:
        return False

    def slice(self, module: nn.Module, rows=None, columns=None, entries=None) -> None:
        """Keep ``rows`` (output channels), ``columns`` (input channels) or ``entries`` (a follower's channels)."""
        raise NotImplementedError(f"{type(module).__name__} cannot be sliced")

    def dense_macs(self, module: nn.Module, inputs: tuple, output) -> int | None:
        """MACs of one call of ``module`` with nothing removed, for :func:`l0sparse.count_flops`; None: not counted."""
        return None


def index_of(kept) -> torch.Tensor:
    return torch.as_tensor(kept, dtype=torch.long)


@torch.no_grad()
def keep_along(module: nn.Module, attributes: tuple[str, ...], index: torch.Tensor, dim: int = 0) -> None:
    """Keep ``index`` along ``dim`` of each of ``module``'s tensors named in ``attributes`` (absent ones skipped)."""
    for attribute in attributes:
        tensor = getattr(module, attribute, None)
        if tensor is not None:
            tensor.data = tensor.data.index_select(dim, index.to(tensor.device)).clone()


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class FunctionRule:
    """How a call_function / call_method node is traced: the ``functions`` and ``methods`` it covers, and ``aten``."""

    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    aten: dict = {}  # ATen op of torch.export's graph -> the function above it stands for (same argument order)

    def trace(self, trace: Trace, node: fx.Node, source) -> bool:
        return False


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
