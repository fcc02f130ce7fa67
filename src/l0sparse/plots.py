"""`l0sparse report`: plots and a Markdown table over run folders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from .report import gate_units
from .runs import RunFolder, reconcile_history

__all__ = ["report_runs"]


def _read_run(run_dir, name: str) -> dict:
    run = RunFolder(run_dir)
    for path in (run.metrics_path, run.config_path):
        if not path.exists():
            raise FileNotFoundError(f"{run.path} is not a run directory: it has no {path.name}")
    metrics = run.read_metrics()
    if run.checkpoint_path.exists():  # the records of the epochs the checkpoint holds, no more, no fewer where it can tell
        metrics, note = reconcile_history(metrics, run.read_checkpoint(), run.metrics_path)
        if note:
            warnings.warn(f"report: {note}", stacklevel=3)
    if not metrics:
        raise ValueError(f"{run.path} has no completed epoch in {run.metrics_path.name}")
    needed = _RECORD_KEYS + (_GATED_KEYS if "expected_l0" in metrics[0] else ())
    missing = [(record["epoch"], key) for record in metrics for key in needed if key not in record]
    if missing:
        raise ValueError(f"{run.metrics_path}: the record of epoch {missing[0][0]} has no {missing[0][1]!r} (report reads "
                         f"{', '.join(needed)}); was the file edited? restore it, or train again")
    config = run.read_config().to_dict()  # every key, checked: an error names the file
    return {"dir": run.path, "name": name, "metrics": metrics, "config": config, "run": run}


#: what every epoch's record holds, whatever the regularizer (report reads them)
_RECORD_KEYS = ("epoch", "test_accuracy")
_GATED_KEYS = ("expected_l0", "flops_kept", "expected_flops_kept")  # ... and those of a gated run's (the training plot)


def _names(run_dirs: list[Path]) -> list[str]:
    """A distinct label per run: its folder's name, with as many parent folders as it takes to tell runs apart."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]  # the same folder twice: its path each time


def _kept(run: dict, key: str) -> float | None:
    """The last epoch's ``params_kept`` or ``flops_kept``: all of it for a dense run, None when the run did not measure it."""
    recorded = run["metrics"][-1].get(key)
    if recorded is not None:
        return recorded
    return 1.0 if run["config"].get("regularizer") == "none" else None


def _percent_or_unknown(fraction: float | None) -> str:
    return "unknown" if fraction is None else f"{100 * fraction:.1f}%"


def report_runs(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write PNG plots and ``report.md`` for one or more run directories into ``out_dir``; return the paths."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    runs = [_read_run(d, name) for d, name in zip(run_dirs, _names(run_dirs))]
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
            _, model, _ = run["run"].load()
            units = gate_units(model)
            names = [f"{owner}\n({what})" for owner, what, _ in units]
            totals = [g.log_alpha.numel() for _, _, g in units]
            kept = [int(g.is_open().sum()) for _, _, g in units]
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
