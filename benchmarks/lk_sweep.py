"""L0 against L1, group L1 and L2: a sweep of strengths, one table and two figures (issue: L_k baselines).

For each regularizer and strength, train the MLP with the same harness as
`l0sparse train`, then measure the test error and the % of weights that are
non-zero in the final model (L0: after folding the test-time gates; L1 and
group L1: after the thresholding step, whose tolerance defaults to the
learning rate; L2: as trained). Writes
`table.md`, `error_vs_kept.png` and `weight_histograms.png` to --out.

Run (quick, on scikit-learn's digits, about a minute):
    .venv/bin/python benchmarks/lk_sweep.py --data digits --out docs/img/lk-digits
Run (the MLP 784-300-100 on Fashion-MNIST; about an hour on one core at 40 epochs; rerun with more
--epochs and it continues the runs it finds under --out/runs):
    .venv/bin/python benchmarks/lk_sweep.py --data fashion-mnist --epochs 50 --out benchmarks/results/lk-fashion-mnist
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from l0sparse.training.config import load_config  # noqa: E402
from l0sparse.core.norms import sparsity  # noqa: E402
from l0sparse.core.prune import plain_copy  # noqa: E402
from l0sparse.training.train import run_training  # noqa: E402
from l0sparse.training.runs import CHECKPOINT, load_run  # noqa: E402

STRENGTHS = {"l0": [0.03, 0.1, 0.3, 1.0, 3.0], "l0 per weight": [0.03, 0.1, 0.3, 1.0, 3.0], "l1": [0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
             "group_l1": [0.3, 1.0, 3.0, 10.0, 30.0, 100.0], "l2": [1.0, 10.0, 100.0, 1000.0]}
SETTINGS = {"digits": {"hidden": [100, 50], "epochs": 60, "lr": 0.01, "batch_size": 64},
            "fashion-mnist": {"hidden": [300, 100], "epochs": 50, "lr": 0.001, "batch_size": 100}}


def _raw_first_layer(model) -> torch.Tensor:
    """θ of the first layer where its test-time gate is open, 0 where closed: L0 does not shrink the θ it keeps."""
    from torch.nn.utils import parametrize

    from l0sparse.core.layers import L0Linear

    layer = next(m for m in model.modules() if isinstance(m, (torch.nn.Linear, L0Linear)))
    if isinstance(layer, L0Linear):
        return (layer.weight * layer.gate.is_open()).detach()
    weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
    mask = torch.ones_like(weight, dtype=torch.bool)
    for gate_mask in layer.parametrizations.weight:
        mask &= gate_mask.gate.is_open() if gate_mask.dim is None else (gate_mask.mask(weight) > 0)
    return (weight * mask).detach()


def train_one(out: Path, data: str, regularizer: str, lam: float, epochs: int) -> dict:
    settings = {**SETTINGS[data], "epochs": epochs}
    overrides = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    gates = "weights" if regularizer == "l0 per weight" else "units"
    regularizer_key = "l0" if regularizer.startswith("l0") else regularizer
    overrides += [f"data={json.dumps(data)}", f"regularizer={json.dumps(regularizer_key)}", f"lam={lam}", "gate_lr=0.01",
                  f"gates={json.dumps(gates)}"]
    config = load_config(None, overrides)
    run_dir = out / "runs" / f"{regularizer.replace(' ', '-')}-{lam:g}"
    # a run dir left by an earlier (shorter or interrupted) sweep is continued to `epochs`, not retrained
    resume = (run_dir / CHECKPOINT).exists()
    history = run_training(config, run_dir, resume=resume, force=not resume, progress=False)
    _, model, _ = load_run(run_dir)
    plain = plain_copy(model) if regularizer.startswith("l0") else model
    kept = sparsity(plain)
    first = _raw_first_layer(model) if regularizer.startswith("l0") else [m for m in plain.modules() if isinstance(m, torch.nn.Linear)][0].weight.detach()
    return {"regularizer": regularizer, "lam": lam, "test_error": 1 - history[-1]["test_accuracy"],
            "weights_kept": kept["weights_kept"], "units_kept": kept["units_kept"], "first_layer": first}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", choices=sorted(SETTINGS), default="digits")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    epochs = args.epochs or SETTINGS[args.data]["epochs"]
    args.out.mkdir(parents=True, exist_ok=True)
    dense = train_one(args.out, args.data, "none", 0.0, epochs)
    rows = [train_one(args.out, args.data, r, lam, epochs) for r, strengths in STRENGTHS.items() for lam in strengths]

    colors = {"l0": "#d62728", "l0 per weight": "#ff7f0e", "l1": "#1f77b4", "group_l1": "#2ca02c", "l2": "#9467bd"}
    labels = {"l0": "L0 (unit gates)", "l0 per weight": "L0 (per-weight gates)", "l1": "L1", "group_l1": "group L1", "l2": "L2"}
    fig, axis = plt.subplots(figsize=(7, 4.6), constrained_layout=True)
    for regularizer in STRENGTHS:
        # runs that zeroed every weight (0% kept) cannot sit on a log axis: the table lists them
        points = sorted((100 * r["weights_kept"], 100 * r["test_error"]) for r in rows
                        if r["regularizer"] == regularizer and r["weights_kept"] > 0)
        axis.plot(*zip(*points), "o-", color=colors[regularizer], label=labels[regularizer], lw=2)
    axis.axhline(100 * dense["test_error"], color="black", ls="--", lw=1, label="dense")
    ceiling = 100 * dense["test_error"] + 25
    axis.set(xscale="log", xlabel="% of weights non-zero (log scale)", ylabel="test error (%)", ylim=(0, ceiling),
             title=f"MLP on {args.data}: error against weights kept\n(runs above {ceiling:.0f}% error are off the chart)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(frameon=False)
    fig.savefig(args.out / "error_vs_kept.png", dpi=130)
    plt.close(fig)

    # per regularizer, the strongest λ whose error stays within 2 points of dense: models that still work
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), constrained_layout=True, sharey=False)
    chosen_runs = {}
    for regularizer in ("l0", "l0 per weight", "l1", "l2"):
        working = [r for r in rows if r["regularizer"] == regularizer and r["test_error"] <= dense["test_error"] + 0.02]
        chosen_runs[regularizer] = max(working, key=lambda r: r["lam"]) if working else min(
            (r for r in rows if r["regularizer"] == regularizer), key=lambda r: r["lam"])
    largest = max(float(r["first_layer"].abs().max()) for r in [*chosen_runs.values(), dense])
    for axis, (regularizer, chosen) in zip(axes, chosen_runs.items()):
        values = chosen["first_layer"].abs().flatten().numpy()
        zeros = (values == 0).mean()
        axis.hist(dense["first_layer"].abs().flatten().numpy(), bins=60, range=(0, largest), color="#bbbbbb", label="dense")
        axis.hist(values[values > 0], bins=60, range=(0, largest), color=colors[regularizer], alpha=0.85, label=labels[regularizer])
        axis.legend(frameon=False, fontsize=8)
        axis.set(title=f"{labels[regularizer]}, λ = {chosen['lam']:g}/N: {100 * zeros:.0f}% exactly 0",
                 xlabel="|θ| of the first layer's non-zero weights", ylabel="weights", yscale="log")
    fig.savefig(args.out / "weight_histograms.png", dpi=130)
    plt.close(fig)

    lines = [f"Dense test error: {100 * dense['test_error']:.2f}%", "",
             "| regularizer | λ (per weight, /N) | test error | % weights kept | % units kept |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regularizer']} | {r['lam']:g} | {100 * r['test_error']:.2f}% | {100 * r['weights_kept']:.2f}% | {100 * r['units_kept']:.1f}% |")
    lines += ["", "Smallest % of weights kept with the error within 0.5 points of dense:", "",
              "| regularizer | % weights kept | test error |", "|---|---|---|"]
    for regularizer in STRENGTHS:
        good = [r for r in rows if r["regularizer"] == regularizer and r["test_error"] <= dense["test_error"] + 0.005]
        best = min(good, key=lambda r: r["weights_kept"]) if good else None
        if best is None:
            lines.append(f"| {regularizer} | none within 0.5 points | - |")
        else:
            lines.append(f"| {regularizer} | {100 * best['weights_kept']:.2f}% | {100 * best['test_error']:.2f}% |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    # the numbers behind the table (weights of the first layer left out), to redraw or compare without retraining
    save_json([{k: v for k, v in r.items() if k != "first_layer"} for r in [dense, *rows]], args.out / "runs.json")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
