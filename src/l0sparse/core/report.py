"""Summaries of a gated model: the paper's architecture string and a per-layer table (the plots of runs: plots.py)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .costs import count_flops
from .gates import Gate
from .graph import check_module, example_tuple
from .prune import plain_copy, prune
from .sites import find_gates, gate_sites

__all__ = ["architecture", "summary", "Summary", "gate_units", "saved_width", "ATTENTION_PRODUCTS"]

#: the summary's row for the MACs of attention's two matrix products (scores and the weighted values), which no
#: Linear or conv holds: count_flops counts them under the name of the function that computes them
ATTENTION_PRODUCTS = "attention products (QKᵀ, AV)"


#: what one sparsify gate counts, by its granularity (the paper's layers' gates count inputs or channels)
_COUNTED_BY_GRANULARITY = {"in": "inputs", "out": "outputs", "weight": "weights", "heads": "heads", "hidden": "dimensions"}


def gate_units(model: nn.Module) -> list[tuple[str, str, Gate]]:
    """(owner, what its gates count, gate) for each gate once: the units of the paper's architecture string and the plots.

    The paper's layers' gates come first, in module order (an input-column gate counts inputs, an output-channel
    gate channels), then sparsify's, in the order of :func:`~l0sparse.core.sites.find_gates`; the hidden-size gate of
    :func:`l0sparse.hf.gate_hidden` counts the residual stream's dimensions.
    """
    paper = {}
    for site in gate_sites(model):
        if site.gate.granularity is None and id(site.gate) not in paper:  # a paper layer's own gate (sparsify sets one)
            paper[id(site.gate)] = (site.name, "inputs" if site.dim == 1 else "channels", site.gate)
    others = [(gate.owner or "?", _COUNTED_BY_GRANULARITY.get(gate.granularity, "gates"), gate)
              for gate in find_gates(model) if id(gate) not in paper]
    return [*paper.values(), *others]


def architecture(model: nn.Module) -> str:
    """Gated units per layer before and after, in the paper's notation, e.g. ``784-300-100 -> 219-214-100``.

    Each number counts what one layer's gates control (inputs of a Linear,
    output channels of a conv, heads, or weights for per-weight gates); the
    after-count is the number of deterministic gates (Eq. 13) that are open.
    """
    units = gate_units(model)
    if not units:
        raise ValueError("model has no l0sparse gates: build it from L0 layers or call l0sparse.sparsify first")
    if any(gate.log_alpha.device.type == "meta" for _, _, gate in units):
        raise ValueError("architecture: the model is on the meta device, which holds no values, so which gates are open "
                         "cannot be read: load its weights onto a real device first")
    before = "-".join(str(gate.log_alpha.numel()) for _, _, gate in units)
    after = "-".join(str(int(gate.is_open().sum())) for _, _, gate in units)
    return f"{before} -> {after}"


@dataclass
class Summary:
    """Per-layer rows; ``str(summary)`` is a fixed-width table, ``to_markdown()`` a Markdown one."""

    rows: list[dict]

    _COLUMNS = ("layer", "gates kept/total", "width saved", "expected L0", "params", "params kept", "MACs", "MACs kept")

    def _cells(self) -> list[list[str]]:
        cells = []
        for row in self.rows:
            gates_text = f"{row['gates_kept']}/{row['gates_total']}" if row["gates_total"] else "-"
            expected = f"{row['expected_l0']:.1f}" if row["gates_total"] else "-"
            # what the pruned model holds: more than the open gates where round_to kept zero units
            width = "-" if row.get("width_saved") is None else str(row["width_saved"])
            if row.get("counted_in_layers"):  # a gate over several layers: its parameters and MACs are in their rows
                cells.append([row["layer"], gates_text, width, expected, "-", "-", "-", "-"])
                continue
            cells.append([row["layer"], gates_text, width, expected, f"{row['params']:,}", f"{row['params_kept']:,}",
                          f"{row['flops']:,}", f"{row['flops_kept']:,}"])
        total = {k: sum(r[k] for r in self.rows) for k in ("params", "params_kept", "flops", "flops_kept")}
        cells.append(["total", "", "", "", f"{total['params']:,}", f"{total['params_kept']:,} ({_percent(total['params_kept'], total['params'])})",
                      f"{total['flops']:,}", f"{total['flops_kept']:,} ({_percent(total['flops_kept'], total['flops'])})"])
        return cells

    def widths(self) -> list[dict]:
        """Per gated layer, in :func:`architecture`'s order: ``layer`` (the gates' owner), ``counts`` (what a gate
        counts: inputs, channels, heads...), ``total``, ``open`` (open gates) and ``saved`` (what the pruned model holds)."""
        gated = sorted((row for row in self.rows if row["gates_total"]), key=lambda row: row["unit_order"])
        return [{"layer": row["owner"], "counts": row["counts"], "total": row["gates_total"], "open": row["gates_kept"],
                 "saved": row["gates_kept"] if row.get("width_saved") is None else row["width_saved"]} for row in gated]

    def saved_architecture(self) -> str:
        """Gated units per layer before and as saved, in :func:`architecture`'s order, e.g. ``784-300-100 -> 224-216-104``
        (rounded up where ``round_to`` kept zero units; the open gates are :func:`architecture`'s)."""
        widths = self.widths()
        return f"{'-'.join(str(w['total']) for w in widths)} -> {'-'.join(str(w['saved']) for w in widths)}"

    def __str__(self) -> str:
        cells = [list(self._COLUMNS)] + self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(self._COLUMNS))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in cells]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._COLUMNS) + " |", "|" + "---|" * len(self._COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in self._cells()]
        return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def saved_width(what: str, module: nn.Module | None, hidden_plan: dict | None = None) -> int | None:
    """How many of what a layer's gates count (:func:`gate_units`) the pruned ``module`` holds; None where it cannot tell.

    With ``round_to`` this is more than the open gates: the zero units kept to round the width up.
    """
    if what == "dimensions":  # the hidden-size gate: no one module, the plan says
        return len(hidden_plan["kept"]) if hidden_plan else None
    if module is None:
        return None
    if what == "heads":
        from .ops import declared_head_count, module_rule

        rule = module_rule(module)
        return rule.head_count(module) if rule is not None and rule.head_count(module) is not None else declared_head_count(module)
    if what == "weights":
        return int(module.weight.ne(0).sum())
    inputs = what == "inputs"
    for attribute in (("in_features", "in_channels") if inputs else ("out_features", "out_channels")):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    return None


def summary(model: nn.Module, example_inputs, round_to: int = 1, pruned: tuple[nn.Module, dict] | None = None) -> Summary:
    """Per Linear/conv layer: gates kept/total, the width saved, expected L0, parameters and MACs per example before
    and after pruning with ``round_to`` (:func:`l0sparse.prune`'s).

    A gate whose owner is not one layer (the heads of an attention module, the hidden-size gate's dimensions)
    gets a row of its own, ``"<owner> (heads)"`` / ``"<owner> (dimensions)"``, placed before the layers it
    gates, with its gates and no parameters or MACs of its own (``counted_in_layers``: the layers' rows hold them).
    The MACs of attention's matrix products, which no layer holds, are the row :data:`ATTENTION_PRODUCTS`, so that
    the total is :func:`l0sparse.count_flops`'s. ``pruned``: ``prune(model, example_inputs, return_plan=True,
    round_to=round_to)`` if already computed (it is not computed again).
    """
    check_module(model, "summary")
    example_inputs = example_tuple(example_inputs, "summary")
    dense = plain_copy(model)
    pruned_model, plan = pruned if pruned is not None else prune(model, example_inputs, return_plan=True, round_to=round_to)
    flops_before = count_flops(dense, example_inputs, per_module=True)
    flops_after = count_flops(pruned_model, example_inputs, per_module=True)
    owners = _GateOwners(model, dict(pruned_model.named_modules()), plan.get("hidden"))
    rows = [owners.layer_row(name, module, flops_before[name], flops_after.get(name, 0))
            for name, module in dense.named_modules() if name in flops_before]
    layers = {row["layer"] for row in rows}
    for owner in owners.gates:
        if owner not in layers:  # an owner that is no layer: a row of its own, among its layers
            _insert_owner_row(rows, owners.owner_row(owner))
    # count_flops keeps the products of attention outside modules (a Hugging Face or a pruned model's) under this name
    before, after = flops_before.get("scaled_dot_product_attention", 0), flops_after.get("scaled_dot_product_attention", 0)
    if before or after:
        rows.append({"layer": ATTENTION_PRODUCTS, "owner": None, "counts": None, "unit_order": None, "width_saved": None, "gates_total": 0,
                     "gates_kept": 0, "expected_l0": 0.0, "params": 0, "params_kept": 0, "flops": before, "flops_kept": after})
    return Summary(rows)


class _GateOwners:
    """The gates of a model by owner (:func:`gate_units`), what they count and in which order, and the rows they give."""

    def __init__(self, model: nn.Module, pruned_modules: dict[str, nn.Module], hidden_plan: dict | None) -> None:
        self.pruned_modules, self.hidden_plan = pruned_modules, hidden_plan
        self.gates: dict[str, list[Gate]] = {}
        self.counted_as: dict[str, str] = {}
        self.unit_order: dict[str, int] = {}
        for owner, what, gate in gate_units(model):
            self.gates.setdefault(owner, []).append(gate)
            self.counted_as.setdefault(owner, what)
            self.unit_order.setdefault(owner, len(self.unit_order))

    def _gate_cells(self, owner: str) -> dict:
        """The row's cells for the owner's gates: what they count, the width the pruned model saved, kept/total, expected L0."""
        owned = self.gates.get(owner, [])
        width = None
        if owner in self.counted_as:
            width = saved_width(self.counted_as[owner], self.pruned_modules.get(owner), self.hidden_plan)
        return {"counts": self.counted_as.get(owner), "unit_order": self.unit_order.get(owner), "width_saved": width,
                "gates_total": sum(g.log_alpha.numel() for g in owned),
                "gates_kept": sum(int(g.is_open().sum()) for g in owned),
                "expected_l0": float(sum(float(g.expected_l0().detach()) for g in owned))}

    def layer_row(self, name: str, module: nn.Module, flops: int, flops_kept: int) -> dict:
        """The row of a Linear or conv layer: its gates, and its parameters and MACs before and after pruning."""
        kept_module = self.pruned_modules.get(name)
        return {"layer": name, "owner": name, **self._gate_cells(name),
                "params": sum(p.numel() for p in module.parameters(recurse=False)),
                "params_kept": 0 if kept_module is None else sum(p.numel() for p in kept_module.parameters(recurse=False)),
                "flops": flops, "flops_kept": flops_kept}

    def owner_row(self, owner: str) -> dict:
        """The row of gates whose owner is no layer (heads, dimensions): no parameters or MACs of its own."""
        return {"layer": f"{owner} ({self.counted_as[owner]})", "owner": owner, **self._gate_cells(owner),
                "params": 0, "params_kept": 0, "flops": 0, "flops_kept": 0, "counted_in_layers": True}


def _insert_owner_row(rows: list[dict], row: dict) -> None:
    """Put an owner's row before the first layer inside the owner (an attention module), else inside the module holding
    it (the hidden gate "encoder.hidden": the encoder's layers), else at the end."""
    owner = row["owner"]
    scopes = [owner, owner.rpartition(".")[0]]
    position = next((i for scope in scopes for i, r in enumerate(rows)
                     if not r.get("counted_in_layers") and (not scope or r["layer"].startswith(f"{scope}."))), len(rows))
    rows.insert(position, row)
