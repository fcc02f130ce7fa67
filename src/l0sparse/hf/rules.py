"""Where gates go in a Hugging Face model: attention and feed-forward found by structure (encoders and decoders)."""

from __future__ import annotations

from torch import nn

from ..core.ops import LinearRule, fused_unit_layouts, module_rule, weight_widths
from .fused import FUSED_HEADS, REFUSED_HEADS, UNIT_PAIRS, fused_head_modules


def linear_children(module: nn.Module) -> list[nn.Linear]:
    """Every Linear inside ``module``, in registration order."""
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
    from ..core.ops import declared_head_count

    declared = declared_head_count(module)
    if declared is not None:
        return declared
    for key in ("num_attention_heads", "n_heads", "num_heads", "n_head"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def attention_modules(model: nn.Module) -> list[str]:
    """The names of the outermost modules that are attention by structure (:func:`_is_attention`), in model order."""
    attention: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not any(name.startswith(f"{outer}.") for outer in attention) and _is_attention(linear_children(module)):
            attention.append(name)
    return attention


def layers_around(model: nn.Module, attention: list[str]) -> dict[str, str]:
    """Each attention module's layer: the nearest module above it that holds other Linear layers (its feed-forward block)."""
    modules = dict(model.named_modules())
    in_attention = {id(m) for name in attention for m in linear_children(modules[name])}
    layers: dict[str, str] = {}
    for name in attention:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            layer = ".".join(parts[:depth])
            if any(isinstance(m, nn.Linear) and id(m) not in in_attention for m in modules[layer].modules()):
                layers[name] = layer
                break
    return layers


def feed_forward_outputs(model: nn.Module, attention: list[str]) -> list[str]:
    """Per layer (:func:`layers_around`), the second Linear of each feed-forward pair: ``d → f`` then ``f → d``, ``d``
    the attention's width, next to each other in the layer."""
    modules = dict(model.named_modules())
    in_attention = {id(m) for name in attention for m in linear_children(modules[name])}
    found: dict[str, None] = {}
    for name, layer in layers_around(model, attention).items():
        width = _output_width(modules[name])
        others = [(n, m) for n, m in modules[layer].named_modules() if isinstance(m, nn.Linear) and id(m) not in in_attention]
        for (_, up), (down_name, down) in zip(others, others[1:]):
            if up.in_features == down.out_features == width and up.out_features == down.in_features:
                found[f"{layer}.{down_name}" if layer else down_name] = None
    return list(found)


def _output_width(attention: nn.Module) -> int:
    """The width an attention module writes back: its output projection's (as its rule names it, or found by structure),
    else its last Linear's (Phi-3 registers o_proj before its fused qkv_proj)."""
    rule = module_rule(attention)
    try:
        projection = rule.block_projection(attention) if rule is not None else None
    except ValueError:  # a fused layout refused for this module (Falcon with ALiBi): found by structure below
        projection = None
    if projection is None:
        found = decoder_attention(attention)
        projection = found[1] if found else linear_children(attention)[-1]
    return weight_widths(projection)[0]  # a Linear's out_features, a Conv1D's nf


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
    attention = attention_modules(model)
    if not attention:
        raise ValueError(f"encoder_rules found no attention module in {type(model).__name__}: it looks for a module whose only nn.Linear "
                         "layers are three query/key/value projections of one width and an output projection back to the input width "
                         "(BERT's '…attention', DistilBERT's MultiHeadSelfAttention); a fused qkv projection is not supported")
    rules: dict = {}
    for name in attention if heads else []:  # heads=False: no head rules, the feed-forward ones below
        module = model.get_submodule(name)
        count, width = _head_count(module, config), linear_children(module)[0].out_features
        if count is None:
            raise ValueError(f"encoder_rules: the attention module {name!r} ({type(module).__name__}) declares no head count "
                             "(num_attention_heads, n_heads or num_heads, on it or on the model's config)")
        if count < 1 or width % count:
            raise ValueError(f"encoder_rules: the attention module {name!r} ({type(module).__name__}) has {count} heads, which do "
                             f"not divide its width {width}")
        rules[name] = ("heads", count)
    _refuse_per_head_tables(model, rules, "encoder_rules")
    rules.update({name: "in" for name in feed_forward_outputs(model, attention)})
    rules[nn.Linear] = "skip"
    return rules


def decoder_attention(module: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """(queries, output projection) of a decoder attention module with separate projections, by structure: its only
    Linear layers are a query projection ``d → h``, key and value projections ``d → k`` (``k`` divides ``h``: grouped
    queries, or ``k = h``) and an output projection ``h → d``, in any order of registration."""
    linears = linear_children(module)
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


def decoder_attention_modules(model: nn.Module) -> list[str]:
    """The outermost modules that are attention by structure (:func:`decoder_attention`), in model order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not any(name.startswith(f"{outer}.") for outer in found) and decoder_attention(module):
            found.append(name)
    return found


def fused_attention_modules(model: nn.Module) -> list[str]:
    """The outermost modules named as attention (class ``…Attention``) whose last nn.Linear maps back to the stream:
    fused projections (GPT-NeoX, Falcon, BLOOM, Phi-3), whose layers still have feed-forward blocks to find."""
    found: list[str] = []
    for name, module in model.named_modules():
        linears = linear_children(module)
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
    """``sparsify`` rules for a Hugging Face decoder language model (Llama, Mistral, Qwen2/3, Gemma, OPT, GPT-Neo,
    GPT-NeoX, Phi-3, GPT-2, Falcon...): the heads of every attention module and the units of every feed-forward block.

    Found by structure, as :func:`encoder_rules` finds them: an attention module holds a query projection, key and
    value projections of one width (as wide as the queries, or narrower: grouped-query attention, one group for
    multi-query) and an output projection back to the residual width, as four separate ``nn.Linear`` layers with the
    output projection registered last. The feed-forward block is the ``d → f``, ``f → d`` pair next to it; a gated
    MLP (SwiGLU, GeGLU: ``gate_proj``, ``up_proj``, ``down_proj``) has its unit gate on the down projection's columns,
    and prune removes the unit's gate and up rows with it.

    Fused projections are laid out per family (:mod:`l0sparse.hf.fused`, rules registered on import): GPT-NeoX's
    ``query_key_value`` (rows interleaved per head, ``[q | k | v]`` of each), Phi-3's ``qkv_proj`` (``[q | k | v]``,
    grouped-query) and ``gate_up_proj`` (``[gate | up]``: a unit's two rows), GPT-2's ``c_attn`` (``[q | k | v]``; its
    layers are ``Conv1D``, a transposed Linear: :mod:`l0sparse.hf.linears`), Falcon's ``query_key_value`` (per group,
    multi-query or per head, as its config says; ``FalconLinear`` layers). The head gates go on the output
    projection's columns (``dense``, ``o_proj``, wherever it is registered) and prune removes a closed head's rows of the
    fused projection. Phi-3's forward reads its query width from the config every layer shares: prune keeps the same
    number of query heads in every layer or refuses, naming the layers (a shape, :func:`l0sparse.hf.prune_to_shape`,
    keeps them equal).

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
        ValueError: no attention module whose heads can be gated is found; where the model has fused attention of a
            family without a layout the error names the module and why: BLOOM (its ALiBi slopes depend on each head's
            index and the model's head count), Falcon with ALiBi (the same), GPT-2's cross-attention, and says that
            ``heads=False`` gates the units where it can. Also: a Linear with a forward of its own and no rule in a
            gated module, a per-head table shared by the layers (T5), or an output projection that is not the module's
            last ``nn.Linear`` (separate projections), where a head gate would land.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"decoder_rules: model must be an nn.Module (a decoder language model), got {type(model).__name__}")
    for flag, value in (("heads", heads), ("groups", groups), ("blocks", blocks)):
        if not isinstance(value, bool):
            raise TypeError(f"decoder_rules: {flag} must be True or False, got {value!r}")
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    attention = _decoder_attention_or_refuse(model, heads)
    rules: dict = {}
    for name in attention if heads else []:
        rules[name] = ("heads+block" if blocks else "heads", _decoder_head_gates(name, model.get_submodule(name), config, groups))
    _refuse_per_head_tables(model, rules, "decoder_rules")
    units = "in+block" if blocks else "in"
    feed_forward = decoder_feed_forward(model, attention)
    if not rules and not feed_forward:
        raise ValueError(f"decoder_rules found no feed-forward block in {type(model).__name__}: it looks for a d → f, f → d pair of "
                         "nn.Linear next to each attention module (a fused gate_up projection, as Phi-3's, is not supported)")
    rules.update({name: units for name in feed_forward})
    _refuse_linears_with_own_forward(model, rules)
    rules[nn.Linear] = "skip"
    return rules


def decoder_feed_forward(model: nn.Module, attention: list[str]) -> list[str]:
    """The units' layers of a decoder: the second of each ``d → f``, ``f → d`` pair next to the ``attention`` modules
    (:func:`feed_forward_outputs`), and the down projection of each feed-forward block with a fused input projection
    (Phi-3's ``gate_up_proj``: :mod:`l0sparse.hf.fused`)."""
    found = feed_forward_outputs(model, attention)
    pairs = [f"{name}.{UNIT_PAIRS[type(module).__name__][1]}" for name, module in model.named_modules() if type(module).__name__ in UNIT_PAIRS]
    return found + [name for name in [*fused_unit_layouts(model), *pairs] if name not in found]


def decoder_attention_all(model: nn.Module, refuse: bool = False) -> list[str]:
    """The attention modules whose heads :func:`decoder_rules` gates: separate projections, or fused ones laid out by a
    registered rule (:mod:`l0sparse.hf.fused`; ``refuse``: a module of such a class whose heads cannot be laid out
    raises, naming it), in model order."""
    order = {name: position for position, (name, _) in enumerate(model.named_modules())}
    return sorted({*decoder_attention_modules(model), *fused_head_modules(model, refuse)}, key=order.__getitem__)


def _decoder_attention_or_refuse(model: nn.Module, heads: bool) -> list[str]:
    """The decoder's attention modules: those of separate projections (:func:`decoder_attention_modules`) and those whose
    fused projections a registered rule lays out (:mod:`l0sparse.hf.fused`), in model order; with ``heads=False``, where
    there are none, the other fused ones, which still say where each layer's feed-forward block is. Refuses heads of
    a family whose fused heads cannot be sliced (naming the module and why), and a model with no attention at all."""
    attention = decoder_attention_all(model, refuse=heads)
    fused = [] if attention else fused_attention_modules(model)
    if not attention and (heads or not fused):
        named = fused[0] if fused else next((name for name, m in model.named_modules() if type(m).__name__.endswith("Attention")), None)
        kind = type(model.get_submodule(named)).__name__ if named else None
        why = f": {named!r} ({kind}) has no four separate nn.Linear projections" if named else ""
        if kind in REFUSED_HEADS:
            why = f": {named!r} ({kind}) is not supported: {REFUSED_HEADS[kind]}"
        raise ValueError(f"decoder_rules found no attention module whose heads it can gate in {type(model).__name__}{why}; fused "
                         f"projections are laid out for {', '.join(FUSED_HEADS)} only"
                         + ("; decoder_rules(model, heads=False) gates the feed-forward units only" if fused else ""))
    return attention or fused


def _decoder_head_gates(name: str, module: nn.Module, config, groups: bool) -> int:
    """How many head gates the attention module ``name`` gets: one per query head, or with ``groups`` one per key/value
    group. Refuses a module whose output projection is not its last Linear, or whose head width cannot be told."""
    rule = module_rule(module)
    layout = rule.head_layout(module) if rule is not None else None
    if layout is not None:  # fused projections (hf.fused): the gates go on the output projection the layout names
        return layout["kv_heads"] if groups else layout["heads"]
    queries, projection = decoder_attention(module)
    if linear_children(module)[-1] is not projection:
        raise ValueError(f"decoder_rules: the output projection of {name!r} ({type(module).__name__}) is not its last nn.Linear, "
                         "where sparsify puts head gates; its heads cannot be gated")
    head_dim = _decoder_head_dim(module, config, queries)
    if not head_dim or queries.out_features % head_dim:
        raise ValueError(f"decoder_rules: cannot tell the head width of {name!r} ({type(module).__name__}): no head_dim or head "
                         "count on it or the model's config")
    kv_width = next(m.out_features for m in linear_children(module) if m is not queries and m is not projection)
    return kv_width // head_dim if groups else queries.out_features // head_dim


def _refuse_linears_with_own_forward(model: nn.Module, rules: dict) -> None:
    """Refuse a gated module holding a Linear subclass with a forward of its own (Falcon's): it is not traced as a Linear,
    so nothing could be removed. A parametrized Linear inherits nn.Linear.forward."""
    modules = dict(model.named_modules())
    for name in rules:
        for linear in linear_children(modules[name]):
            if type(linear).forward is not nn.Linear.forward and type(module_rule(linear)) is LinearRule:  # no rule of its own
                raise ValueError(f"decoder_rules: {name!r} holds a {type(linear).__name__}, an nn.Linear with a forward of its own, "
                                 "which l0sparse's tracing does not follow: its gates could not be removed (register a rule for it: l0sparse.register_rule)")

def _refuse_per_head_tables(model: nn.Module, rules: dict, caller: str) -> None:
    """Refuse head rules where the model holds a table of one column per head outside one layer (an ``nn.Embedding``:
    MPNet's and T5's relative-position bias, read by every layer): its columns cannot follow one layer's heads."""
    counts = {count for _, count in rules.values()}
    per_head = next((name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim in counts), None)
    if per_head is not None:
        raise ValueError(f"{caller}: {per_head!r} in {type(model).__name__} is a table of one column per head (a relative-position "
                         "bias every layer reads); its columns cannot follow the heads one layer loses, so heads cannot be gated: "
                         f"{caller}(model, heads=False) gates the feed-forward units only")
