"""The hidden-size gate (CoFi's "hidden"), opt-in: one Hard Concrete gate per residual-stream dimension of a
BERT-like encoder, pruned exactly.

:func:`gate_hidden` attaches ONE gate of W units (W: the encoder's hidden size) to the whole residual
stream: it multiplies the columns of the embedding tables, the rows (weight and bias) of every Linear that
writes the stream (each layer's attention output projection and feed-forward output projection; ELECTRA's
``embeddings_project``), and the output of every LayerNorm of the stream. It also CHANGES those LayerNorms'
computation while the gate is attached (the opt-in): each becomes an :class:`OpenLayerNorm`, whose mean and
variance run over the open dimensions only, {i : z_i > 0} (an indicator, not weighted by a fractional z), and
whose output is (normalised·γ + β)·z. The pruned model's ``nn.LayerNorm(k)`` over the k kept dimensions then
computes the same numbers, so :func:`l0sparse.prune` removes the closed dimensions exactly, fractional
test-time gates included: z is folded into γ, β, the writers' rows and the embedding columns, and the
columns of every Linear that reads the stream (q, k, v, the first feed-forward Linear, and the task head or
pooler that reads the last hidden state) are sliced. The last hidden state of the pruned model has k
dimensions; a head that reads it (a classifier) gives the same logits. See docs/design.md, "The hidden-size
gate".

Readers outside the encoder layers are found once, by a probe forward when the gate is attached (the Linear
layers whose input is exactly zero on the dimensions that the probe closes), so gate the whole model that
will be pruned, task head included.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .gates import Gate
from .graph import _placement_mismatch, check_example_batch, example_tuple, run_batch
from .layers import L0Layer
from .operations import module_rule, set_submodule
from .sites import GateMask

__all__ = ["gate_hidden", "OpenLayerNorm", "OpenRMSNorm", "OPEN_NORMS", "attach_rms_hidden_gate",
           "HiddenStream", "hidden_gate", "prune_hidden", "apply_hidden_plan", "compare_on_kept"]

# the modules of one encoder layer, per family: (q, k, v, first feed-forward Linear), (writers), (norms)
_LAYER_LAYOUTS = {
    "BERT": (("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"),
             ("attention.output.dense", "output.dense"), ("attention.output.LayerNorm", "output.LayerNorm")),
    "DistilBERT": (("attention.q_lin", "attention.k_lin", "attention.v_lin", "ffn.lin1"),
                   ("attention.out_lin", "ffn.lin2"), ("sa_layer_norm", "output_layer_norm")),
}
# the size of each kind of stream module that must equal the stream's width
_STREAM_SIDE = {"tables": "embedding_dim", "writers": "out_features", "readers": "in_features"}
_LOOKED_FOR = ("encoder layers with BERT's attention.self.query/key/value, attention.output.dense/LayerNorm, "
               "intermediate.dense, output.dense/LayerNorm (BERT, RoBERTa, ELECTRA, MiniLM) or DistilBERT's "
               "attention.q_lin/k_lin/v_lin/out_lin, sa_layer_norm, ffn.lin1/lin2, output_layer_norm, and an "
               "'embeddings' module with word_embeddings (and LayerNorm)")


@dataclass
class HiddenStream:
    """The modules of one residual stream (references: a deep copy of the model maps them to its own copies)."""

    tables: tuple[nn.Module, ...]  # nn.Embedding whose columns write the stream
    writers: tuple[nn.Module, ...]  # nn.Linear whose rows write it
    readers: tuple[nn.Module, ...]  # nn.Linear whose columns read it
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
    the gate's :class:`~l0sparse.sites.GateMask` (``w · z``), so the closed dimensions of every normalised output are
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


OPEN_NORMS = (OpenLayerNorm, OpenRMSNorm)


def _submodule_or_none(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _find_stream(model: nn.Module) -> tuple[dict[str, list[str]], str]:
    """Names of the stream's tables, writers, norms and encoder readers; and the embeddings module's name."""
    if any(isinstance(m, OPEN_NORMS) for m in model.modules()):
        raise ValueError(f"gate_hidden: {type(model).__name__} already has a hidden gate; attach it once")
    names = {"tables": [], "writers": [], "norms": [], "readers": []}
    for name, module in model.named_modules():
        for readers, writers, norms in _LAYER_LAYOUTS.values():
            parts = [_submodule_or_none(module, path) for path in (*readers, *writers, *norms)]
            if all(isinstance(p, nn.Linear) for p in parts[:len(readers) + len(writers)]) and all(
                    isinstance(p, nn.LayerNorm) for p in parts[len(readers) + len(writers):]):
                prefix = f"{name}." if name else ""
                names["readers"] += [prefix + path for path in readers]
                names["writers"] += [prefix + path for path in writers]
                names["norms"] += [prefix + path for path in norms]
    if not names["norms"]:
        raise ValueError(f"gate_hidden: found no residual stream in {type(model).__name__}; it looked for {_LOOKED_FOR}")
    modules = dict(model.named_modules())
    widths = {tuple(modules[n].normalized_shape) for n in names["norms"]}
    if len(widths) != 1 or len(next(iter(widths))) != 1:
        raise ValueError(f"gate_hidden: the encoder layers' LayerNorms of {type(model).__name__} do not share one width: {sorted(widths)}")
    (width,) = next(iter(widths))
    embeddings = [(name, m) for name, m in model.named_modules()
                  if name.split(".")[-1] == "embeddings" and isinstance(getattr(m, "word_embeddings", None), nn.Embedding)]
    if len(embeddings) != 1:
        raise ValueError(f"gate_hidden: found {len(embeddings)} 'embeddings' modules with word_embeddings in {type(model).__name__} "
                         f"(one is needed); it looked for {_LOOKED_FOR}")
    prefix = f"{embeddings[0][0]}." if embeddings[0][0] else ""
    embedding = embeddings[0][1]
    if embedding.word_embeddings.embedding_dim == width:
        names["tables"] = [prefix + child for child in ("word_embeddings", "position_embeddings", "token_type_embeddings")
                           if isinstance(getattr(embedding, child, None), nn.Embedding)]
        if not isinstance(getattr(embedding, "LayerNorm", None), nn.LayerNorm):
            raise ValueError(f"gate_hidden: {embeddings[0][0]!r} has no LayerNorm; it looked for {_LOOKED_FOR}")
        names["norms"].insert(0, prefix + "LayerNorm")
    else:  # ELECTRA: narrower embeddings projected onto the stream by a Linear
        project = [name for name, m in model.named_modules()
                   if name.split(".")[-1] == "embeddings_project" and isinstance(m, nn.Linear) and m.out_features == width]
        if len(project) != 1:
            raise ValueError(f"gate_hidden: the embeddings of {type(model).__name__} are {embedding.word_embeddings.embedding_dim} wide, "
                             f"the stream {width}, and no single 'embeddings_project' Linear joins them")
        names["writers"].insert(0, project[0])
    for kind in ("tables", "writers", "norms", "readers"):
        for name in names[kind]:
            module = modules[name]
            size = module.normalized_shape[-1] if kind == "norms" else getattr(module, _STREAM_SIDE[kind])
            if size != width or isinstance(module, L0Layer):
                raise ValueError(f"gate_hidden: {name!r} ({type(module).__name__}) does not fit a residual stream of width {width}")
    return names, embeddings[0][0]


def _probe_inputs(model: nn.Module, example_inputs: Tensor | tuple | list) -> tuple:
    """``example_inputs`` as the probe forward's positional arguments, refused before it runs where it cannot."""
    example_inputs = example_tuple(example_inputs, "gate_hidden")
    check_example_batch(example_inputs)
    tensors = itertools.chain(model.named_parameters(), model.named_buffers(),
                              example_inputs.named_tensors())
    on_meta = next((name for name, tensor in tensors if tensor.is_meta), None)
    if on_meta is not None:  # the probe reads which inputs are zero: a meta tensor has no values
        raise ValueError(f"gate_hidden finds the stream's readers by a probe forward, but {on_meta!r} is on the meta device, "
                         "which holds no values: materialise the model first (model.to_empty(device=...) and load_state_dict)")
    mismatch = _placement_mismatch(model, example_inputs)
    if mismatch is not None:
        raise ValueError(f"gate_hidden: {mismatch}")
    return example_inputs


@torch.no_grad()
def _probe_readers(model: nn.Module, names: dict[str, list[str]], width: int, example_inputs: tuple) -> list[str]:
    """The Linear layers that read the stream: one eval forward with every stream module's output zeroed on the odd
    dimensions; a Linear of ``width`` inputs whose every input is zero there (and not everywhere) reads it."""
    modules = dict(model.named_modules())
    closed = torch.arange(width) % 2 == 1
    reads_stream: dict[str, bool] = {}  # per Linear: every call's input had the probe's pattern

    def close(module, args, output):
        return output.masked_fill(closed.to(output.device), 0.0)

    def record(name):
        def hook(module, args):
            x = args[0]
            reads = bool((x[..., closed.to(x.device)] == 0).all()) and bool((x[..., ~closed.to(x.device)] != 0).any())
            reads_stream[name] = reads_stream.get(name, True) and reads
        return hook

    stream = {*names["tables"], *names["writers"], *names["norms"]}
    handles = [modules[name].register_forward_hook(close) for name in stream]
    handles += [m.register_forward_pre_hook(record(name)) for name, m in modules.items()
                if isinstance(m, nn.Linear) and m.in_features == width and name not in names["writers"]]
    was_training = model.training
    model.eval()
    try:
        run_batch(model, example_inputs)
    except Exception as error:  # the model's own forward refused the batch: say which argument is at fault
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for _, t in example_inputs.named_tensors())
        raise ValueError(f"gate_hidden: example_inputs do not fit {type(model).__name__}'s forward (got {shapes or 'no tensor'}; "
                         f"a batch the model takes, such as (batch, length) token ids): {type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    found = [name for name, reads in reads_stream.items() if reads]
    missing = [name for name in names["readers"] if name not in found]
    if missing:
        raise ValueError(f"gate_hidden: {missing[:3]} should read the residual stream of {type(model).__name__} but the probe "
                         "forward found otherwise; the model's structure is not the BERT-like one gate_hidden handles")
    return found


def gate_hidden(model: nn.Module, example_inputs: Tensor | tuple | list, **gate_kwargs) -> Gate:
    """Attach one hidden-size gate to the residual stream of a BERT-like encoder in ``model``, in place; return it.

    Call it after :func:`l0sparse.sparsify` (which refuses an already gated model), on the whole model that
    will be trained and pruned, task head included. ``example_inputs`` (a batch) runs one probe forward that
    finds the Linear layers reading the stream outside the encoder layers (a pooler, a classifier on the
    pooled hidden states). ``gate_kwargs`` go to :class:`l0sparse.Gate`.

    The model's residual LayerNorms become :class:`OpenLayerNorm` (statistics over the open dimensions):
    this changes the model's computation while the gate is attached, by design (docs/design.md, "The
    hidden-size gate"). The penalty charges the gate, per dimension, for the weights it removes in the layers
    that make the stream (embedding columns, the writers' rows and biases; not the LayerNorms, not the
    readers' columns); :class:`l0sparse.CostModel` counts the MACs and parameters it removes.

    Raises:
        TypeError: ``model`` is no ``nn.Module``, or ``example_inputs`` no tensor, tuple or list.
        ValueError: no recognisable residual stream (what was looked for is named), one already gated,
            ``example_inputs`` that the model's forward refuses (an empty batch, another device or dtype, a meta
            model included), or a probe forward that contradicts the structure. The model is unchanged then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gate_hidden: model must be an nn.Module (a BERT-like encoder or a model around one), got {type(model).__name__}")
    names, embeddings = _find_stream(model)
    modules = dict(model.named_modules())
    width = modules[names["norms"][0]].normalized_shape[-1]
    names["readers"] = _probe_readers(model, names, width, _probe_inputs(model, example_inputs))
    reference = next(model.parameters())
    gate = Gate(width, **gate_kwargs).to(device=reference.device)
    encoder = embeddings.rpartition(".")[0]  # the model that holds the embeddings: "encoder.hidden", "bert.hidden", "hidden"
    gate.owner = f"{encoder}.hidden" if encoder else "hidden"
    gate.granularity = "hidden"
    tables = tuple(modules[n] for n in names["tables"])
    writers = tuple(modules[n] for n in names["writers"])
    gate.producers = tables + writers  # the penalty's charge: the weights that make the stream
    # every check is done: from here on the model changes
    for table in tables:
        parametrize.register_parametrization(table, "weight", GateMask(gate, dim=1))
    for writer in writers:
        parametrize.register_parametrization(writer, "weight", GateMask(gate, dim=0))
        if writer.bias is not None:
            parametrize.register_parametrization(writer, "bias", GateMask(gate, dim=0))
    norms = []
    for name in names["norms"]:
        norm = OpenLayerNorm(modules[name], gate)
        set_submodule(model, name, norm)
        norms.append(norm)
    gate.stream = HiddenStream(tables, writers, tuple(modules[n] for n in names["readers"]), tuple(norms), width)
    return gate


def attach_rms_hidden_gate(model: nn.Module, names: dict[str, list[str]], eps: dict[str, float], example_inputs, owner: str,
                           **gate_kwargs) -> Gate:
    """Attach one hidden-size gate to a pre-norm residual stream whose norms are RMSNorms (an adapter names its
    modules: ``names`` with ``"tables"``, ``"writers"`` and ``"norms"``, ``eps`` per norm); return it.

    Unlike a post-norm encoder's (:func:`gate_hidden`), nothing that writes the stream is gated: every reader reads a
    norm's output, so the gate multiplies the norms' weights alone (an :class:`OpenRMSNorm` each, the mean square
    over the open dimensions) and the closed dimensions of the stream, which no reader sees, go with their
    embedding columns and writer rows when pruned. The embedding table stays whole until then, so a language-model
    head tied to it stays tied. The readers are found by a probe forward (every Linear that reads a norm's output).
    """
    modules = dict(model.named_modules())
    width = modules[names["norms"][0]].weight.shape[0]
    names = {**names, "readers": []}
    names["readers"] = _probe_readers(model, names, width, _probe_inputs(model, example_inputs))
    reference = next(model.parameters())
    gate = Gate(width, **gate_kwargs).to(device=reference.device)
    gate.owner, gate.granularity = owner, "hidden"
    tables = tuple(modules[n] for n in names["tables"])
    writers = tuple(modules[n] for n in names["writers"])
    gate.producers = tables + writers  # the penalty's charge: the weights that make the stream
    norms = []
    for name in names["norms"]:
        parametrize.register_parametrization(modules[name], "weight", GateMask(gate, dim=0))
        norm = OpenRMSNorm(modules[name], gate, eps[name])
        set_submodule(model, name, norm)
        norms.append(norm)
    gate.stream = HiddenStream(tables, writers, tuple(modules[n] for n in names["readers"]), tuple(norms), width)
    return gate


def hidden_gate(model: nn.Module) -> Gate | None:
    """The hidden gate of ``model`` (from :func:`gate_hidden`), or None."""
    return next((m.gate for m in model.modules() if isinstance(m, OPEN_NORMS)), None)


def _stream_names(model: nn.Module, stream: HiddenStream) -> dict[str, list[str]]:
    """The names in ``model`` of the stream's modules, by kind: a plan names modules, a copy has its own objects."""
    ids = {id(m): name for name, m in model.named_modules()}
    return {kind: [ids[id(m)] for m in getattr(stream, kind)] for kind in ("tables", "writers", "readers", "norms")}


@torch.no_grad()
def prune_hidden(work: nn.Module) -> dict | None:
    """Remove the closed hidden dimensions of ``work`` (a :func:`l0sparse.prune.plain_copy`, its other gates folded)
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
    for name in plan["tables"]:
        table = modules[name]
        table.weight.data = table.weight.data.index_select(1, index.to(table.weight.device))
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
