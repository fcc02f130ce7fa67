"""Costs over every gate of a model: expected L0, the L0 (+ L2) penalty, expected MACs and parameters.

MACs are the multiply-accumulates of Linear and conv weights (and attention) for one example; bias
additions, normalisation and activations are not counted. The public names say "flops" (``count_flops``,
``expected_flops``, the ``"flops"`` key of :meth:`CostModel.costs`) for compatibility, and mean MACs;
the code says ``macs`` (docs/design.md, "Names").
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import operator
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .distributions import log_ratio_zero
from .gates import Gate, accumulation_dtype, as_number, check_lam
from .graph import check_example_batch, check_module, evaluating, example_tuple, run_batch, trace_channels
from .stream import hidden_gate
from .layers import L0Layer
from .ops import (AttentionRule, EncoderLayerRule, WeightProduct, attention_cost, attention_layout, fused_unit_layouts, grouped_heads_kept,
                  head_layouts, input_dim, module_rule, scaled_dot_product_macs, weight_product)
from .sites import Charge, GateSite, charges, find_gates, gate_sites, raw_tensor, tied_tensors, ungated_l2_tensors

__all__ = ["expected_l0", "penalty", "Penalty", "CostModel", "expected_flops", "expected_params", "count_flops", "count_params",
           "median_latency"]


def expected_l0(model: nn.Module) -> Tensor:
    """Σ P(z ≠ 0) over every gate of ``model`` (a differentiable scalar)."""
    found = find_gates(model)
    if not found:
        raise ValueError("model has no l0sparse gates: build it from L0 layers or call l0sparse.sparsify first")
    return torch.stack([gate.expected_l0() for gate in found]).sum()


def _lam_for(name: str, lam) -> float:
    """λ for one layer: ``lam`` itself, or its entry in a mapping of names / glob patterns (the paper's "λ sep.")."""
    if not isinstance(lam, Mapping):
        return lam
    if name in lam:
        return lam[name]
    for pattern, value in lam.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    raise ValueError(f"lam has no entry for the gates of {name!r}: give it by name or by a glob pattern such as '*'")


def penalty(model: nn.Module, lam: float | Mapping[str, float], weight_decay: float = 0.0, N: int = 1,
            cost_weights: Mapping[int, Tensor] | None = None) -> Tensor:
    """Σ_g P(z_g ≠ 0) · Σ_{j∈g} (λ_g + ½·wd·θ_j²) over every gate of ``model``, divided by ``N``.

    ``lam`` is the paper's λ per weight, before the division by the
    training-set size; pass ``N`` = training-set size to get the term that
    goes beside a mean loss. A gate pays for the weights it removes in the
    layer that owns it, the same on the paper's layers and on ``sparsify``
    gates: an input gate (``L0Linear``, ``"in"``) for its weight column; an
    output-channel gate (``L0Conv2d``, ``"out"``) for its channel's filter
    and bias in the layer that produces the channel (not for the columns of
    the layers that read it), once per producing layer when channels are
    coupled (residual additions; a depthwise conv's filter counts too); a
    head gate for its block of output-projection columns; a per-weight gate
    for its weight. The ½·wd·θ² term covers the same weights. ``lam`` may
    also map layer names or glob patterns to their own λ (the paper's
    "λ sep."): the name is the L0 layer's, or for ``sparsify`` gates the
    module whose rule made the gate (``gate.owner``). Biases that no gate
    removes carry only the L2 term on the paper's layers and no term on
    ``sparsify`` gates (use the optimizer's weight decay). The sum is
    accumulated in float32 (or the model's wider dtype).

    ``cost_weights`` (from :meth:`CostModel.gate_costs`) charges λ per unit
    of cost instead of per weight: each gate's λ·|g| becomes λ·c_g, with c_g
    the MACs (or parameters) that closing the unit saves, so λ·Σ c_g·P(z_g ≠ 0)
    is a linear estimate of the expected cost. Compute them once, before
    training: ``weights = CostModel(model, x).gate_costs("flops")``.

    In a training loop build a :class:`Penalty` once and call it each step:
    this function walks the model on every call.
    """
    return Penalty(model, lam, weight_decay, N, cost_weights)()


class _ChargedProbNonzero(torch.autograd.Function):
    """Σ_i charge_i · sigmoid(log α_i − offset) over several log α tensors, as one autograd node.

    The gradient is charge · p · (1 − p), written out: one node and two in-place passes, where plain
    autograd made a node and a freshly allocated tensor per op (cat, sub, sigmoid, dot and their
    backwards). benchmarks/penalty_node.py measures the difference (small: about 2% of a step).
    The sum is accumulated in ``charge``'s dtype (float32 or wider): in float16 the charges of a
    LeNet-5 (λ·weights per gate) overflow before the division by N.
    """

    @staticmethod
    def forward(ctx, offset: float, charge: Tensor, *log_alphas: Tensor) -> Tensor:
        prob = torch.cat([log_alpha.reshape(-1).to(charge.dtype) for log_alpha in log_alphas]).sub_(offset).sigmoid_()
        ctx.save_for_backward(prob, charge)
        ctx.shapes = [(log_alpha.shape, log_alpha.dtype) for log_alpha in log_alphas]
        return torch.dot(prob, charge)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor):
        prob, charge = ctx.saved_tensors
        grad = torch.addcmul(prob, prob, prob, value=-1.0).mul_(charge).mul_(grad_total)  # p(1-p)·charge·g
        parts = grad.split([shape.numel() for shape, _ in ctx.shapes])
        return (None, None, *(part.view(shape).to(dtype) for part, (shape, dtype) in zip(parts, ctx.shapes)))


class Penalty:
    """:func:`penalty` prepared once: each call is one autograd node (``cat``, sigmoid, dot) over all gates.

    The λ charge of every gate (per weight, per name, or per unit of cost) is fixed when it is built;
    the ½·wd·θ² part, which depends on the weights, is computed per call. Rebuild it after changing
    the model's gates (``sparsify`` again, a new layer).
    """

    def __init__(self, model: nn.Module, lam: float | Mapping[str, float], weight_decay: float = 0.0, N: int = 1,
                 cost_weights: Mapping[int, Tensor] | None = None) -> None:
        check_module(model, "penalty")
        # numpy and 0-d tensor scalars are numbers too: taken as Python floats (and N as an int)
        if isinstance(lam, Mapping):
            lam = {key: check_lam(value, weight_decay)[0] for key, value in lam.items()}
            weight_decay = check_lam(0.0, weight_decay)[1]
        else:
            lam, weight_decay = check_lam(lam, weight_decay)
        size = as_number(N, integral=True)
        if size is None or size < 1:
            raise ValueError(f"N (the training-set size) must be a positive int, got {N!r}")
        N = size
        self.model, self.weight_decay, self.N = model, weight_decay, N
        self._charges = charges(model, lambda module: 1 - input_dim(module))  # a producer's rows: a Conv1D's weight columns
        self._ungated = ungated_l2_tensors(model)
        if not self._charges:
            raise ValueError("model has no l0sparse gates: build it from L0 layers or call l0sparse.sparsify first")
        if cost_weights is not None:
            missing = [charge for charge in self._charges if id(charge.gate) not in cost_weights]
            if missing:
                raise ValueError(f"cost_weights has no entry for {len(missing)} gate(s): compute it with CostModel(model, x).gate_costs() on this model")
        per_gate = (lambda charge: cost_weights[id(charge.gate)].detach()) if cost_weights is not None else Charge.entries_per_gate
        charged = [(charge.gate, _lam_for(charge.owner, lam) * per_gate(charge)) for charge in self._charges]
        # gates with equal (β, γ, ζ) share one sigmoid: usually a single group for the whole model
        self._groups: dict[tuple, tuple[list[Gate], Tensor]] = {}
        for gate, charge in charged:
            key = (gate.beta, gate.gamma, gate.zeta)
            members, parts = self._groups.setdefault(key, ([], []))
            members.append(gate)
            parts.append(torch.as_tensor(charge, dtype=accumulation_dtype(gate.log_alpha.dtype)).expand(gate.shape).reshape(-1))
        self._groups = {key: (members, torch.cat(parts)) for key, (members, parts) in self._groups.items()}

    def __call__(self) -> Tensor:
        total = None
        for (beta, gamma, zeta), (members, charge) in self._groups.items():
            first = members[0].log_alpha
            # .to is a no-op unless the model moved device or dtype after this was built
            term = _ChargedProbNonzero.apply(log_ratio_zero(beta, gamma, zeta),
                                             charge.to(first.device, accumulation_dtype(first.dtype)),
                                             *(gate.log_alpha for gate in members))
            total = term if total is None else total + term
        if self.weight_decay:
            total = total + self._weight_decay_term()
        return total / self.N

    def _weight_decay_term(self) -> Tensor:
        """Σ_g P(z_g ≠ 0) · ½·wd·Σ_{j∈g} θ_j², plus ½·wd·θ² of the tensors no gate removes (L0Linear's bias):
        changes with the weights, so computed on every call."""
        terms = []
        for charge in self._charges:
            dtype = accumulation_dtype(charge.gate.log_alpha.dtype)
            squares = functools.reduce(operator.add, [site.per_gate(site.raw().to(dtype).pow(2)) for site in charge.paid])
            terms.append((charge.gate.prob_nonzero().to(dtype) * squares).sum())
        terms += [tensor.to(accumulation_dtype(tensor.dtype)).pow(2).sum() for tensor in self._ungated]
        return torch.stack([term.to(accumulation_dtype(term.dtype)) for term in terms]).sum() * (0.5 * self.weight_decay)


def _gated_probabilities(sites: list[GateSite], dims: tuple, prob) -> Tensor | None:
    """P(slice j along the weight's dimension ``dims[0]`` is read) from the gates of ``sites`` on that dimension
    (``None`` in ``dims``: per-weight gates, whose slice is read while any of its weights is open); None if ungated."""
    result = None
    for site in sites:
        if site.tensor != "weight" or site.dim not in dims:
            continue
        probability = prob(site.gate)
        if site.dim is None:
            along = dims[0]
            closed = (1 - probability).movedim(along, 0).reshape(probability.shape[along], -1).prod(1)
            probability = 1 - closed
        elif site.block > 1:
            probability = probability.repeat_interleave(site.block)
        result = probability if result is None else result * probability
    return result


def _channel_reads(sites: list[GateSite], size: int, block: int, prob) -> tuple[dict, Tensor | None] | None:
    """How a consumer reads channel c (``size`` channels of ``block`` consecutive columns each), from the gates on
    its weight columns (``sites``): ``(shared, varying)``, or None if ungated.

    It reads c when every ``shared`` gate is open (a gate whose unit spans the channel's whole block, keyed by
    gate: an "out" gate after a flatten is one event for the channel, not ``block`` independent ones) and
    ``varying`` (P(some column's other gates are open), per channel; None: no such gates) comes true. Gates that
    vary inside the block are independent across their units; where several cut the block into different
    units, columns are taken as independent (an approximation).
    """
    shared: dict[tuple, Tensor] = {}
    varying: list[tuple[int, Tensor]] = []  # (columns per unit, P(open) per unit)
    for site in sites:
        if site.tensor != "weight" or site.dim not in (1, None):
            continue
        if site.dim == 1 and site.block % block == 0:
            key = (id(site.gate), site.block // block)
            probability = prob(site.gate).repeat_interleave(site.block // block)
            shared[key] = probability * shared[key] if key in shared else probability
        else:
            width = site.block if site.dim == 1 else 1  # a per-weight gate: each column is read on its own
            varying.append((width, _gated_probabilities([site], (1, None), prob)[::width]))
    if not shared and not varying:
        return None
    if not varying:
        return shared, None
    widths = {width for width, _ in varying}
    width = widths.pop() if len(widths) == 1 else 1
    width = width if block % width == 0 else 1
    units = functools.reduce(operator.mul, [per_unit if width == own else per_unit.repeat_interleave(own)[::width]
                                            for own, per_unit in varying])
    return shared, 1 - (1 - units.view(size, block // width)).prod(1)


_MAX_SHARED_EVENTS = 10  # beyond this many distinct gates on one space's readers, readers are taken as independent


def _read_probability(reads: list[tuple[dict, Tensor | None]], size: int, device) -> Tensor:
    """P(some reader reads channel c), per channel, from each reader's ``(shared, varying)`` (:func:`_channel_reads`).

    A gate shared by several readers (the channel's own "out" gate sits on every reader's columns) is one event:
    sum over the open/closed states of the distinct shared gates, readers being independent given them.
    """
    events = list(dict.fromkeys(key for shared, _ in reads for key in shared))
    if len(events) > _MAX_SHARED_EVENTS:
        unread = torch.ones(size, device=device)
        for shared, varying in reads:
            reader = functools.reduce(operator.mul, shared.values(), torch.ones(size, device=device))
            unread = unread * (1 - (reader if varying is None else reader * varying))
        return 1 - unread
    probability = {key: shared[key] for shared, _ in reads for key in shared}
    unread = torch.zeros(size, device=device)
    for state in range(2 ** len(events)):
        is_open = {key: bool(state >> i & 1) for i, key in enumerate(events)}
        weight = functools.reduce(operator.mul, [probability[key] if is_open[key] else 1 - probability[key] for key in events],
                                  torch.ones(size, device=device))
        none_reads = torch.ones(size, device=device)
        for shared, varying in reads:
            if all(is_open[key] for key in shared):
                none_reads = none_reads * (0 if varying is None else 1 - varying)
        unread = unread + weight * none_reads
    return 1 - unread


def _as_out_in(site: GateSite) -> GateSite:
    """``site`` as on an [out, in] weight: a layer whose weight is stored [in, out] (``input_dim`` 0) has its gate's
    dimension swapped, so that columns are dimension 1 everywhere in the counts (a per-weight gate cannot go there)."""
    if site.tensor != "weight" or input_dim(site.module) == 1 or site.dim is None:
        return site
    return dataclasses.replace(site, dim=1 - site.dim)


def _column_probabilities(sites: list[GateSite], prob) -> Tensor | None:
    """P(input column j is read) from the gates on a module's weight columns (``sites``: its gate sites); None if ungated."""
    return _gated_probabilities(sites, (1, None), prob)


def _row_probabilities(sites: list[GateSite], prob) -> Tensor | None:
    """P(output row j is made) from the gates on a module's weight rows (the paper's L0Conv2d); None if ungated."""
    return _gated_probabilities(sites, (0,), prob)


def _per_example(total: float, batch: int):
    """MACs of a whole forward over the model input's first dimension, an int when it divides evenly.

    Every count here is per entry of the first input dimension: per example when the batch comes
    first, per position for (length, batch, features) inputs of sequence-first models.
    """
    value = total / batch
    return int(value) if float(value).is_integer() else value


def _open_indicator(gate: Gate) -> Tensor:
    return gate.is_open().to(gate.log_alpha.dtype)


def _open_probability(gate: Gate) -> Tensor:
    return gate.prob_nonzero()


class CostModel:
    """Expected parameters and MACs of a gated model as differentiable functions of its gates' P(z ≠ 0).

    The model is traced once (torch.fx, on ``example_inputs``); each call then
    only reads the gates, so a training loop can call it every step. Gates on
    both sides of a layer count: an output unit that no later layer reads
    (its column gates closed everywhere) costs nothing, and neither does an
    input column whose gate is closed. Different gates open independently;
    one gate is one event wherever it sits: a channel whose gate covers a
    block of columns (conv → flatten → Linear) or the columns of several
    readers (a residual space) is kept with that gate's P(z ≠ 0), not as if
    each column drew its own; a layer that reads and writes one space
    (``x + linear(x)``) reads a channel only if it is kept, which its
    expected MACs account for. With ``deterministic=True`` the test-time
    gates (Eq. 13) replace the probabilities and the counts are exactly what
    :func:`l0sparse.prune` leaves. Per-weight gates lower costs only where a
    whole column closes (a dense kernel computes zeros too). Attention counts
    its kept heads where :func:`l0sparse.prune` removes closed ones (calls
    without masks that read only the output), all heads elsewhere.
    """

    def __init__(self, model: nn.Module, example_inputs) -> None:
        check_module(model, "CostModel")
        example_inputs = example_tuple(example_inputs, "CostModel")
        with evaluating(model), torch.no_grad():  # a failed trace leaves the model in the mode it was in
            self.graph = trace_channels(model, example_inputs)
        self.model = model
        self._batch = example_inputs.first_tensor().shape[0]  # counts are per entry of the first input dimension, as count_flops's
        self.modules = dict(model.named_modules())
        # the counts' tensors are made where the gates live, so that the model may sit on any device
        self.device = next((p.device for p in model.parameters()), example_inputs.first_tensor().device)
        # per attention module, per call: (sequences over the batch, query length, key length)
        self._attention_lengths = {
            name: [(sequences / self._batch, query_length, attention_layout(self.modules[name], key)[1])
                   for query, key in calls for sequences, query_length in [attention_layout(self.modules[name], query)]]
            for name, calls in self.graph.attention_module_calls.items()}
        handled = {id(p) for name in self._attention_lengths for p in self.modules[name].parameters()}
        for name in self.graph.shapes:
            module = self.modules[name]
            if (rule := module_rule(module)) is not None and rule.covers_submodules:
                handled |= {id(p) for p in module.parameters()}
            elif weight_product(module) is not None:
                handled |= {id(p) for p in module.parameters()}
        self._followers = {follower for space in self.graph.spaces for follower in space.followers}
        for follower in self._followers:
            handled |= {id(p) for p in self.modules[follower].parameters(recurse=False)}
        gate_parameters = {id(g.log_alpha) for g in find_gates(model)}
        self._sites: dict[int, list[GateSite]] = {}  # id(module) -> the gate sites on its tensors
        for site in gate_sites(model):  # read as if every weight were [out, in] (a transposed one's dims swapped)
            self._sites.setdefault(id(site.module), []).append(_as_out_in(site))
        # traced with torch.export, prune slices the model's own modules: heads of attention modules of other
        # libraries leave with their q/k/v rows, and no column is dropped that its producer still makes
        self._head_layouts = head_layouts(model) if self.graph.slices_in_place else {}
        self._head_of = {linear: owner for owner, layout in self._head_layouts.items()
                         for linear in (*layout["qkv"], *layout.get("kv", ()), *layout.get("fused", ()), layout["projection"])}
        # feed-forward blocks with a fused input projection: consumer or producer -> (the consumer, segments)
        self._fused_units = {name: (consumer, layout["segments"]) for consumer, layout in fused_unit_layouts(model).items()
                             for name in (consumer, layout["producer"])}
        # a hidden gate (l0sparse.core.stream; found by l0sparse.hf.hidden): its stream's readers lose columns, its writers rows, and the embedding columns
        # and LayerNorm entries of each closed dimension go
        self._hidden = hidden_gate(model)
        names = {id(module): name for name, module in self.modules.items()}
        stream = self._hidden.stream if self._hidden is not None else None
        self._hidden_readers = {names[id(m)] for m in stream.readers} if stream else set()
        self._hidden_writers = {names[id(m)] for m in stream.writers} if stream else set()
        read = {id(p) for m in (stream.readers if stream else ()) for p in m.parameters()}  # a head tied to the table: counted as a reader
        per_dimension = {id(p): p for m in (stream.tables + stream.norms if stream else ()) for p in m.parameters()
                         if id(p) not in gate_parameters and id(p) not in read}
        handled |= set(per_dimension)
        self._hidden_per_dimension = sum(p.numel() for p in per_dimension.values()) / stream.width if stream else 0
        self._fixed_params = sum(p.numel() for p in _unique_parameters(model) if id(p) not in handled and id(p) not in gate_parameters)
        # a tensor shared with a gated weight (a head tied to its embedding): the other users keep it whole, so the pruned
        # model holds it twice unless the gates on the copy are all 1 (prune then shares it again)
        self._tied: list[tuple[int, list[Gate]]] = []
        sites = gate_sites(model)
        for group in tied_tensors(model):
            gates = [site.gate for site in sites if (site.name, site.tensor) in group]
            plain_uses = [(self.modules[name], tensor) for name, tensor in group if not parametrize.is_parametrized(self.modules[name], tensor)]
            if gates and plain_uses and all(weight_product(module) is None for module, _ in plain_uses):
                self._tied.append((getattr(*plain_uses[0]).numel(), gates))

    def _attention(self, name: str, query_length: int, key_length: int, prob, deterministic: bool) -> tuple:
        """(MACs, parameters) of the attention module ``name``: its kept heads where prune removes closed ones."""
        attention = self.modules[name]
        heads = None
        if name in self.graph.removable_heads:
            columns = _column_probabilities(self._sites_of(attention.out_proj), prob)  # a head's gate covers its block of columns
            if columns is not None:
                heads = columns.sum() / (attention.embed_dim // attention.num_heads)
                if deterministic:
                    heads = heads.clamp(min=1)
        return attention_cost(attention, query_length, key_length, heads)

    def _kept_rows(self, owner: str, prob, deterministic: bool, keys_values: bool = False) -> Tensor:
        """Per q/k/v row of the attention module ``owner`` (an export-traced one): P(kept), from its head and
        block gates together; where every head is closed prune keeps one zero head of ``min_width`` rows.
        Under grouped-query attention, per query row, or per key/value row with ``keys_values``."""
        layout = self._head_layouts[owner]
        heads, head_dim = layout["heads"], layout["head_dim"]
        columns = _column_probabilities(self._sites_of(self.modules[layout["projection"]]), prob)
        per_head = columns.view(heads, head_dim).mean(1)  # a head's columns share its gates
        if "kv" in layout:
            return self._kept_grouped_rows(layout, per_head, deterministic, keys_values)
        kept = per_head.repeat_interleave(head_dim)
        if deterministic:
            narrow = torch.zeros_like(kept)
            narrow[: layout["min_width"]] = 1
            kept = torch.where(kept.sum() > 0, kept, narrow)
        return kept

    @staticmethod
    def _kept_grouped_rows(layout: dict, per_head: Tensor, deterministic: bool, keys_values: bool) -> Tensor:
        """:meth:`_kept_rows` of a grouped-query attention module. A key/value head is kept while any query head of its
        group is (P = 1 − Π(1 − p_h), heads independent); deterministic counts are what prune keeps
        (:func:`grouped_heads_kept`: each kept group as full as the fullest). The expected query rows do not count
        the closed heads that fill the groups: they vanish once the groups keep equal counts (a target shape)."""
        head_dim, kv_heads = layout["head_dim"], layout["kv_heads"]
        if deterministic:
            query_heads, groups = grouped_heads_kept(torch.nonzero(per_head > 0).flatten().tolist(), layout["heads"], kv_heads)
            kept = torch.zeros(kv_heads if keys_values else layout["heads"], device=per_head.device)
            kept[groups if keys_values else query_heads] = 1
        elif keys_values:
            kept = 1 - (1 - per_head.view(kv_heads, -1)).prod(1)
        else:
            kept = per_head
        return kept.repeat_interleave(head_dim)

    def _qkv_rows(self, name: str, prob, deterministic: bool) -> Tensor:
        """Per output row of the q, k, v or fused projection ``name`` of an export-traced attention module: P(kept)."""
        owner = self._head_of[name]
        layout = self._head_layouts[owner]
        blocks = layout.get("fused", {}).get(name)
        if blocks is None:
            return self._kept_rows(owner, prob, deterministic, keys_values=name in layout.get("kv", ()))
        head_dim = layout["head_dim"]  # a fused projection: each block of rows is one query head's, or one key/value head's
        per_head = {"q": self._kept_rows(owner, prob, deterministic).view(-1, head_dim),
                    "kv": self._kept_rows(owner, prob, deterministic, keys_values=True).view(-1, head_dim)}
        return torch.cat([per_head[kind][head] for kind, head in blocks])

    def _fused_unit_rows(self, name: str, p_in: Tensor, p_out: Tensor, prob, deterministic: bool) -> tuple[Tensor, Tensor]:
        """(p_in, p_out) of a layer of a feed-forward block with a fused input projection (:class:`l0sparse.core.ops.FusedUnits`):
        the consumer's columns and the producer's rows in every segment go with their unit, of which prune keeps one
        where all are closed."""
        consumer, segments = self._fused_units[name]
        units = _column_probabilities(self._sites_of(self.modules[consumer]), prob)
        if units is None:
            return p_in, p_out
        if deterministic and not bool(units.sum() > 0):
            units = torch.zeros_like(units)
            units[0] = 1
        return (units, p_out) if name == consumer else (p_in, units.repeat(segments))

    def _sites_of(self, module: nn.Module) -> list[GateSite]:
        return self._sites.get(id(module), [])

    def _columns(self, name: str, prob, cache: dict) -> Tensor | None:
        if name not in cache:
            cache[name] = _column_probabilities(self._sites_of(self.modules[name]), prob)
        return cache[name]

    def _space_open(self, space, prob, cache: dict) -> Tensor:
        """P(channel is kept), per channel of a removable space: some consumer reads it, or another channel of
        its granule (channels a GroupNorm removes only together)."""
        reads = []
        for consumer in space.consumers:
            read = _channel_reads(self._sites_of(self.modules[consumer.name]), space.size, consumer.block, prob)
            if read is None:
                return torch.ones(space.size, device=self.device)
            reads.append(read)
        unread = 1 - _read_probability(reads, space.size, self.device)
        if space.granule > 1:  # distinct channels of a granule have distinct gates
            unread = unread.view(-1, space.granule).prod(1).repeat_interleave(space.granule)
        return 1 - unread

    def _produced(self, space, prob) -> Tensor | None:
        """P(some producer makes channel c non-zero), per channel, where prune removes the channels that no producer
        makes (a removable space of zero-preserving operations, no followers); None elsewhere (all are kept)."""
        if not (space.removable and space.zero_preserving and not space.followers and space.producers):
            return None
        unmade = torch.ones(space.size, device=self.device)
        for producer in space.producers:
            made = _row_probabilities(self._sites_of(self.modules[producer]), prob)  # the paper's L0Conv2d gates its rows
            if made is None:
                return None
            unmade = unmade * (1 - made)
        return 1 - unmade

    def _space_kept(self, space, prob, cache: dict) -> Tensor:
        """P(prune keeps channel c), per channel of a removable space: read by a consumer (or kept with its granule),
        and made by a producer where that counts."""
        is_open, made = self._space_open(space, prob, cache), self._produced(space, prob)
        return is_open if made is None else is_open * made

    def _layer_costs(self, name: str, module: nn.Module, rule, calls: list, prob, deterministic: bool) -> tuple[Tensor, Tensor]:
        """(MACs per example, parameters) of a module whose rule slices units inside it (an encoder layer): its kept
        units, from the gates on the consumer's columns, and its attention's kept heads."""
        _, consumer = rule.units_inside(module)
        per_unit = _column_probabilities(self._sites_of(module.get_submodule(consumer)), prob)
        units = torch.tensor(float(module.get_submodule(consumer).in_features), device=self.device) if per_unit is None else per_unit.sum()
        if deterministic:
            units = units.clamp(min=1)
        gate_parameters = {id(g.log_alpha) for g in find_gates(module)}
        ungated = sum(p.numel() for p in _unique_parameters(module) if id(p) not in gate_parameters)

        def attention(inner: str, query_length: int, key_length: int) -> tuple:
            return self._attention(f"{name}.{inner}", query_length, key_length, prob, deterministic)

        macs, params = rule.expected_costs(module, [in_shape for in_shape, _ in calls], units, attention, ungated)
        return macs / self._batch, params

    def costs(self, deterministic: bool = False, probabilities: dict | None = None) -> dict[str, Tensor]:
        """``{"flops": MACs per example, "params": parameters}`` (scalars, differentiable unless deterministic).

        ``probabilities`` maps ``id(gate)`` to open probabilities to use instead of the gates' own.
        """
        if probabilities is not None:
            prob = lambda gate: probabilities[id(gate)]  # noqa: E731
        else:
            prob = _open_indicator if deterministic else _open_probability
        cache: dict[str, Tensor | None] = {}
        hidden = None if self._hidden is None else prob(self._hidden)  # P(a residual-stream dimension is kept)
        total_macs, params = self._shared_costs(prob, deterministic, hidden)
        for name, calls in self.graph.calls.items():  # a module called twice costs MACs twice, parameters once
            module = self.modules[name]
            layer_rule = module_rule(module)
            if layer_rule is not None and layer_rule.units_inside(module):  # an encoder layer: its rule counts it
                module_macs, module_params = self._layer_costs(name, module, layer_rule, calls, prob, deterministic)
            elif weight_product(module) is not None:
                module_macs, module_params = self._product_costs(name, module, calls, prob, deterministic, cache, hidden)
            else:
                continue
            total_macs, params = total_macs + module_macs, params + module_params
        return {"flops": total_macs, "params": params + self._follower_params(prob, deterministic, cache)}

    def _shared_costs(self, prob, deterministic: bool, hidden: Tensor | None) -> tuple[Tensor, Tensor]:
        """(MACs, parameters) of what no one weight product holds: ungated parameters, tied copies, the hidden stream's
        tables and norms, attention written as functions or matmuls, and attention modules called on their own."""
        total_macs = torch.zeros((), device=self.device)
        params = torch.zeros((), device=self.device) + self._fixed_params
        for numel, gates in self._tied:  # the test-time gates decide whether prune can share the tensor again
            if not all(bool((gate.deterministic() == 1).all()) for gate in gates):
                params = params + numel
        total_macs = total_macs + self.graph.other_macs / self._batch  # attention no Linear module owns (export only)
        if hidden is not None:
            params = params + self._hidden_per_dimension * (hidden.sum().clamp(min=1) if deterministic else hidden.sum())
        attention_modules = self.graph.attention_call_modules or [()] * len(self.graph.attention_calls)
        products = [(scaled_dot_product_macs(query, key), inside) for (query, key), inside in zip(self.graph.attention_calls, attention_modules)]
        for macs, inside in products + self.graph.products:  # sdpa, and matmuls outside Linear modules (eager attention)
            macs = macs / self._batch  # written out: all its heads...
            owner = next((name for name in inside if name in self._head_layouts), None)
            if owner is not None:  # ... but those prune removes from an export-traced attention module (linear in the width)
                layout = self._head_layouts[owner]
                macs = macs * self._kept_rows(owner, prob, deterministic).sum() / (layout["heads"] * layout["head_dim"])
            total_macs = total_macs + macs
        for name, calls in self._attention_lengths.items():  # attention modules called on their own, every call
            for scale, query_length, key_length in calls:
                attention_macs, attention_params = self._attention(name, query_length, key_length, prob, deterministic)
                total_macs = total_macs + scale * attention_macs
            params = params + attention_params
        return total_macs, params

    def _product_costs(self, name: str, module: nn.Module, calls: list, prob, deterministic: bool, cache: dict,
                       hidden: Tensor | None) -> tuple[Tensor, Tensor]:
        """(MACs per example, parameters) of one Linear or convolution: its expected kept output rows times kept input
        columns, from its own gates, the spaces it reads and writes, heads, and the hidden stream."""
        rule = weight_product(module)
        weight = raw_tensor(module, "weight")
        positions = sum(rule.positions(out_shape) for _, out_shape in calls) / self._batch
        per_pair, (n_out, n_in) = rule.pair_macs(weight.shape), (weight.shape[1 - rule.in_dim], weight.shape[rule.in_dim])
        p_in = self._columns(name, prob, cache)
        p_in = torch.ones(n_in, device=self.device) if p_in is None else p_in
        p_out = torch.ones(n_out, device=self.device)
        if self.graph.slices_in_place:  # no index_select: a column goes only with its channel
            source = self.graph.space_of_input(name)
            removable = source is not None and source.removable
            p_in = self._space_kept(source, prob, cache).repeat_interleave(n_in // source.size) if removable else torch.ones_like(p_in)
        if name in self._head_of:  # q/k/v rows and output projection columns go with their head
            if name == self._head_layouts[self._head_of[name]]["projection"]:
                p_in = self._kept_rows(self._head_of[name], prob, deterministic)
            else:
                p_out = self._qkv_rows(name, prob, deterministic)
        if name in self._fused_units:  # a fused feed-forward input projection, or the layer that reads its units
            p_in, p_out = self._fused_unit_rows(name, p_in, p_out, prob, deterministic)
        if hidden is not None and name in self._hidden_readers:
            p_in = p_in * hidden
        if hidden is not None and name in self._hidden_writers:
            p_out = p_out * hidden
        space = self.graph.space_of_output(name)
        if space is not None and space.removable:
            p_out = p_out * self._space_kept(space, prob, cache)
        source = self.graph.space_of_input(name)
        made = None if source is None or self.graph.slices_in_place else self._produced(source, prob)
        if made is not None:  # a channel no producer makes goes with every consumer's column of it
            p_in = p_in * made.repeat_interleave(n_in // source.size)
        kept_out, kept_in = p_out.sum(), p_in.sum()
        if deterministic:  # prune keeps one (zero) unit where all are closed, except where it may empty the space
            # ... and a GroupNorm keeps a whole group
            kept_out = kept_out if space is not None and self.graph.can_empty(space) else kept_out.clamp(min=space.granule if space else 1)
            kept_in = kept_in if source is not None and self.graph.can_empty(source) else kept_in.clamp(min=1)
        pairs = kept_out * kept_in
        if not deterministic and space is not None and space is source and p_out.numel() == p_in.numel() == space.size:
            # one space read and written by this layer (x + linear(x)): it reads channel c only if c is kept, so
            # E[kept out · kept in] = Σ p_out · Σ p_in − Σ_c p_out_c · p_in_c + Σ_c p_in_c (zero change at 0/1)
            pairs = pairs - (p_out * p_in).sum() + p_in.sum()
        macs = positions * per_pair * pairs
        if name in self._followers:  # a depthwise conv's parameters are counted per channel (_follower_params)
            return macs, torch.zeros((), device=self.device)
        return macs, per_pair * pairs + (kept_out if module.bias is not None else 0)

    def _follower_params(self, prob, deterministic: bool, cache: dict) -> Tensor:
        """Parameters of the followers (BatchNorm, depthwise convs): one entry per kept channel of their space."""
        params = torch.zeros((), device=self.device)
        for space in self.graph.spaces:
            if not space.followers:
                continue
            kept = self._space_kept(space, prob, cache).sum() if space.removable else torch.tensor(float(space.size), device=self.device)
            if deterministic:
                kept = kept.clamp(min=space.granule)
            for follower in space.followers:
                per_channel = sum(p.numel() for p in self.modules[follower].parameters(recurse=False)) / space.size
                params = params + per_channel * kept
        return params

    def gate_costs(self, metric: str = "flops") -> dict[int, Tensor]:
        """Per gate, what closing each of its units alone saves with every other gate open (``id(gate)`` → tensor)."""
        if metric not in ("flops", "params"):
            raise ValueError(f"gate_costs: metric must be 'flops' (MACs) or 'params', got {metric!r}")
        all_gates = find_gates(self.model)
        ones = {id(g): torch.ones(g.log_alpha.shape, device=g.log_alpha.device, requires_grad=True) for g in all_gates}
        total = self.costs(probabilities=ones)[metric]
        grads = torch.autograd.grad(total, list(ones.values()), allow_unused=True)
        return {key: (torch.zeros_like(ones[key]) if grad is None else grad.detach()) for key, grad in zip(ones, grads)}

    def flops(self, deterministic: bool = False) -> Tensor:
        return self.costs(deterministic)["flops"]

    def params(self, deterministic: bool = False) -> Tensor:
        return self.costs(deterministic)["params"]


def _unique_parameters(module: nn.Module):
    seen = set()
    for parameter in module.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            yield parameter


def expected_flops(model: nn.Module, example_inputs, deterministic: bool = False) -> Tensor:
    """Expected MACs per example of ``model`` (see :class:`CostModel`); traces the model on every call."""
    return CostModel(model, example_inputs).flops(deterministic)


def expected_params(model: nn.Module, example_inputs, deterministic: bool = False) -> Tensor:
    """Expected parameters of the pruned model (gates excluded; see :class:`CostModel`)."""
    return CostModel(model, example_inputs).params(deterministic)


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm}
_CONVS = {F.conv1d, F.conv2d, F.conv3d}


class _CountFunctions(torch.overrides.TorchFunctionMode):
    """Counts the MACs of functional products made outside the modules count_flops hooks (a pruned model's
    ``F.scaled_dot_product_attention``, a user's ``x @ W.T``, ``F.linear``, ``F.conv2d``): ``macs`` per function."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.macs, self.inside_modules = batch, {}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.inside_modules or not isinstance(result, Tensor):
            return result
        if func is F.scaled_dot_product_attention:
            # scores and weighted values: 2 · heads · L_q · L_k · head_dim per example
            macs = scaled_dot_product_macs(args[0].shape, args[1].shape)
        elif func in _MATMULS or func is F.linear:  # each output entry is one dot product over the shared dimension
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            macs = result.numel() * (weight.shape[-1] if func is F.linear else args[0].shape[-1])
        elif func in _CONVS:  # each output entry: in_channels / groups · kernel entries
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            macs = result.numel() * math.prod(weight.shape[1:])
        else:
            return result
        name = "scaled_dot_product_attention" if func is F.scaled_dot_product_attention else getattr(func, "__name__", str(func))
        self.macs[name] = self.macs.get(name, 0) + _per_example(macs, self.batch)
        return result


_UNCOVERED = (nn.modules.conv._ConvTransposeNd, nn.Bilinear, nn.RNNBase)  # weight products that no operation rule covers


def _uncovered_dense_macs(module: nn.Module, inputs: tuple, output) -> int | None:
    """MACs of one call of a layer that no operation rule covers, for count_flops only (prune locks its channels):
    transposed convs, Bilinear, RNN / LSTM / GRU; None for anything else (not a weight product)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input entry scatters (out_channels / groups) · kernel
        return inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Bilinear):
        return output.numel() * module.in1_features * module.in2_features
    if isinstance(module, nn.RNNBase) and isinstance(inputs[0], Tensor):  # a PackedSequence's steps vary per example
        steps = inputs[0].numel() // module.input_size  # sequence length × batch
        gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
        out_size = module.proj_size or module.hidden_size
        directions = 2 if module.bidirectional else 1
        per_step = 0
        for layer in range(module.num_layers):
            width = module.input_size if layer == 0 else out_size * directions
            per_step += directions * (gates * module.hidden_size * (width + out_size) + module.hidden_size * module.proj_size)
        return steps * per_step
    return None


def count_flops(model: nn.Module, example_inputs, per_module: bool = False) -> int | dict[str, int]:
    """MACs per example of every plain Linear, conv (transposed too), Bilinear, RNN / LSTM / GRU and attention, and of
    the functional products outside them (``x @ W.T``, ``F.linear``, ``F.conv2d``, ``scaled_dot_product_attention``),
    counted by running ``model`` once with hooks.

    "Per example" is per entry of the first input dimension: for (length, batch, features) inputs of
    sequence-first attention that is per position, for attention and Linear layers alike.

    For a gated model this is the dense count; use :func:`expected_flops`
    with ``deterministic=True`` for what pruning leaves. ``per_module=True``
    returns ``{module name: MACs}``; functional products are counted under
    their function's name (``"matmul"``, ``"linear"``, ``"conv2d"``,
    ``"scaled_dot_product_attention"`` for a pruned model's attention). An RNN
    over a ``PackedSequence`` is refused (its steps differ per example).
    """
    check_module(model, "count_flops")
    example_inputs = example_tuple(example_inputs, "count_flops")
    check_example_batch(example_inputs)
    batch = example_inputs.first_tensor().shape[0]
    counted: dict[str, int] = {}
    names = {module: name for name, module in model.named_modules()}

    def hook(module, inputs, output):
        rule = module_rule(module)
        macs = rule.dense_macs(module, inputs, output) if rule is not None else _uncovered_dense_macs(module, inputs, output)
        if macs is None:  # an RNN over a PackedSequence: its steps differ per example
            raise ValueError(f"count_flops: {names[module]!r} ({type(module).__name__}) ran on a PackedSequence, whose steps "
                             "differ per example: count it on a padded batch")
        counted[names[module]] = counted.get(names[module], 0) + _per_example(macs, batch)

    inside_attention = {id(sub) for m in model.modules() if (rule := module_rule(m)) is not None and rule.covers_submodules
                        for sub in m.modules() if sub is not m}
    # the paper's layers are left out: count them on plain_copy(model), which folds their gates
    hooked = [m for m in model.modules() if (isinstance(module_rule(m), (WeightProduct, AttentionRule, EncoderLayerRule))
                                             or isinstance(m, _UNCOVERED)) and not isinstance(m, L0Layer)]
    handles = [m.register_forward_hook(hook) for m in hooked if id(m) not in inside_attention]
    counter = _CountFunctions(batch)
    # the functional products inside a counted module (its own F.linear, attention's scaled_dot_product_attention) are
    # in its hook's count; those of the paper's layers are left out like the layers
    for module in [*hooked, *(m for m in model.modules() if isinstance(m, L0Layer))]:
        handles.append(module.register_forward_pre_hook(lambda *_: setattr(counter, "inside_modules", counter.inside_modules + 1)))
        handles.append(module.register_forward_hook(lambda *_: setattr(counter, "inside_modules", counter.inside_modules - 1)))
    try:
        with evaluating(model), torch.no_grad(), counter:
            run_batch(model, example_inputs)
    except TypeError as error:  # arguments the forward does not take (a dict's wrong name)
        raise ValueError(f"count_flops: example_inputs do not fit the model: TypeError: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    counted.update(counter.macs)
    return counted if per_module else sum(counted.values())


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (each shared tensor once, gates' log α included if any)."""
    return sum(p.numel() for p in _unique_parameters(model))


@torch.no_grad()
def median_latency(models: Mapping[str, nn.Module], batch: Tensor, repeats: int = 10) -> dict[str, float]:
    """Median seconds of one forward of ``batch`` per model, the models taking turns (one untimed call each turn first).

    Taking turns spreads a shared machine's slow moments over every model rather than onto one; the untimed
    call brings the model's weights back into the caches after the other model's turn.
    """
    import statistics
    import time

    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            model(batch)
            started = time.perf_counter()
            model(batch)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}
