"""Summaries of a gated model: the paper's architecture string and a per-layer table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .costs import count_flops, gates
from .gates import Gate
from .layers import L0Conv2d, L0Linear
from .prune import plain_copy, prune

__all__ = ["architecture", "summary", "Summary"]


def _gate_units(model: nn.Module) -> list[tuple[str, str, Gate]]:
    """(owner, what its gates count, gate) in module order: the units of the paper's architecture string."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, L0Linear):
            found.append((name, "inputs", module.gate))
        elif isinstance(module, L0Conv2d):
            found.append((name, "channels", module.gate))
    paper_gates = {id(g) for _, _, g in found}
    for gate in gates(model):
        if id(gate) not in paper_gates:
            what = {"in": "inputs", "out": "outputs", "weight": "weights", "heads": "heads"}.get(gate.granularity, "gates")
            found.append((gate.owner or "?", what, gate))
    return found


def architecture(model: nn.Module) -> str:
    """Gated units per layer before and after, in the paper's notation, e.g. ``784-300-100 -> 219-214-100``.

    Each number counts what one layer's gates control (inputs of a Linear,
    output channels of a conv, heads, or weights for per-weight gates); the
    after-count is the number of deterministic gates (Eq. 13) that are open.
    """
    units = _gate_units(model)
    if not units:
        raise ValueError("model has no l0sparse gates: build it from L0 layers or call l0sparse.sparsify first")
    before = "-".join(str(gate.log_alpha.numel()) for _, _, gate in units)
    after = "-".join(str(int(gate.is_active().sum())) for _, _, gate in units)
    return f"{before} -> {after}"


@dataclass
class Summary:
    """Per-layer rows; ``str(summary)`` is a fixed-width table, ``to_markdown()`` a Markdown one."""

    rows: list[dict]

    _COLUMNS = ("layer", "gates kept/total", "expected L0", "params", "params kept", "MACs", "MACs kept")

    def _cells(self) -> list[list[str]]:
        cells = []
        for row in self.rows:
            gates_text = f"{row['gates_kept']}/{row['gates_total']}" if row["gates_total"] else "-"
            expected = f"{row['expected_l0']:.1f}" if row["gates_total"] else "-"
            cells.append([row["layer"], gates_text, expected, f"{row['params']:,}", f"{row['params_kept']:,}",
                          f"{row['flops']:,}", f"{row['flops_kept']:,}"])
        total = {k: sum(r[k] for r in self.rows) for k in ("params", "params_kept", "flops", "flops_kept")}
        cells.append(["total", "", "", f"{total['params']:,}", f"{total['params_kept']:,} ({_percent(total['params_kept'], total['params'])})",
                      f"{total['flops']:,}", f"{total['flops_kept']:,} ({_percent(total['flops_kept'], total['flops'])})"])
        return cells

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


def summary(model: nn.Module, example_inputs) -> Summary:
    """Per Linear/conv layer: gates kept/total, expected L0, parameters and MACs per example before and after pruning."""
    example_inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    dense = plain_copy(model)
    pruned = prune(model, example_inputs)
    flops_before = count_flops(dense, example_inputs, per_module=True)
    flops_after = count_flops(pruned, example_inputs, per_module=True)
    pruned_modules = dict(pruned.named_modules())
    gates_by_owner: dict[str, list[Gate]] = {}
    for owner, _, gate in _gate_units(model):
        gates_by_owner.setdefault(owner, []).append(gate)
    rows = []
    for name, module in dense.named_modules():
        if name not in flops_before:
            continue
        owned = gates_by_owner.get(name, [])
        kept_module = pruned_modules.get(name)
        rows.append({
            "layer": name,
            "gates_total": sum(g.log_alpha.numel() for g in owned),
            "gates_kept": sum(int(g.is_active().sum()) for g in owned),
            "expected_l0": float(sum(float(g.expected_l0().detach()) for g in owned)),
            "params": sum(p.numel() for p in module.parameters(recurse=False)),
            "params_kept": 0 if kept_module is None else sum(p.numel() for p in kept_module.parameters(recurse=False)),
            "flops": flops_before[name],
            "flops_kept": flops_after.get(name, 0),
        })
    return Summary(rows)


# ---------------------------------------------------------------------------
# `l0sparse report`: plots and a table over run directories
# ---------------------------------------------------------------------------


def _read_run(run_dir) -> dict:
    from pathlib import Path

    from .config import read_config_json
    from .train import CONFIG_FILE, METRICS_FILE, read_metrics

    run_dir = Path(run_dir)
    for name in (METRICS_FILE, CONFIG_FILE):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a run directory: it has no {name}")
    metrics = read_metrics(run_dir / METRICS_FILE)
    if not metrics:
        raise ValueError(f"{run_dir} has no completed epoch in {METRICS_FILE}")
    config = read_config_json(run_dir / CONFIG_FILE).to_dict()  # every key, checked: an error names the file
    return {"dir": run_dir, "name": run_dir.name, "metrics": metrics, "config": config}


def _kept(run: dict, key: str) -> float | None:
    """The last epoch's ``params_kept`` or ``flops_kept``: all of it for a dense run, None when the run did not measure it."""
    recorded = run["metrics"][-1].get(key)
    if recorded is not None:
        return recorded
    return 1.0 if run["config"].get("regularizer") == "none" else None


def _percent_or_unknown(fraction: float | None) -> str:
    return "unknown" if fraction is None else f"{100 * fraction:.1f}%"


def report_runs(run_dirs, out_dir) -> dict:
    """Write PNG plots and ``report.md`` for one or more run directories into ``out_dir``; return the paths."""
    from pathlib import Path

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train import load_run

    runs = [_read_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = plt.cm.tab10.colors
    color_of = {run["name"]: palette[index % len(palette)] for index, run in enumerate(runs)}  # one colour per run, every plot
    written = {}

    # 1. expected L0 and % FLOPs kept over training
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for run in runs:
        color = color_of[run["name"]]
        epochs = [m["epoch"] for m in run["metrics"]]
        if "expected_l0" in run["metrics"][0]:
            left.plot(epochs, [m["expected_l0"] for m in run["metrics"]], color=color, lw=2, label=run["name"])
            right.plot(epochs, [100 * m["flops_kept"] for m in run["metrics"]], color=color, lw=2, label=f"{run['name']} (pruned)")
            right.plot(epochs, [100 * m["expected_flops_kept"] for m in run["metrics"]], color=color, lw=1.2, ls="--",
                       label=f"{run['name']} (expected)")
    left.set(xlabel="epoch", ylabel="expected L0 (open gates)", title="Expected number of open gates")
    right.set(xlabel="epoch", ylabel="% of dense FLOPs", title="FLOPs kept", ylim=(0, 105))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, frameon=False)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    written["training"] = out_dir / "training.png"
    fig.savefig(written["training"], dpi=120)
    plt.close(fig)

    # 2. kept units per layer and 3. the histogram of P(z != 0), from each run's final checkpoint
    gated_runs = [run for run in runs if run["config"].get("regularizer", "l0") == "l0"]
    if gated_runs:
        fig, axes = plt.subplots(2, len(gated_runs), figsize=(5.5 * len(gated_runs), 7.5), squeeze=False, constrained_layout=True)
        for column, run in enumerate(gated_runs):
            _, model, _ = load_run(run["dir"])
            units = _gate_units(model)
            names = [f"{owner}\n({what})" for owner, what, _ in units]
            totals = [g.log_alpha.numel() for _, _, g in units]
            kept = [int(g.is_active().sum()) for _, _, g in units]
            axis = axes[0][column]
            axis.bar(names, totals, color="#d0d0d0", label="total")
            axis.bar(names, kept, color=color_of[run["name"]], label="kept")
            for position, (k, t) in enumerate(zip(kept, totals)):
                axis.text(position, t, f"{k}/{t}", ha="center", va="bottom", fontsize=8)
            axis.set(title=f"{run['name']}: units kept per layer", ylabel="units")
            axis.tick_params(axis="x", labelsize=8)
            axis.legend(fontsize=8, frameon=False)
            probabilities = torch.cat([g.prob_nonzero().detach().flatten() for _, _, g in units]).numpy()
            axis = axes[1][column]
            axis.hist(probabilities, bins=40, range=(0, 1), color=color_of[run["name"]])
            axis.set(title=f"{run['name']}: P(z ≠ 0) at the end", xlabel="P(z ≠ 0)", ylabel="gates")
        written["gates"] = out_dir / "gates.png"
        fig.savefig(written["gates"], dpi=120)
        plt.close(fig)

    # 4. accuracy against % FLOPs kept across runs (a run that did not measure its FLOPs has no place on it)
    fig, axis = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for run in runs:
        color = color_of[run["name"]]
        last = run["metrics"][-1]
        if _kept(run, "flops_kept") is None:
            continue
        flops = 100 * _kept(run, "flops_kept")
        axis.scatter(flops, 100 * last["test_accuracy"], s=60, color=color, zorder=3)
        axis.annotate(run["name"], (flops, 100 * last["test_accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    axis.set(xlabel="% of dense FLOPs kept", ylabel="test accuracy (%)", title="Accuracy against FLOPs kept", xlim=(0, 105))
    axis.grid(alpha=0.3)
    written["pareto"] = out_dir / "pareto.png"
    fig.savefig(written["pareto"], dpi=120)
    plt.close(fig)

    lines = ["| run | data | model | regularizer | λ / target | epochs | test accuracy | % params kept | % FLOPs kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        config, last = run["config"], run["metrics"][-1]
        strength = "-" if config.get("regularizer") == "none" else (
            f"target {config['target']:g} {config['metric']}" if config.get("target") is not None else f"λ = {config['lam']:g}/N")
        lines.append(f"| {run['name']} | {config['data']} | {config['model']} | {config['regularizer']} | {strength} | {last['epoch']} | "
                     f"{100 * last['test_accuracy']:.2f}% | {_percent_or_unknown(_kept(run, 'params_kept'))} | "
                     f"{_percent_or_unknown(_kept(run, 'flops_kept'))} |")
    lines += ["", *[f"![{key}]({path.name})" for key, path in written.items()]]
    written["markdown"] = out_dir / "report.md"
    written["markdown"].write_text("\n".join(lines) + "\n")
    return written
