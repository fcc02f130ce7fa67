"""Fused projections of Hugging Face decoders: which rows of a fused q/k/v (or gate/up) Linear belong to which head
(or unit), per family. The core's generic rules (:class:`l0sparse.core.ops.FusedHeads`, :class:`~l0sparse.core.ops.FusedUnits`)
are parameterised here and registered through :func:`l0sparse.register_rule` for the classes a model holds.

- GPT-NeoX (Pythia): ``query_key_value`` rows interleaved per head, ``[q_h | k_h | v_h]`` of ``head_size`` each for head
  h (its forward views them as ``(heads, 3 · head_size)`` and chunks each in three); ``dense`` reads the heads' outputs
  in order. Partial rotary (``rotary_pct``) turns the first dimensions of each head: per head, so whole heads slice.
  The forward reshapes with ``-1`` heads: every layer may keep its own count.
- Phi-3: ``qkv_proj`` rows ``[q (H · d) | k (K · d) | v (K · d)]`` (grouped-query), ``o_proj`` per query head;
  ``gate_up_proj`` rows ``[gate (f) | up (f)]``: unit i owns rows i and f + i, and ``down_proj``'s column i. The
  forward takes the queries as the first ``config.num_attention_heads · head_dim`` rows, from the config every layer
  shares: prune writes it, so every layer must keep the same number of query heads (else prune refuses, by name).
- GPT-2: ``c_attn`` (a ``Conv1D``: :mod:`l0sparse.hf.linears`) rows ``[q | k | v]``, each ``H · d``, split by the module's
  ``split_size``, which prune writes with ``num_heads``; ``c_proj`` per head. Its feed-forward ``c_fc`` and ``c_proj``
  are Conv1D too, found by :data:`UNIT_PAIRS`.
- Falcon: ``query_key_value`` (a ``FalconLinear``) in one of three layouts, as its config says (:func:`_falcon_heads`);
  the module's ``num_heads``, ``num_kv_heads`` and ``num_key_value_groups`` are what its forward reads. ALiBi refused.
"""

from __future__ import annotations

from torch import nn

from ..core.ops import FusedHeads, FusedUnits, module_rule, register_rule


def _neox_heads(module: nn.Module) -> dict:
    """GPTNeoXAttention: head h owns rows [3hd, 3(h+1)d) of ``query_key_value`` (its q, k, v) and columns [hd, (h+1)d) of ``dense``."""
    head_dim = module.head_size
    heads = module.dense.in_features // head_dim
    return {"projection": "dense", "fused": {"query_key_value": [[kind, h] for h in range(heads) for kind in ("q", "kv", "kv")]},
            "heads": heads, "kv_heads": heads, "head_dim": head_dim}


def _phi3_heads(module: nn.Module) -> dict:
    """Phi3Attention: ``qkv_proj`` rows [q (H·d) | k (K·d) | v (K·d)]; the forward reads the query width from the config."""
    head_dim, kv_heads = module.head_dim, module.num_key_value_heads
    heads = module.o_proj.in_features // head_dim
    blocks = [["q", h] for h in range(heads)] + [["kv", g] for g in range(kv_heads)] * 2
    return {"projection": "o_proj", "fused": {"qkv_proj": blocks}, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "set": {"num_key_value_heads": "kv_heads", "num_key_value_groups": "per_group"},
            "shared": {"num_attention_heads": "heads", "head_dim": "head_dim"}}


def _gpt2_heads(module: nn.Module) -> dict:
    """GPT2Attention: ``c_attn`` (a Conv1D) rows [q (H·d) | k (H·d) | v (H·d)], split by ``split_size``; ``c_proj`` per head."""
    if hasattr(module, "q_attn"):
        raise ValueError(f"{type(module).__name__} as cross-attention (q_attn, and c_attn making keys and values only) is not "
                         "laid out: its heads cannot be gated")
    head_dim = module.head_dim
    heads = module.c_proj.nx // head_dim
    blocks = [["q", h] for h in range(heads)] + [["kv", h] for h in range(heads)] * 2
    return {"projection": "c_proj", "fused": {"c_attn": blocks}, "heads": heads, "kv_heads": heads, "head_dim": head_dim,
            "set": {"split_size": "width", "num_heads": "heads"}}


def _falcon_heads(module: nn.Module) -> dict:
    """FalconAttention (its layers FalconLinear: :mod:`l0sparse.hf.linears`), as its forward splits ``query_key_value``:
    the new decoder architecture per key/value group ``[q of its heads | k | v]``; multi-query ``[q (H·d) | k (d) | v (d)]``;
    otherwise per head ``[q | k | v]`` (as GPT-NeoX). With ALiBi (``config.alibi``) refused, as BLOOM's heads are."""
    if module.config.alibi:
        raise ValueError(f"{type(module).__name__} with ALiBi (config.alibi) is not laid out: FalconModel computes one slope per "
                         "head from the model's head count and each head's index, shared by every layer, so a layer without some "
                         "of its heads would give the others the wrong slopes")
    head_dim, kv_heads = module.head_dim, module.num_kv_heads
    heads = module.dense.in_features // head_dim
    if module.new_decoder_architecture:
        per_group = heads // kv_heads
        blocks = [block for g in range(kv_heads) for block in [["q", g * per_group + i] for i in range(per_group)] + [["kv", g], ["kv", g]]]
    elif module.multi_query:
        blocks = [["q", h] for h in range(heads)] + [["kv", 0], ["kv", 0]]
    else:
        blocks = [[kind, h] for h in range(heads) for kind in ("q", "kv", "kv")]
    return {"projection": "dense", "fused": {"query_key_value": blocks}, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "set": {"num_heads": "heads", "num_kv_heads": "kv_heads", "num_key_value_groups": "per_group"}}


#: attention classes with fused q/k/v whose heads l0sparse slices, by class name: the layout of each
FUSED_HEADS = {"GPTNeoXAttention": _neox_heads, "Phi3Attention": _phi3_heads, "GPT2Attention": _gpt2_heads, "FalconAttention": _falcon_heads}
#: feed-forward classes whose layers are no nn.Linear (GPT-2's Conv1D): (up projection, down projection) by class name
UNIT_PAIRS = {"GPT2MLP": ("c_fc", "c_proj")}
#: feed-forward classes with a fused input projection: (producer, consumer, rows per unit)
FUSED_UNITS = {"Phi3MLP": ("gate_up_proj", "down_proj", 2)}
#: attention classes with fused projections whose heads are refused, and why
REFUSED_HEADS = {
    "BloomAttention": "its ALiBi biases come from one slope per head that BloomModel computes from the model's head count "
                      "and each head's index, shared by every layer: a layer without some of its heads would give the others "
                      "the wrong slopes, so its heads are not gated",
}


class FamilyHeads(FusedHeads):
    """:class:`~l0sparse.core.ops.FusedHeads` for the attention classes of :data:`FUSED_HEADS`, matched by class name
    (so that registering it imports no model of transformers)."""

    def __init__(self) -> None:
        super().__init__((nn.Module,), lambda module: FUSED_HEADS[type(module).__name__](module))

    def applies(self, module: nn.Module) -> bool:
        return type(module).__name__ in FUSED_HEADS


class FamilyUnits(FusedUnits):
    """:class:`~l0sparse.core.ops.FusedUnits` for the feed-forward classes of :data:`FUSED_UNITS`, matched by class name."""

    def __init__(self) -> None:
        super().__init__((nn.Module,), lambda module: dict(zip(("producer", "consumer", "segments"), FUSED_UNITS[type(module).__name__])))

    def applies(self, module: nn.Module) -> bool:
        return type(module).__name__ in FUSED_UNITS


_handles: list = []


def register_fused_rules() -> None:
    """Register :class:`FamilyHeads` and :class:`FamilyUnits` (once; ``import l0sparse.hf`` does it)."""
    if not _handles:
        _handles.extend(register_rule(rule) for rule in (FamilyHeads(), FamilyUnits()))


def fused_head_modules(model: nn.Module, refuse: bool = True) -> list[str]:
    """The outermost modules whose rule gives a fused head layout (:func:`register_fused_rules`), in model order. A module
    of such a class whose layout is refused (GPT-2's cross-attention, Falcon with ALiBi) raises a ValueError naming it,
    or with ``refuse=False`` is listed anyway (it still says where a layer's feed-forward block is)."""
    found: list[str] = []
    for name, module in model.named_modules():
        rule = module_rule(module)
        if rule is None or any(name.startswith(f"{outer}.") for outer in found):
            continue
        try:
            layout = rule.head_layout(module)
        except ValueError as error:  # a module of the class the layout does not describe (GPT-2's cross-attention)
            if refuse:
                raise ValueError(f"decoder_rules: {name!r}: {error}; decoder_rules(model, heads=False) gates the feed-forward "
                                 "units only") from None
            layout = {}
        if layout is not None:
            found.append(name)
    return found
