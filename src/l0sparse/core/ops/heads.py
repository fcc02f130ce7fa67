"""Heads of attention modules that are not PyTorch's own (a Hugging Face model's, a user's): where a module keeps its
head count, which of its Linear layers make q, k and v, grouped-query layouts, and updating them when heads go."""

from __future__ import annotations


from torch import nn

from ..sites import gate_masks


# where attention modules of other libraries (Hugging Face BERT-like encoders) keep their head count and
# the width of all heads together: prune must update them when it removes heads
_HEAD_COUNT_NAMES = ("num_attention_heads", "num_heads", "n_heads", "n_head")


_HEADS_WIDTH_NAMES = ("all_head_size", "dim", "inner_dim")


# ... and the width of one head, which prune sets to 1 where every head is closed (a forward cannot run with none)
_HEAD_DIM_NAMES = ("attention_head_size", "head_dim", "dim_per_head")


def _head_count_holder(module: nn.Module) -> tuple[nn.Module, str] | None:
    """The first submodule of ``module`` (itself included) with an int head-count attribute, and its name."""
    for submodule in module.modules():
        for attribute in _HEAD_COUNT_NAMES:
            value = getattr(submodule, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return submodule, attribute
    return None


def declared_head_count(module: nn.Module) -> int | None:
    """The head count an attention module of another library declares (``num_attention_heads``, ``n_heads``...), or None."""
    holder = _head_count_holder(module)
    return None if holder is None else getattr(*holder)


def set_head_count(module: nn.Module, before: int, after: int, head_dim: int, new_head_dim: int | None = None) -> None:
    """Update an attention module's head bookkeeping from ``before`` heads of ``head_dim`` each to ``after``
    heads of ``new_head_dim`` (default: ``head_dim``) each."""
    holder = _head_count_holder(module)
    if holder is None:
        return
    submodule, attribute = holder
    new_head_dim = head_dim if new_head_dim is None else new_head_dim
    width_names = [name for name in _HEADS_WIDTH_NAMES if getattr(submodule, name, None) == before * head_dim]
    dim_names = [name for name in _HEAD_DIM_NAMES if getattr(submodule, name, None) == head_dim] if new_head_dim != head_dim else []
    setattr(submodule, attribute, after)
    for width in width_names:  # only the width of all heads together, next to the count
        setattr(submodule, width, after * new_head_dim)
    for name in dim_names:
        setattr(submodule, name, new_head_dim)


def record_pruned_heads(model: nn.Module, layouts: dict[str, dict]) -> None:
    """Hugging Face's record of removed heads, kept as its own ``prune_heads`` keeps it: on the config of each
    model inside ``model`` (a Hugging Face ``PreTrainedModel``), ``config.pruned_heads`` maps a layer index (the
    first index in the attention module's name) to the sorted ORIGINAL indices of its removed heads, merged
    with what it held (``config.num_attention_heads`` stays the original count), and an attention module's
    own ``pruned_heads`` set, where it has one, says the same. ``layouts``: :func:`head_layouts`, each with ``"kept"``."""
    configs = set()
    for prefix, holder in model.named_modules():
        config = getattr(holder, "config", None)
        if config is None or id(config) in configs or not callable(getattr(config, "to_dict", None)):
            continue
        configs.add(id(config))  # an outer model (BertForSequenceClassification) shares its config with the inner one
        start = f"{prefix}." if prefix else ""
        recorded = {int(layer): set(heads) for layer, heads in (getattr(config, "pruned_heads", None) or {}).items()}
        for owner, layout in layouts.items():
            index = next((int(part) for part in owner.removeprefix(start).split(".") if part.isdigit()), None)
            if not owner.startswith(start) or index is None or len(layout["kept"]) == layout["heads"]:
                continue
            before = recorded.get(index, set())
            original = getattr(config, "num_attention_heads", layout["heads"] + len(before))
            remaining = [head for head in range(original) if head not in before]  # the module's heads, by original index
            if len(remaining) != layout["heads"]:  # not the count the record implies: nothing can be mapped
                continue
            recorded[index] = before | {head for position, head in enumerate(remaining) if position not in layout["kept"]}
            for module in model.get_submodule(owner).modules():
                if isinstance(getattr(module, "pruned_heads", None), set):
                    module.pruned_heads = set(recorded[index])
        if recorded:
            config.pruned_heads = {layer: sorted(heads) for layer, heads in sorted(recorded.items())}


def _smallest_width(module: nn.Module, head_dim: int) -> int:
    """The fewest q/k/v rows an attention module whose heads are all closed can keep: 1 where the module
    declares its head width (prune can narrow its one zero head), else one whole head. A module that declares
    key/value groups (a decoder's: rotary position embeddings turn each head's full width) keeps a whole head."""
    if any(hasattr(module, name) for name in _KV_GROUP_NAMES):
        return head_dim
    holder = _head_count_holder(module)
    found = holder is not None and any(getattr(holder[0], name, None) == head_dim for name in _HEAD_DIM_NAMES)
    return 1 if found else head_dim


# where a grouped-query attention module (Llama, Mistral, Qwen2...) keeps the query heads per key/value head: its
# forward repeats each key/value head that many times, so prune sets it to the query heads kept per group
_KV_GROUP_NAMES = ("num_key_value_groups",)


def grouped_projections(attention: nn.Module, projection: nn.Linear) -> dict | None:
    """The layout of a grouped-query attention module whose output projection is ``projection``: ``{"q": [name],
    "kv": [key, value names], "heads": query heads, "kv_heads": key/value heads, "head_dim": ...}``, or None.

    Found by shape: one Linear as wide as the projection's input (the queries), two more of one narrower width
    (keys and values), and the width of one head declared by the module (``head_dim``...), which tells how many
    query heads share a key/value head. Query head h reads key/value head h // (heads / kv_heads), as the
    forward's repeat of each key/value head makes it."""
    linears = [(inner, linear) for inner, linear in attention.named_modules() if isinstance(linear, nn.Linear) and linear is not projection]
    queries = [inner for inner, linear in linears if linear.out_features == projection.in_features]
    narrower = [(inner, linear.out_features) for inner, linear in linears if linear.out_features < projection.in_features]
    head_dim = next((getattr(attention, name) for name in _HEAD_DIM_NAMES if isinstance(getattr(attention, name, None), int)), None)
    if len(queries) != 1 or len(narrower) != 2 or narrower[0][1] != narrower[1][1] or not head_dim:
        return None
    width = narrower[0][1]
    if projection.in_features % head_dim or width % head_dim or projection.in_features % width:
        return None
    return {"q": queries, "kv": [inner for inner, _ in narrower], "heads": projection.in_features // head_dim,
            "kv_heads": width // head_dim, "head_dim": head_dim}


def grouped_heads_kept(kept: list[int], heads: int, kv_heads: int) -> tuple[list[int], list[int]]:
    """(query heads, key/value heads) that prune keeps in a grouped-query attention module where the query heads
    ``kept`` are open. The forward gives every key/value head the same number of query heads, so each group that
    keeps any keeps as many as the fullest group (closed ones, zero in the output projection, fill the others); a
    group with none goes with its key and value rows; where every head is closed one head of group 0 stays."""
    per_group = heads // kv_heads
    members = {group: [h for h in kept if h // per_group == group] for group in range(kv_heads)}
    groups = [group for group in range(kv_heads) if members[group]] or [0]
    width = max(1, max(len(members[group]) for group in groups))
    query_heads = []
    for group in groups:
        fill = [h for h in range(group * per_group, (group + 1) * per_group) if h not in members[group]]
        query_heads += sorted(members[group] + fill[: width - len(members[group])])
    return query_heads, groups


def set_kv_groups(module: nn.Module, groups: int) -> None:
    """Set a grouped-query attention module's query heads per key/value head (its forward repeats keys and values so)."""
    for name in _KV_GROUP_NAMES:
        if hasattr(module, name):
            setattr(module, name, groups)


def head_layouts(model: nn.Module, fused_layout=None) -> dict[str, dict]:
    """Per attention module of the user's own gated with ``("heads", n)`` or ``"block"`` whose heads prune
    can remove: ``{"projection": name of its output projection, "qkv": names of its three other Linear
    layers as wide as the projection's input (q, k, v), "heads": its head count, "head_dim": the width of
    one head, "min_width": the q/k/v rows kept when every head is closed}`` (JSON-serialisable). For
    grouped-query attention (:func:`grouped_projections`) ``"qkv"`` names the queries alone, ``"kv"`` the keys
    and values, and ``"kv_heads"`` their head count. An attention module with fused projections (:class:`l0sparse.core.ops.FusedHeads`)
    has empty ``"qkv"`` and ``"kv"`` and its projections' rows under ``"fused"``: ``fused_layout(owner, module)`` gives it
    (:func:`l0sparse.core.ops.fused_head_layout`, through the module's rule), or None."""
    layouts = {}
    modules = dict(model.named_modules())
    for name, module, _, mask in gate_masks(model):
        owner = getattr(mask.gate, "owner", None)
        attention = modules.get(owner)
        if getattr(mask.gate, "granularity", None) not in ("heads", "block") or attention is None or owner in layouts or isinstance(
                attention, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.Linear)):
            continue
        fused = fused_layout(owner, attention) if fused_layout is not None else None
        if fused is not None:  # fused q/k/v projections (an adapter's FusedHeads rule says which rows are whose)
            if fused["projection"] == name:
                layouts[owner] = fused
            continue
        qkv = query_key_value(attention, module)
        grouped = grouped_projections(attention, module) if len(qkv) != 3 else None
        if grouped is not None:  # grouped-query attention: query heads, and key/value heads with their groups
            layouts[owner] = {"projection": name, "qkv": [f"{owner}.{inner}" for inner in grouped["q"]],
                              "kv": [f"{owner}.{inner}" for inner in grouped["kv"]], "heads": grouped["heads"],
                              "kv_heads": grouped["kv_heads"], "head_dim": grouped["head_dim"], "min_width": grouped["head_dim"]}
            continue
        heads = declared_head_count(attention) or (mask.gate.log_alpha.numel() if mask.gate.granularity == "heads" else None)
        if len(qkv) != 3 or heads is None:  # a fused qkv layer, no output projection, no head count: no head can go
            continue
        head_dim = module.in_features // heads
        layouts[owner] = {"projection": name, "qkv": [f"{owner}.{inner}" for inner in qkv], "heads": heads,
                          "head_dim": head_dim, "min_width": _smallest_width(attention, head_dim)}
    return layouts


def query_key_value(attention: nn.Module, projection: nn.Linear) -> list[str]:
    """Names (inside ``attention``) of its Linear layers other than ``projection`` that make ``projection``'s input width."""
    return [inner for inner, linear in attention.named_modules()
            if isinstance(linear, nn.Linear) and linear is not projection and linear.out_features == projection.in_features]
