"""A gate on a residual stream (the hidden size): the modules that write and read the stream, norms whose statistics
run over the open dimensions, and the plan that prunes the closed dimensions exactly.

Which modules form a model's stream is family knowledge and lives in an adapter (``l0sparse.hf.hidden`` finds them
in BERT-like encoders and pre-norm decoders); the adapter builds a :class:`HiddenStream`, swaps the stream's norms for
:class:`OpenLayerNorm` / :class:`OpenRMSNorm` / :class:`OpenOffsetRMSNorm` and sets ``gate.stream``. From there the core counts the gate
(:class:`l0sparse.CostModel`), prunes it (:func:`prune_hidden`, which :func:`l0sparse.prune` calls first) and
rebuilds it (:func:`apply_hidden_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .gates import Gate
from .ops import module_rule, set_submodule

__all__ = ["HiddenStream", "OpenLayerNorm", "OpenRMSNorm", "OpenOffsetRMSNorm", "OPEN_NORMS", "hidden_gate", "prune_hidden", "apply_hidden_plan",
           "compare_on_kept"]


@dataclass
class HiddenStream:
    """The modules of one residual stream (references: a deep copy of the model maps them to its own copies)."""

    tables: tuple[nn.Module, ...]  # nn.Embedding whose columns write the stream
    writers: tuple[nn.Module, ...]  # weight products whose rows write it (nn.Linear; a Conv1D's weight columns), sliced by their rule
    readers: tuple[nn.Module, ...]  # weight products whose columns read it (a Conv1D's weight rows)
    norms: tuple[nn.Module, ...]  # its LayerNorms (OpenLayerNorm while gated)
    width: int


class OpenLayerNorm(nn.Module):
    """A LayerNorm over the last dimension whose statistics run over the open dimensions of ``gate`` only.

    ``y = ((x − μ_open) / sqrt(σ²_open + eps) · γ + β) · z`` with μ_open, σ²_open the mean and (biased) variance
    over {i : z_i > 0}. z is one sample per call in training, the test-time gate in eval. It holds the
    LayerNorm's own ``weight`` and ``bias`` parameters (the same tensors).
    """

    def __init__(self, norm: nn.LayerNorm, gate: Gate) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        z = self.gate().to(x.dtype)
        is_open = (z > 0).to(x.dtype)
        count = is_open.sum().clamp_min(1.0)  # every dimension closed: y · z is 0, not 0/0
        mean = (x * is_open).sum(-1, keepdim=True) / count
        centred = x - mean
        variance = (centred.square() * is_open).sum(-1, keepdim=True) / count
        y = centred * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y * z

    @torch.no_grad()
    def plain(self, kept: list[int]) -> nn.LayerNorm:
        """The ``nn.LayerNorm`` of the ``kept`` dimensions with the test-time gate folded into γ and β."""
        z = self.gate.deterministic()
        index = torch.as_tensor(kept, dtype=torch.long, device=z.device)
        reference = self.weight if self.weight is not None else z
        norm = nn.LayerNorm(len(kept), eps=self.eps, elementwise_affine=True, device=reference.device, dtype=reference.dtype)
        weight = self.weight if self.weight is not None else torch.ones_like(z)
        bias = self.bias if self.bias is not None else torch.zeros_like(z)
        norm.weight.copy_((weight * z.to(weight.dtype))[index])
        norm.bias.copy_((bias * z.to(bias.dtype))[index])
        return norm

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, statistics over the open dimensions of a hidden gate"


class OpenRMSNorm(nn.Module):
    """An RMSNorm over the last dimension (a pre-norm decoder's: Llama, Mistral, Qwen) whose statistic runs over the
    open dimensions of a hidden gate only: ``y = x · rsqrt(Σ_open x² / n_open + eps) · w``, the mean square taken in
    float32 as Hugging Face's RMSNorms take it. ``norm`` (the model's own module) is kept inside: its weight carries
    the gate's :class:`~l0sparse.core.sites.GateMask` (``w · z``), so the closed dimensions of every normalised output are
    zero, and the open set is where that gated weight is non-zero (the same sample of z as the output's).
    :meth:`plain` gives the model's module back, sliced: the pruned model's RMSNorm over the kept dimensions
    computes the same numbers.
    """

    def __init__(self, norm: nn.Module, gate: Gate, eps: float) -> None:
        super().__init__()
        self.norm, self.gate, self.eps = norm, gate, float(eps)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.norm.weight
        is_open = (weight != 0).to(torch.float32)
        count = is_open.sum().clamp_min(1.0)  # every dimension closed: the output is 0·w, not 0/0
        x32 = x.to(torch.float32)
        mean_square = (x32.square() * is_open).sum(-1, keepdim=True) / count
        return weight * (x32 * torch.rsqrt(mean_square + self.eps)).to(x.dtype)

    @torch.no_grad()
    def plain(self, kept: list[int]) -> nn.Module:
        """The model's own RMSNorm over the ``kept`` dimensions (its gate already folded into the weight)."""
        index = torch.as_tensor(kept, dtype=torch.long, device=self.norm.weight.device)
        self.norm.weight = nn.Parameter(self.norm.weight.detach().index_select(0, index))
        return self.norm

    def extra_repr(self) -> str:
        return f"eps={self.eps}, statistic over the open dimensions of a hidden gate"


class OpenOffsetRMSNorm(nn.Module):
    """An RMSNorm that scales by ``offset + w`` (Gemma's ``x̂ · (1 + w)``, all in float32, cast at the end) whose
    statistic runs over the open dimensions of a hidden gate only: ``y = x · rsqrt(Σ_open x² / n_open + eps) ·
    (offset + w) · z``, one sample of z per call (the test-time gate in eval), the open set {i : z_i > 0}. Gating
    the weight alone would not do: a closed ``w · z = 0`` still scales by ``offset``. ``norm`` (the model's own
    module) is kept inside, ungated; :meth:`plain` gives it back over the kept dimensions with z folded in
    (``w' = (offset + w) · z − offset``), so the pruned model's own norm computes the same numbers.
    """

    def __init__(self, norm: nn.Module, gate: Gate, eps: float, offset: float = 1.0) -> None:
        super().__init__()
        self.norm, self.gate, self.eps, self.offset = norm, gate, float(eps), float(offset)

    def forward(self, x: Tensor) -> Tensor:
        z = self.gate().to(torch.float32)
        is_open = (z > 0).to(torch.float32)
        count = is_open.sum().clamp_min(1.0)  # every dimension closed: the output is 0, not 0/0
        x32 = x.to(torch.float32)
        mean_square = (x32.square() * is_open).sum(-1, keepdim=True) / count
        scale = (self.offset + self.norm.weight.to(torch.float32)) * z
        return (x32 * torch.rsqrt(mean_square + self.eps) * scale).to(x.dtype)

    @torch.no_grad()
    def plain(self, kept: list[int]) -> nn.Module:
        """The model's own norm over the ``kept`` dimensions, the test-time gate folded into its weight."""
        weight = self.norm.weight
        z = self.gate.deterministic().to(torch.float32)
        folded = ((self.offset + weight.to(torch.float32)) * z - self.offset).to(weight.dtype)
        index = torch.as_tensor(kept, dtype=torch.long, device=weight.device)
        self.norm.weight = nn.Parameter(folded.index_select(0, index))
        return self.norm

    def extra_repr(self) -> str:
        return f"eps={self.eps}, scale {self.offset:g} + weight, statistic over the open dimensions of a hidden gate"


OPEN_NORMS = (OpenLayerNorm, OpenRMSNorm, OpenOffsetRMSNorm)


def hidden_gate(model: nn.Module) -> Gate | None:
    """The hidden gate of ``model`` (from :func:`gate_hidden`), or None."""
    return next((m.gate for m in model.modules() if isinstance(m, OPEN_NORMS)), None)


def _stream_names(model: nn.Module, stream: HiddenStream) -> dict[str, list[str]]:
    """The names in ``model`` of the stream's modules, by kind: a plan names modules, a copy has its own objects."""
    ids = {id(m): name for name, m in model.named_modules()}
    return {kind: [ids[id(m)] for m in getattr(stream, kind)] for kind in ("tables", "writers", "readers", "norms")}


@torch.no_grad()
def prune_hidden(work: nn.Module) -> dict | None:
    """Remove the closed hidden dimensions of ``work`` (a :func:`l0sparse.core.prune.plain_copy`, its other gates folded)
    in place; return the plan (``apply_hidden_plan``'s input), or None when it has no hidden gate.

    Keeps one (zero) dimension when every gate is closed."""
    gate = hidden_gate(work)
    if gate is None:
        return None
    is_open = gate.is_open().cpu()
    kept = torch.nonzero(is_open).flatten().tolist() or [0]
    plan = {"width": gate.stream.width, "kept": kept, **_stream_names(work, gate.stream)}
    apply_hidden_plan(work, plan)
    return plan


@torch.no_grad()
def apply_hidden_plan(work: nn.Module, plan: dict) -> nn.Module:
    """Slice ``work``'s stream modules to the plan's kept dimensions (an OpenLayerNorm becomes a folded
    ``nn.LayerNorm``; a plain one, in a fresh model for :func:`l0sparse.rebuild`, is sliced)."""
    modules = dict(work.named_modules())
    kept = plan["kept"]
    index = torch.as_tensor(kept, dtype=torch.long)
    sliced: set[int] = set()  # tables that share one weight (an encoder-decoder's embed_tokens tied to shared): sliced once
    for name in plan["tables"]:
        table = modules[name]
        if id(table.weight) not in sliced:
            table.weight.data = table.weight.data.index_select(1, index.to(table.weight.device))
            sliced.add(id(table.weight))
        table.embedding_dim = len(kept)
    for name in plan["writers"]:
        module_rule(modules[name]).slice(modules[name], rows=kept)
    tables = [modules[name].weight for name in plan["tables"]]
    for name in plan["readers"]:
        if any(modules[name].weight is table for table in tables):  # a head tied to the table: sliced with it, still tied
            modules[name].in_features = len(kept)
            continue
        module_rule(modules[name]).slice(modules[name], columns=kept)
    for name in plan["norms"]:
        norm = modules[name]
        if isinstance(norm, OPEN_NORMS):
            set_submodule(work, name, norm.plain(kept))
        elif module_rule(norm) is not None:
            module_rule(norm).slice(norm, entries=kept)
        else:  # a fresh model's RMSNorm (rebuild): one weight entry per dimension
            norm.weight = nn.Parameter(norm.weight.detach().index_select(0, index.to(norm.weight.device)))
    return work


def compare_on_kept(expected: Tensor, got: Tensor, plan: dict | None) -> Tensor:
    """``expected`` restricted to the kept hidden dimensions where it is a stream-shaped output that prune narrowed."""
    if plan and expected.shape != got.shape and expected.dim() and expected.shape[:-1] == got.shape[:-1] \
            and expected.shape[-1] == plan["width"] and got.shape[-1] == len(plan["kept"]):
        return expected[..., torch.as_tensor(plan["kept"], device=expected.device)]
    return expected
