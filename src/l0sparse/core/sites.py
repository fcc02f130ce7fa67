"""Where gates sit: one record per gated tensor, and the one walk over a model that finds them.

A gate reaches a model in one of two ways: a paper layer (:class:`~l0sparse.core.layers.L0Layer`) owns a
``gate`` that multiplies its own weight, or :func:`l0sparse.sparsify` registers a :class:`GateMask`
parametrization on a plain layer's weight. This module is the only one that knows both; the penalty,
the cost model and prune read :class:`GateSite` records from :func:`gate_sites` and :func:`charges`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .gates import Gate
from .layers import L0Layer

__all__ = ["GateSite", "Charge", "GateMask", "ConditionalComputation", "gate_sites", "charges", "find_gates", "gate_masks",
           "sum_per_gate", "raw_tensor", "run_plainly", "ungated_l2_tensors", "tied_tensors"]


class GateMask(nn.Module):
    """Parametrization ``weight -> weight * z``, with z broadcast along ``dim`` (each gate covering ``block`` entries)."""

    def __init__(self, gate: Gate, dim: int | None, block: int = 1) -> None:
        super().__init__()
        self.gate = gate
        self.dim = dim  # None: one gate per weight
        self.block = block

    def mask(self, like: Tensor) -> Tensor:
        z = self.gate().to(like.dtype)
        if self.dim is None:
            return z
        if self.block > 1:
            z = z.repeat_interleave(self.block)
        shape = [1] * like.dim()
        shape[self.dim] = -1
        return z.view(shape)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask(weight)

    def per_gate(self, values: Tensor) -> Tensor:
        """Sum ``values`` (shaped like the weight) over the entries each gate covers."""
        return sum_per_gate(values, self.dim, self.block)


class ConditionalComputation:
    """Mixin of a model whose forward reads its own gates to compute only the open units (``conditional``).

    Once the gates are folded into plain layers there is nothing to read: :func:`run_plainly` switches it off.
    """

    conditional: bool = False


@dataclass(frozen=True)
class GateSite:
    """One tensor that one gate multiplies."""

    name: str  # the module's name in the model
    module: nn.Module
    tensor: str  # "weight" or "bias"
    gate: Gate
    dim: int | None  # the tensor dimension the gate indexes; None: one gate per entry
    block: int = 1  # consecutive entries along ``dim`` that one gate covers
    owner: str = ""  # the name a λ mapping uses: the paper layer's, or the module whose sparsify rule made the gate

    def raw(self) -> Tensor:
        """The tensor before the gate (the trained values)."""
        return raw_tensor(self.module, self.tensor)

    def per_gate(self, values: Tensor) -> Tensor:
        """Sum ``values`` (shaped like the tensor) over the entries each gate covers."""
        return sum_per_gate(values, self.dim, self.block)


@dataclass(frozen=True)
class Charge:
    """What one gate pays for in the penalty: λ per entry of ``paid`` (the weights it removes in the layer that
    owns them), and ½·wd·θ² over the same entries."""

    gate: Gate
    owner: str
    paid: tuple[GateSite, ...]

    def entries_per_gate(self) -> int:
        return sum(site.raw().numel() for site in self.paid) // self.gate.log_alpha.numel()


def raw_tensor(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` before any parametrization (the trained values, not the gated ones)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def sum_per_gate(values: Tensor, dim: int | None, block: int = 1) -> Tensor:
    """Sum ``values`` over the entries that each gate covers: slices along ``dim`` in blocks of ``block``
    (``dim=None``: one gate per entry, nothing to sum)."""
    if dim is None:
        return values
    dim = dim % values.dim()
    others = [d for d in range(values.dim()) if d != dim]
    summed = values.sum(others) if others else values  # a reduction over no dimension would sum them all
    return summed.view(-1, block).sum(1) if block > 1 else summed


def gate_masks(model: nn.Module):
    """Yield ``(module_name, module, tensor_name, GateMask)`` for every gate parametrization in ``model``."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, parametrizations in module.parametrizations.items():
            for parametrization in parametrizations:
                if isinstance(parametrization, GateMask):
                    yield name, module, tensor_name, parametrization


def gate_sites(model: nn.Module) -> list[GateSite]:
    """Every tensor a gate multiplies in ``model``, in module order: the paper layers' own, then sparsify's masks."""
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, L0Layer):
            sites += [GateSite(name, module, tensor, module.gate, module.gated_dim, 1, name)
                      for tensor in module.gated_tensors if getattr(module, tensor, None) is not None]
    for name, module, tensor, mask in gate_masks(model):
        sites.append(GateSite(name, module, tensor, mask.gate, mask.dim, mask.block, mask.gate.owner or ""))
    return sites


def tied_tensors(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Every tensor that several modules use (an output head tied to its embedding), as its uses: ``(module name,
    tensor name)``, a parametrized module's use through its parametrization's ``original`` included."""
    uses: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its ``original`` is counted as the parametrized module's own tensor, below
        for tensor_name, tensor in module._parameters.items():
            if tensor is not None:
                uses.setdefault(id(tensor), []).append((name, tensor_name))
        if parametrize.is_parametrized(module):
            for tensor_name, parametrizations in module.parametrizations.items():
                uses.setdefault(id(parametrizations.original), []).append((name, tensor_name))
    return [group for group in uses.values() if len(group) > 1]


def find_gates(model: nn.Module) -> list[Gate]:
    """Every :class:`Gate` in ``model``, each once, in module order."""
    return [module for module in model.modules() if isinstance(module, Gate)]


def charges(model: nn.Module, output_dim: Callable[[nn.Module], int] = lambda module: 0) -> list[Charge]:
    """Per gate of ``model``, once: the weights it pays for in the layer that owns them.

    A gate pays for the entries it multiplies (a paper layer's columns or filters, sparsify's input
    columns, head blocks, single weights), except a sparsify output-unit gate, which multiplies the
    columns of the layers that read its channels but pays for the rows (weight and bias) of the layers
    that produce them, once per producing layer, as :class:`~l0sparse.L0Conv2d`'s gate pays for its filters.
    ``output_dim`` says which dimension of a producer's weight holds its rows (0, or 1 for a weight stored
    ``[in, out]``, as its rule says: :class:`~l0sparse.Penalty` passes it).
    """
    names = {id(module): name for name, module in model.named_modules()}
    found: dict[int, Charge] = {}
    for site in gate_sites(model):
        gate, entry = site.gate, found.get(id(site.gate))
        producers = getattr(gate, "producers", ())
        if producers and entry is None:
            found[id(gate)] = Charge(gate, site.owner, _paid_by_producers(gate, site.owner, names, output_dim))
        elif not producers:
            found[id(gate)] = Charge(gate, site.owner, (*(entry.paid if entry else ()), site))
    for gate in find_gates(model):  # a gate that multiplies no tensor itself but pays for producers: a hidden gate that acts
        if id(gate) not in found and getattr(gate, "producers", ()):  # in its norms alone (OpenLayerNorm in a decoder)
            found[id(gate)] = Charge(gate, gate.owner or "", _paid_by_producers(gate, gate.owner or "", names, output_dim))
    return list(found.values())


def _paid_by_producers(gate: Gate, owner: str, names: dict[int, str], output_dim: Callable[[nn.Module], int]) -> tuple[GateSite, ...]:
    """The sites a gate with ``producers`` pays for: a producer's unit is a row of a Linear or conv (its weight's
    ``output_dim``, its bias's entry), a column of an embedding table (a hidden gate's)."""
    def dim(producer: nn.Module, tensor: str) -> int:
        return 1 if isinstance(producer, nn.Embedding) else 0 if tensor == "bias" else output_dim(producer)

    return tuple(GateSite(names[id(producer)], producer, tensor, gate, dim(producer, tensor), 1, owner)
                 for producer in gate.producers for tensor in ("weight", "bias") if getattr(producer, tensor, None) is not None)


def ungated_l2_tensors(model: nn.Module) -> list[Tensor]:
    """Tensors the penalty's L2 term covers with no gate: the paper layers' (L0Linear's bias)."""
    return [tensor for module in model.modules() if isinstance(module, L0Layer)
            for tensor in (getattr(module, name, None) for name in module.ungated_l2) if tensor is not None]


def run_plainly(model: nn.Module) -> None:
    """Switch off conditional computation in ``model`` (its gates have been folded: none are left to skip units by)."""
    for module in model.modules():
        if isinstance(module, ConditionalComputation):
            module.conditional = False
