"""Fused projections: one Linear whose output rows hold the queries, keys and values of several heads (an attention
module's fused q/k/v), or several rows of each feed-forward unit (a fused gate/up projection).

Which row belongs to which head or unit is a model family's knowledge, not something the shapes tell: an adapter
(``l0sparse.hf``) parameterises :class:`FusedHeads` and :class:`FusedUnits` with it and registers them
(:func:`l0sparse.register_rule`); the core slices and counts by the layout alone. A layout is plain data (names,
numbers, short lists), so it travels in a prune plan and :func:`l0sparse.rebuild` needs no rule to apply it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import ModuleRule

#: what a fused attention layout may write into the module (``"set"``) or its shared config (``"shared"``) once heads go
QUANTITIES = ("heads", "kv_heads", "per_group", "width", "head_dim")


class FusedHeads(ModuleRule):
    """An attention module (of ``kinds``) whose queries, keys and values come out of fused projections.

    ``layout(module)`` returns a dict:

    - ``"projection"``: the name (inside the module) of the output projection, whose input columns are the query
      heads' outputs, ``head_dim`` each, in order: the head gates go there;
    - ``"fused"``: ``{name inside the module: blocks}``: each fused projection's output rows as consecutive blocks of
      ``head_dim`` rows, each ``["q", h]`` (query head h) or ``["kv", g]`` (the key or the value of key/value head g);
    - ``"heads"``, ``"kv_heads"``, ``"head_dim"``: query head h reads key/value head ``h // (heads / kv_heads)``;
    - ``"set"`` (optional): ``{attribute of the module: quantity}`` that its forward reads, written by prune;
    - ``"shared"`` (optional): ``{attribute of the module's ``config``: quantity}`` that its forward reads from a config
      every layer shares: prune writes it when every module sharing the config keeps the same, and refuses otherwise.

    A quantity is one of :data:`QUANTITIES`: the query heads kept, the key/value heads kept, query heads per key/value
    head, the query width (heads · head_dim), or the head width. prune keeps key/value heads as under grouped-query
    attention (:func:`l0sparse.core.ops.grouped_heads_kept`); multi-head attention is ``kv_heads == heads``.
    """

    leaf = False  # it describes the module's insides: fx may trace through it

    def __init__(self, kinds: tuple[type, ...], layout: Callable[[nn.Module], dict]) -> None:
        self.kinds = tuple(kinds)
        self._layout = layout

    def head_layout(self, module: nn.Module) -> dict:
        return self._layout(module)

    def block_projection(self, module: nn.Module) -> nn.Module:
        return module.get_submodule(self._layout(module)["projection"])

    def head_count(self, module: nn.Module) -> int:
        return self._layout(module)["heads"]


class FusedUnits(ModuleRule):
    """A feed-forward block (of ``kinds``) whose input projection makes several rows per unit. ``layout(module)`` returns
    ``{"producer": name inside the module, "consumer": name, "segments": n}``: the producer's output rows are ``n`` runs of
    one row per unit (Phi-3's ``gate_up_proj``: ``[gate | up]``, unit i owns rows i and f + i), and input column i of
    the consumer (the down projection) is unit i. A unit gate goes on the consumer's columns (``"in"``); prune removes a
    closed unit's column and its row in every run."""

    leaf = False

    def __init__(self, kinds: tuple[type, ...], layout: Callable[[nn.Module], dict]) -> None:
        self.kinds = tuple(kinds)
        self._layout = layout

    def unit_layout(self, module: nn.Module) -> dict:
        return dict(self._layout(module))


def check_head_layout(module: nn.Module, layout: dict, widths: Callable[[nn.Module], tuple[int, int]]) -> None:
    """Refuse, naming the module's class, a layout whose blocks do not tile its fused projections' rows (``widths``: a
    layer's (output rows, input columns), as its rule reads its weight)."""
    where = f"the head layout of {type(module).__name__}"
    heads, kv_heads, head_dim = layout["heads"], layout["kv_heads"], layout["head_dim"]
    if heads % kv_heads or widths(module.get_submodule(layout["projection"]))[1] != heads * head_dim:
        raise ValueError(f"{where}: {heads} query heads of {head_dim} in {kv_heads} key/value heads do not fit its output projection")
    for name, blocks in layout["fused"].items():
        rows = widths(module.get_submodule(name))[0]
        valid = all(kind == "q" and 0 <= h < heads or kind == "kv" and 0 <= h < kv_heads for kind, h in blocks)
        if not valid or len(blocks) * head_dim != rows:
            raise ValueError(f"{where}: the blocks of {name!r} do not tile its {rows} output rows by heads of {head_dim}")
    for attribute, quantity in {**layout.get("set", {}), **layout.get("shared", {})}.items():
        if quantity not in QUANTITIES:
            raise ValueError(f"{where}: {attribute!r} is set to {quantity!r}, not one of {QUANTITIES}")


def fused_head_layout(owner: str, attention: nn.Module, rule: ModuleRule | None, widths) -> dict | None:
    """The layout that ``rule`` (the module's, :class:`FusedHeads`) gives the attention module ``owner``, checked
    (:func:`check_head_layout`), with names from the model's root, as prune and the cost model read it (``"qkv"`` and
    ``"kv"`` empty, ``"fused"`` by full name), or None."""
    layout = rule.head_layout(attention) if rule is not None else None
    if layout is None:
        return None
    check_head_layout(attention, layout, widths)
    full = lambda inner: f"{owner}.{inner}"  # noqa: E731
    return {"projection": full(layout["projection"]), "qkv": [], "kv": [],
            "fused": {full(name): [list(block) for block in blocks] for name, blocks in layout["fused"].items()},
            "heads": layout["heads"], "kv_heads": layout["kv_heads"], "head_dim": layout["head_dim"], "min_width": layout["head_dim"],
            "set": dict(layout.get("set", {})), "shared": dict(layout.get("shared", {}))}


def fused_rows(blocks: list, head_dim: int, query_heads: list[int], kv_heads: list[int]) -> list[int]:
    """The rows of a fused projection that the kept ``query_heads`` and ``kv_heads`` own, in order."""
    kept = {"q": set(query_heads), "kv": set(kv_heads)}
    return [position * head_dim + i for position, (kind, head) in enumerate(blocks) if head in kept[kind] for i in range(head_dim)]


def quantities(query_heads: int, kv_heads: int, head_dim: int) -> dict[str, int]:
    """The values of :data:`QUANTITIES` for ``query_heads`` kept in ``kv_heads`` key/value heads."""
    return {"heads": query_heads, "kv_heads": kv_heads, "per_group": query_heads // kv_heads, "width": query_heads * head_dim,
            "head_dim": head_dim}


def set_attributes(module: nn.Module, settings: dict[str, str], values: dict[str, int]) -> None:
    """Write ``settings`` (attribute -> quantity) into ``module`` from ``values`` (:func:`quantities`)."""
    for attribute, quantity in settings.items():
        setattr(module, attribute, values[quantity])


def fused_unit_layouts(model: nn.Module, rule_of: Callable[[nn.Module], ModuleRule | None]) -> dict[str, dict]:
    """Per feed-forward block with a fused input projection (:class:`FusedUnits`, as ``rule_of`` a module gives):
    ``{consumer: {"producer": name, "segments": n}}``, names from the model's root."""
    found: dict[str, dict] = {}
    for name, module in model.named_modules():
        rule = rule_of(module)
        layout = rule.unit_layout(module) if rule is not None else None
        if layout is not None:
            prefix = f"{name}." if name else ""
            found[prefix + layout["consumer"]] = {"producer": prefix + layout["producer"], "segments": layout["segments"]}
    return found


def unit_rows(kept: list[int], units: int, segments: int) -> list[int]:
    """The rows of a fused input projection of ``units`` units in ``segments`` runs that the ``kept`` units own."""
    return [segment * units + unit for segment in range(segments) for unit in kept]
