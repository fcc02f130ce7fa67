"""`l0sparse report`: plots and a Markdown table over run folders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .files import read_json
from ..core.report import gate_units
from .runs import RunFolder, reconcile_history

if TYPE_CHECKING:
    import numpy as np

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


#: runs with at most this many epochs get a marker on every point of training.png (a one-epoch run is one point)
FEW_EPOCHS = 20


def _prune_result(run: RunFolder) -> dict | None:
    """What ``l0sparse prune`` measured on this run (pruned.json's ``result``), or None before it ran (or before #29)."""
    if not run.pruned_spec_path.exists():
        return None
    spec = read_json(run.pruned_spec_path)
    return spec.get("result") if isinstance(spec, dict) else None


def _saved_widths(run: RunFolder) -> list[dict] | None:
    result = _prune_result(run)
    return result.get("widths") if result else None


def _rounding(run: RunFolder) -> int | None:
    """The round_to the run was pruned with; None when pruned.json holds no result (not pruned, or pruned before #29)."""
    result = _prune_result(run)
    return None if not result else result.get("round_to", {}).get("value", 1)


def _milliseconds(seconds: float) -> str:
    return f"{1000 * seconds:.3g} ms"


def short_labels(names: list[str]) -> tuple[list[str], str]:
    """Layer names without the dotted parts all of them share at the start and at the end, and the pattern they share:
    ``encoder.encoder.layer.0.attention``, ``...layer.1.attention`` -> ``0``, ``1`` and ``encoder.encoder.layer.*.attention``."""
    if len(names) == 1:
        return [names[0].rsplit(".", 1)[-1]], names[0]
    parts = [name.split(".") for name in names]
    shortest = min(len(p) for p in parts)
    start = 0
    while start < shortest - 1 and len({p[start] for p in parts}) == 1:
        start += 1
    end = 0
    while end < shortest - start - 1 and len({p[len(p) - 1 - end] for p in parts}) == 1:
        end += 1
    labels = [".".join(p[start:len(p) - end]) for p in parts]
    pattern = ".".join([*parts[0][:start], "*", *parts[0][len(parts[0]) - end:]]) if start or end else ""
    return labels, pattern


def _kept_panel(axis, run_name: str, kind: str, widths: list[dict], color, round_to: int | None) -> None:
    """Bars of the % kept per layer of one kind of gate (as saved by prune when it ran, else the open gates), each
    labelled kept/total; with rounding, a black tick at the open gates' share."""
    import matplotlib.ticker

    labels, pattern = short_labels([w["layer"] for w in widths])
    positions = range(len(widths))
    saved = [w["open"] if w["saved"] is None else w["saved"] for w in widths]
    axis.bar(positions, [100] * len(widths), color="#e4e4e4", width=0.8)
    axis.bar(positions, [100 * k / w["total"] for k, w in zip(saved, widths)], color=color, width=0.8)
    if any(k != w["open"] for k, w in zip(saved, widths)):
        axis.scatter(positions, [100 * w["open"] / w["total"] for w in widths], marker="_", s=250, color="black", zorder=3,
                     label="open gates")
        axis.legend(fontsize=7, frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.1)
    size = 8 if len(widths) <= 8 else 6
    for position, (k, w) in enumerate(zip(saved, widths)):
        axis.text(position, 101, f"{k}/{w['total']}", ha="center", va="bottom", fontsize=size, rotation=90 if len(widths) > 12 else 0)
    long_labels = len(widths) > 12 or max(len(label) for label in labels) > 6
    axis.set_xticks(list(positions), labels, rotation=45 if long_labels else 0, ha="right" if long_labels else "center", fontsize=8)
    if round_to is None:  # no prune result to read: what the gates say
        how = "open gates"
    else:
        how = "as saved" if round_to <= 1 else f"as saved, round_to {round_to}"
    pad = max(0.0, (3 - len(widths)) / 2)  # one or two bars keep the width of three, not the whole panel
    axis.set_xlim(-0.5 - pad, len(widths) - 0.5 + pad)
    axis.set(ylim=(0, 118), ylabel="% kept", title=f"{run_name}: {kind} kept per layer\n({how})",
             xlabel=pattern if len(pattern) <= 48 else f"…{pattern[-47:]}")
    axis.title.set_fontsize(10)
    axis.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0, 25, 50, 75, 100]))


def report_runs(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                say: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write PNG plots and ``report.md`` for one or more run directories into ``out_dir``; return the paths.

    ``say``: called with a line before each slow step (a run's data and model, loaded for gates.png).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    runs = [_read_run(d, name) for d, name in zip(run_dirs, _names(run_dirs))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = plt.cm.tab10.colors
    color_of = {run["name"]: palette[index % len(palette)] for index, run in enumerate(runs)}  # one colour per run, every plot
    written = {"training": _plot_training(runs, color_of, out_dir / "training.png")}
    # the importance baseline's gates are set once and frozen: what it kept reads beside what L0 kept
    gated_runs = [run for run in runs if run["config"].get("regularizer", "l0") in ("l0", "importance")]
    if gated_runs:
        written["gates"] = _plot_gates(gated_runs, color_of, out_dir / "gates.png", say)
    written["pareto"] = _plot_pareto(runs, color_of, out_dir / "pareto.png")
    markdown = _markdown(runs, images=dict(written))
    written["markdown"] = out_dir / "report.md"
    written["markdown"].write_text(markdown)
    return written


def _plot_training(runs: list[dict], color_of: dict, path: Path) -> Path:
    """training.png: expected L0 and % FLOPs kept over training; a marker on every epoch of a short run (one epoch: one
    point, which a line alone does not draw)."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for run in runs:
        _plot_sizes_over_training(left, right, run, color_of[run["name"]])
    left.set(xlabel="epoch", ylabel="expected L0 (open gates)", title="Expected number of open gates")
    right.set(xlabel="epoch", ylabel="% of dense FLOPs", title="FLOPs kept", ylim=(0, 105))
    last_epoch = max(run["metrics"][-1]["epoch"] for run in runs)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, frameon=False)
        if last_epoch <= FEW_EPOCHS:  # whole epochs only, and room around one point (else the ticks read 0.96, 0.98...)
            axis.set_xticks(range(1, last_epoch + 1))
            axis.set_xlim(0.5, last_epoch + 0.5)
        else:
            axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_sizes_over_training(left, right, run: dict, color) -> None:
    """One run's lines of training.png: its expected L0 on the left, its % FLOPs kept (and expected) on the right."""
    records = run["metrics"]
    epochs = [m["epoch"] for m in records]
    marker = {"marker": "o", "markersize": 5} if len(epochs) <= FEW_EPOCHS else {}
    if "expected_l0" in records[0]:
        left.plot(epochs, [m["expected_l0"] for m in records], color=color, lw=2, label=run["name"], **marker)
    if records[0].get("flops_kept") is not None:
        right.plot(epochs, [100 * m["flops_kept"] for m in records], color=color, lw=2, label=f"{run['name']} (pruned)", **marker)
    elif run["config"].get("regularizer") == "none":  # a dense run (a teacher) keeps everything: the reference line
        right.plot(epochs, [100.0] * len(epochs), color=color, lw=2, label=f"{run['name']} (dense)", **marker)
    if "expected_flops_kept" in records[0]:
        right.plot(epochs, [100 * m["expected_flops_kept"] for m in records], color=color, lw=1.2, ls="--",
                   label=f"{run['name']} (expected)", **{**marker, "marker": "x"} if marker else {})


def _plot_gates(gated_runs: list[dict], color_of: dict, path: Path, say: Callable[[str], None] | None) -> Path:
    """gates.png, a row per run from its final checkpoint: the fraction kept per layer, one panel per kind of gate
    (heads, inputs, channels...: counts of different sizes), then the histogram of P(z != 0)."""
    import matplotlib.pyplot as plt

    datasets: dict = {}  # runs on the same data share one load (MiniLM's: tokenizing WordNet)
    panels = [_gate_widths(run, datasets, say) for run in gated_runs]
    kinds_per_run = [list(dict.fromkeys(w["counts"] for w in widths)) for _, widths, _ in panels]
    columns = max(len(kinds) for kinds in kinds_per_run) + 1
    fig, axes = plt.subplots(len(panels), columns, figsize=(4.6 * columns, 3.9 * len(panels)), squeeze=False,
                             constrained_layout=True)
    for row, ((run, widths, probabilities), kinds) in enumerate(zip(panels, kinds_per_run)):
        color = color_of[run["name"]]
        for column, kind in enumerate(kinds):
            _kept_panel(axes[row][column], run["name"], kind, [w for w in widths if w["counts"] == kind], color,
                        _rounding(run["run"]))
        axis = axes[row][len(kinds)]
        axis.hist(probabilities, bins=40, range=(0, 1), color=color)
        axis.set(title=f"{run['name']}: P(z ≠ 0) at the end", xlabel="P(z ≠ 0)", ylabel="gates")
        axis.title.set_fontsize(10)
        for column in range(len(kinds) + 1, columns):
            axes[row][column].axis("off")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _gate_widths(run: dict, datasets: dict, say: Callable[[str], None] | None) -> tuple[dict, list[dict], np.ndarray]:
    """(run, its widths per layer as prune saved them, else its open gates, every gate's P(z != 0)), from the run's model;
    ``datasets``: the data loaded so far, by what it is (a run loads it there if it is not)."""
    config = run["config"]
    key = (config["data"], config.get("train_examples"), config.get("test_examples"))
    if say is not None:
        say(f"{run['name']}: its gates (the model and its data)")
    _, model, datasets[key] = run["run"].load(data=datasets.get(key), say=say)
    units = gate_units(model)
    widths = _saved_widths(run["run"]) or [{"layer": owner, "counts": what, "total": gate.log_alpha.numel(),
                                             "open": int(gate.is_open().sum()), "saved": None} for owner, what, gate in units]
    probabilities = torch.cat([g.prob_nonzero().detach().flatten() for _, _, g in units]).numpy()
    return run, widths, probabilities


def _plot_pareto(runs: list[dict], color_of: dict, path: Path) -> Path:
    """pareto.png: accuracy against % FLOPs kept across runs (a run that did not measure its FLOPs has no place on it)."""
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for run in runs:
        if _kept(run, "flops_kept") is None:
            continue
        flops, accuracy = 100 * _kept(run, "flops_kept"), 100 * run["metrics"][-1]["test_accuracy"]
        axis.scatter(flops, accuracy, s=60, color=color_of[run["name"]], zorder=3)
        right_side = flops > 70  # the name to the left of a point near the right edge, where it would be cut off
        axis.annotate(run["name"], (flops, accuracy), textcoords="offset points", xytext=(-6 if right_side else 6, 4),
                      ha="right" if right_side else "left", fontsize=8)
    axis.set(xlabel="% of dense FLOPs kept", ylabel="test accuracy (%)", title="Accuracy against FLOPs kept", xlim=(0, 105))
    axis.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _markdown(runs: list[dict], images: dict[str, Path]) -> str:
    """report.md: a row per run (what training recorded, and what prune measured), then the plots."""
    lines = ["| run | data | model | regularizer | λ / target | epochs | test accuracy | % params kept | % FLOPs kept "
             "| accuracy after prune | % FLOPs after prune | latency pruned / unpruned | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_table_row(run) for run in runs]
    lines += ["", "% FLOPs kept: what training recorded, the whole model as the run's target counts it. After prune: `l0sparse prune`'s figures "
              "(pruned.json): the pruned model's accuracy, its FLOPs with attention's products (a text classifier's encoder "
              "only, without the classification layer: docs/hf.md's count), its latency beside the unpruned model's (a "
              "batch of `batch_size` test examples, the median of the turns) and the speed-up; a run not pruned has none."]
    lines += ["", *[f"![{key}]({path.name})" for key, path in images.items()]]
    return "\n".join(lines) + "\n"


def _table_row(run: dict) -> str:
    """One run's row of report.md."""
    config, last = run["config"], run["metrics"][-1]
    strength = "-" if config.get("regularizer") == "none" else (
        f"target {config['target']:g} {config['metric']}" if config.get("target") is not None else f"λ = {config['lam']:g}/N")
    pruned = _prune_result(run["run"]) or {}
    timing = pruned.get("latency")
    after = "not pruned" if not pruned else f"{100 * pruned['test_accuracy']:.2f}%"
    flops_after = "-" if not pruned else _percent_or_unknown(pruned["flops"]["kept"])
    latency = "-" if not timing else f"{_milliseconds(timing['pruned_s'])} / {_milliseconds(timing['unpruned_s'])}"
    speedup = "-" if not timing else f"{timing['speedup']:.2f}×"
    return (f"| {run['name']} | {config['data']} | {config['model']} | {config['regularizer']} | {strength} | {last['epoch']} | "
            f"{100 * last['test_accuracy']:.2f}% | {_percent_or_unknown(_kept(run, 'params_kept'))} | "
            f"{_percent_or_unknown(_kept(run, 'flops_kept'))} | {after} | {flops_after} | {latency} | {speedup} |")
