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

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.gates import Gate
from ..core.graph import check_example_batch, evaluating, example_tuple, placement_mismatch, run_batch
from ..core.layers import L0Layer
from ..core.ops import FusedHeads, module_rule, set_submodule, weight_product, weight_widths
from ..core.sites import GateMask, raw_tensor
from ..core.stream import OPEN_NORMS, HiddenStream, OpenLayerNorm, OpenOffsetRMSNorm, OpenRMSNorm, hidden_gate
from .fused import FUSED_HEADS
from .rules import decoder_attention, decoder_attention_all, decoder_feed_forward, fused_attention_modules


__all__ = ["gate_hidden", "gate_decoder_hidden", "attach_prenorm_hidden_gate"]

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
    mismatch = placement_mismatch(model, example_inputs)
    if mismatch is not None:
        raise ValueError(f"gate_hidden: {mismatch}")
    return example_inputs


def _reads_width(module: nn.Module, width: int) -> bool:
    """A Linear-like layer (a weight product with a matrix: nn.Linear, transformers' Conv1D) of ``width`` input columns."""
    return weight_product(module) is not None and raw_tensor(module, "weight").dim() == 2 and weight_widths(module)[1] == width


@torch.no_grad()
def _probe_readers(model: nn.Module, names: dict[str, list[str]], width: int, example_inputs: tuple,
                   only: list[str] | None = None) -> list[str]:
    """The Linear layers that read the stream: one eval forward with every stream module's output (or of those named in
    ``only``) zeroed on the odd dimensions; a Linear (or a Conv1D: :func:`_reads_width`) of ``width`` inputs, not a
    writer, whose every input is zero there (and not everywhere) reads it."""
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

    stream = {*names["tables"], *names["writers"], *names["norms"]} if only is None else set(only)
    handles = [modules[name].register_forward_hook(close) for name in stream]
    handles += [m.register_forward_pre_hook(record(name)) for name, m in modules.items()
                if _reads_width(m, width) and name not in names["writers"]]
    try:
        with evaluating(model):
            run_batch(model, example_inputs)
    except Exception as error:  # the model's own forward refused the batch: say which argument is at fault
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for _, t in example_inputs.named_tensors())
        raise ValueError(f"gate_hidden: example_inputs do not fit {type(model).__name__}'s forward (got {shapes or 'no tensor'}; "
                         f"a batch the model takes, such as (batch, length) token ids): {type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
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


def _attach_decoder_norm(model: nn.Module, name: str, offset: float | None, eps: float, gate: Gate) -> nn.Module:
    """Swap one norm of a pre-norm stream for its open version: an :class:`OpenLayerNorm` (``offset`` None), an
    :class:`OpenRMSNorm` whose weight the gate multiplies (``offset`` 0) or an :class:`OpenOffsetRMSNorm` (``offset + w``)."""
    norm = model.get_submodule(name)
    if offset is None:
        opened = OpenLayerNorm(norm, gate)
    elif offset == 0:
        parametrize.register_parametrization(norm, "weight", GateMask(gate, dim=0))
        opened = OpenRMSNorm(norm, gate, eps)
    else:
        opened = OpenOffsetRMSNorm(norm, gate, eps, offset)
    set_submodule(model, name, opened)
    return opened


def attach_prenorm_hidden_gate(model: nn.Module, names: dict[str, list[str]], norms: dict[str, tuple[float | None, float]], width: int,
                               example_inputs, owner: str, **gate_kwargs) -> Gate:
    """Attach one hidden-size gate to a pre-norm residual stream of ``width`` (an adapter names its modules: ``names``
    with ``"tables"`` and ``"writers"``; ``norms``: name → (offset, eps), offset None for a LayerNorm, 0 for an RMSNorm
    ``x̂ · w``, 1 for Gemma's ``x̂ · (1 + w)``); return it.

    Unlike a BERT-like encoder's (:func:`gate_hidden`), nothing that writes the stream is gated: every reader reads a
    norm's output, so the gate acts in the norms alone (statistics over the open dimensions, output zero on the closed
    ones) and the closed dimensions of the stream, which no reader sees, go with their embedding columns and writer
    rows when pruned. The embedding table stays whole until then, so a language-model head tied to it stays tied.
    That every reader reads a norm's output is all it needs: a post-norm stream whose embeddings pass through a norm
    before any layer reads them (BART's ``layernorm_embedding``) is one too, since a post-norm residual (the previous
    norm's output plus the writers') reaches a reader only through the next norm, whose statistics skip the closed
    dimensions. Two probe forwards find the readers (every Linear whose input is a norm's output) and refuse a stream
    that a Linear reads before any norm (post-norm OPT, Marian: no norm after the embeddings), naming it.
    """
    names = {**names, "norms": list(norms), "readers": []}
    example_inputs = _probe_inputs(model, example_inputs)
    names["readers"] = _probe_readers(model, names, width, example_inputs)
    through_norms = set(_probe_readers(model, {**names, "readers": []}, width, example_inputs, only=names["norms"]))
    raw = [name for name in names["readers"] if name not in through_norms]
    if raw:
        raise ValueError(f"gate_decoder_hidden: {raw[0]!r} reads the residual stream of {type(model).__name__} where no norm stands "
                         "before it (a post-norm stream with no norm after its embeddings, such as OPT with do_layer_norm_before=False "
                         "or Marian): closing a dimension in the norms would not hide it from that layer, so pruning it could not "
                         "be exact")
    modules = dict(model.named_modules())
    reference = next(model.parameters())
    gate = Gate(width, **gate_kwargs).to(device=reference.device)
    gate.owner, gate.granularity = owner, "hidden"
    tables = tuple(modules[n] for n in names["tables"])
    writers = tuple(modules[n] for n in names["writers"])
    unique: dict[int, nn.Module] = {}  # tables sharing one weight (an encoder-decoder's shared and embed_tokens): paid once
    for table in tables:
        unique.setdefault(id(table.weight), table)
    gate.producers = tuple(unique.values()) + writers  # the penalty's charge: the weights that make the stream
    opened = tuple(_attach_decoder_norm(model, name, *norms[name], gate) for name in names["norms"])
    gate.stream = HiddenStream(tables, writers, tuple(modules[n] for n in names["readers"]), opened, width)
    return gate


def _rms_eps(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm-like module (``variance_epsilon`` in Llama's family, ``eps`` elsewhere), or None."""
    for attribute in ("variance_epsilon", "eps"):
        value = getattr(module, attribute, None)
        if isinstance(value, float):
            return value
    return None


@torch.no_grad()
def _rms_offset(name: str, norm: nn.Module, probe: Tensor) -> float:
    """0 for a norm computing ``x · rsqrt(mean(x²) + eps) · w`` (Llama's), 1 for ``… · (1 + w)`` (Gemma's), checked on
    ``probe`` with every dimension open; refused otherwise, naming the norm."""
    x32 = probe.float()
    normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + _rms_eps(norm))
    got = norm(probe)
    if torch.allclose(got, norm.weight * normed.to(probe.dtype), rtol=1e-5, atol=1e-6):
        return 0.0
    if torch.allclose(got, (normed * (1.0 + norm.weight.float())).to(probe.dtype), rtol=1e-5, atol=1e-6):
        return 1.0
    raise ValueError(f"gate_decoder_hidden: {name!r} ({type(norm).__name__}) computes neither x · rsqrt(mean(x²) + eps) · weight "
                     "(an RMSNorm) nor x · rsqrt(mean(x²) + eps) · (1 + weight) (Gemma's), so the gate could not reproduce it "
                     "over the open dimensions")


def _decoder_norms(model: nn.Module, width: int, probe: Tensor) -> dict[str, tuple[float | None, float]]:
    """The stream's norms (every LayerNorm, or every RMSNorm-like module, of its width): name → (offset, eps)."""
    layer = [name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (width,)]
    rms = [name for name, m in model.named_modules() if not isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm))
           and _rms_eps(m) is not None and isinstance(getattr(m, "weight", None), torch.Tensor) and tuple(m.weight.shape) == (width,)]
    if layer and rms:
        raise ValueError(f"gate_decoder_hidden: the stream of {type(model).__name__} has both LayerNorms ({layer[0]!r}) and "
                         f"RMSNorms ({rms[0]!r}) of width {width}; one kind is supported per stream")
    if not layer and not rms:
        raise ValueError(f"gate_decoder_hidden: {type(model).__name__} has no norm of width {width} (an nn.LayerNorm, or an RMSNorm: "
                         "a module with a weight of that width and variance_epsilon or eps)")
    modules = dict(model.named_modules())
    if layer:
        return {name: (None, modules[name].eps) for name in layer}
    return {name: (_rms_offset(name, modules[name], probe), _rms_eps(modules[name])) for name in rms}


def _attention_writer(model: nn.Module, name: str) -> str:
    """The output projection of the attention module ``name``: as its fused layout names it (:mod:`l0sparse.hf.fused`),
    else found by structure; refused, naming the module, where its fused layout is refused."""
    module = model.get_submodule(name)
    rule = module_rule(module)
    try:
        projection = rule.block_projection(module) if isinstance(rule, FusedHeads) else decoder_attention(module)[1]
    except ValueError as error:  # GPT-2's cross-attention, Falcon with ALiBi: no layout of their rows
        raise ValueError(f"gate_decoder_hidden: {name!r}: {error}; the hidden gate finds the stream's writers through that layout, so it "
                         "is refused too") from None
    return next(inner for inner, m in model.named_modules() if m is projection)


def _decoder_writers(model: nn.Module, width: int) -> list[str]:
    """Each attention module's output projection and each feed-forward block's down projection (as decoder_rules finds
    them, fused projections included); refuses attention no rule lays out (BLOOM's) and a token embedding narrower or
    wider than the stream, by name."""
    attention = decoder_attention_all(model)
    if not attention:
        fused = fused_attention_modules(model)
        where = f" ({fused[0]!r}, {type(model.get_submodule(fused[0])).__name__}, fuses its q/k/v projections)" if fused else ""
        raise ValueError(f"gate_decoder_hidden found no attention module with separate q, k, v and output projections, nor fused ones "
                         f"laid out ({', '.join(FUSED_HEADS)}), in {type(model).__name__}{where}; its stream cannot be gated")
    writers = [_attention_writer(model, name) for name in attention]
    writers += decoder_feed_forward(model, attention)
    modules = dict(model.named_modules())
    other = next((name for name in writers if weight_widths(modules[name])[0] != width), None)
    if other is not None:  # OPT's word_embed_proj_dim ≠ hidden_size: project_in / project_out between table and stream
        wrote = weight_widths(modules[other])[0]
        joins = [name for name, m in modules.items() if isinstance(m, nn.Linear) and {m.in_features, m.out_features} == {width, wrote}]
        raise ValueError(f"gate_decoder_hidden: the token embedding of {type(model).__name__} is {width} wide but {other!r} writes "
                         f"a stream of {wrote}" + (f", joined by {joins[0]!r}" if joins else "")
                         + " (OPT's project_in/project_out when word_embed_proj_dim ≠ hidden_size): not supported")
    return writers


def gate_decoder_hidden(model: nn.Module, example_inputs, **gate_kwargs):
    """Attach one hidden-size gate (one gate per residual-stream dimension) to a pre-norm decoder (after
    :func:`decoder_rules`' ``sparsify``); return the gate. Its norms may be RMSNorms (Llama, Mistral, Qwen2/3, Phi-3),
    Gemma's RMSNorms scaling by ``1 + weight``, or LayerNorms (OPT with ``do_layer_norm_before``, GPT-Neo, GPT-NeoX,
    GPT-2, Falcon); its projections separate or fused (:mod:`l0sparse.hf.fused`), nn.Linear or GPT-2's ``Conv1D``.
    An encoder-decoder (T5, BART, mBART, Pegasus) gets ONE gate over both of its streams, which share one token
    embedding (``shared``): the encoder's and the decoder's norms, self- and cross-attention (its keys and values read
    the encoder's last norm, its queries the decoder's), feed-forward blocks and the head; BART is post-norm, and
    gated exactly because a norm follows its embeddings (``layernorm_embedding``): see
    :func:`attach_prenorm_hidden_gate`. Tables that share one weight (``shared`` and each stack's ``embed_tokens``)
    are sliced once and stay tied.

    The stream is found by structure: the token embedding (``get_input_embeddings()``) and any other ``nn.Embedding`` as
    wide (a learned position embedding: OPT's, GPT-Neo's, GPT-2's), the writers (each attention module's output
    projection, as its fused layout names it or found by structure, and each feed-forward block's down projection, as
    :func:`decoder_rules` finds them) and its norms: every
    ``nn.LayerNorm`` of its width, else every module with a one-dimensional ``weight`` as wide and an epsilon
    (``variance_epsilon`` or ``eps``). Each norm becomes an :class:`~l0sparse.core.stream.OpenLayerNorm`,
    :class:`~l0sparse.core.stream.OpenRMSNorm` or :class:`~l0sparse.core.stream.OpenOffsetRMSNorm`, whose statistics
    run over the open dimensions and whose output is zero on the closed ones (docs/decoders.md, "The hidden size");
    :func:`l0sparse.prune` then removes the closed dimensions from the embeddings, every norm, every writer's rows and
    every reader's columns (q, k, v or a fused q/k/v projection, the first feed-forward layers or a fused gate/up
    projection, the language-model head), a tied head staying tied.

    Raises:
        ValueError: no such stream (fused attention no rule lays out: BLOOM; a layout refused: Falcon with ALiBi, GPT-2's
            cross-attention; OPT's project_in/project_out), a Linear that reads the stream before any norm (post-norm
            OPT, Marian), a norm computing neither an RMSNorm's ``x̂ · w`` nor Gemma's ``x̂ · (1 + w)``, or ``example_inputs`` the
            model refuses; each names the module. The model is unchanged then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gate_decoder_hidden: model must be an nn.Module (a decoder language model), got {type(model).__name__}")
    if hidden_gate(model) is not None or any(isinstance(m, OPEN_NORMS) for m in model.modules()):
        raise ValueError("gate_decoder_hidden: the model already has a hidden gate; attach it once")
    table = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if not isinstance(table, nn.Embedding):
        raise ValueError(f"gate_decoder_hidden: {type(model).__name__} has no token embedding (get_input_embeddings())")
    width = table.embedding_dim
    writers = _decoder_writers(model, width)
    norms = _decoder_norms(model, width, torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(table.weight))
    tables = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim == width]
    tables.sort(key=lambda name: model.get_submodule(name) is not table)  # the token embedding first
    owner = f"{model.base_model_prefix}.hidden" if getattr(model, "base_model_prefix", "") in dict(model.named_children()) else "hidden"
    return attach_prenorm_hidden_gate(model, {"tables": tables, "writers": writers}, norms, width, example_inputs, owner, **gate_kwargs)
