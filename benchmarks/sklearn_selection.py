"""Feature-selection benchmark for l0sparse.sklearn (issue: scikit-learn estimators).

Linear: n = 500, p in {1000, 5000}, k = 10 unit coefficients equally spaced,
Toeplitz ρ = 0.5, SNR in {1, 5}, five seeds; support F1, number selected,
test R² and wall time for L0Regressor (defaults), LassoCV (5-fold) and abess
(5-fold CV) where it is installed.
Non-linear: make_friedman1, n = 1000 train + 1000 test, 100 or 1000 features,
5 informative; the input-gated MLP (only hidden_layer_sizes given) against the
linear selectors.

Equicorrelated (--designs equicorrelated): the same linear problem with every pair of features correlated
ρ = 0.5 (one common factor), p = 1000, SNR 5 (issue #28).

Run:  .venv/bin/python benchmarks/sklearn_selection.py [--seeds 5] [--designs toeplitz,equicorrelated]
      [--methods L0Regressor,...] [--skip-nonlinear] [--out benchmarks/results/sklearn_selection.json]
Single-threaded (torch, BLAS) so that the times compare like for like.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402  (after the thread variables above, which must be set before numpy loads)
from sklearn.datasets import make_friedman1  # noqa: E402
from sklearn.linear_model import LassoCV  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402
from sparse_regression_data import make_equicorrelated_regression, make_toeplitz_regression  # noqa: E402

from l0sparse.sklearn import L0Regressor  # noqa: E402
from l0sparse.training.train import configure_torch  # noqa: E402


def f1_score(selected, truth) -> float:
    selected, truth = set(map(int, selected)), set(map(int, truth))
    if not selected:
        return 0.0
    hits = len(selected & truth)
    return 2 * hits / (len(selected) + len(truth))


def r2(y_true, y_pred) -> float:
    return 1 - float(((y_true - y_pred) ** 2).sum() / ((y_true - y_true.mean()) ** 2).sum())


def methods(nonlinear: bool, only: set | None = None):
    found = _all_methods(nonlinear)
    return found if only is None else {name: factory for name, factory in found.items() if name in only}


def _all_methods(nonlinear: bool):
    found = {"L0Regressor": lambda seed: L0Regressor(random_state=seed)}
    if nonlinear:
        found["L0Regressor MLP(64)"] = lambda seed: L0Regressor(hidden_layer_sizes=(64,), random_state=seed)
    found["LassoCV"] = lambda seed: LassoCV(cv=5, random_state=seed, n_jobs=1)
    try:
        from abess.linear import LinearRegression as AbessLinearRegression

        found["abess (cv=5)"] = lambda seed: AbessLinearRegression(cv=5)
    except ImportError:
        print("abess is not installed: pip install abess", file=sys.stderr)
    return found


def run_one(name, factory, seed, x, y, x_test, y_test, truth):
    model = factory(seed)
    start = time.perf_counter()
    model.fit(x, y)
    seconds = time.perf_counter() - start
    if hasattr(model, "support_") and isinstance(model, L0Regressor):
        selected = np.flatnonzero(model.support_)
    else:
        selected = np.flatnonzero(np.abs(model.coef_) > 0)
    return {"method": name, "seed": seed, "f1": f1_score(selected, truth), "n_selected": int(len(selected)),
            "test_r2": r2(y_test, model.predict(x_test)), "seconds": seconds}


def summarise(rows, keys):
    table = {}
    for row in rows:
        table.setdefault(tuple(row[k] for k in keys), []).append(row)
    lines = []
    for key, group in table.items():
        f1s = [r["f1"] for r in group]
        lines.append({**dict(zip(keys, key)), "runs": len(group), "f1_mean": statistics.mean(f1s), "f1_min": min(f1s),
                      "n_selected_median": statistics.median(r["n_selected"] for r in group),
                      "test_r2_mean": statistics.mean(r["test_r2"] for r in group),
                      "seconds_median": statistics.median(r["seconds"] for r in group)})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sklearn_selection.json")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--skip-nonlinear", action="store_true")
    parser.add_argument("--designs", default="toeplitz", help="comma-separated linear designs: toeplitz, equicorrelated")
    parser.add_argument("--methods", default=None, help="comma-separated method names to run (default: all)")
    args = parser.parse_args()
    only = None if args.methods is None else set(args.methods.split(","))
    designs = args.designs.split(",")
    configure_torch(1)  # one thread; denormals flushed (closed gates' Adam moments decay into them)
    # warm up imports and kernels so that the first timed fit is not charged for them
    warm_x, warm_y, *_ = make_toeplitz_regression(60, 20, seed=99)
    for factory in methods(False).values():
        factory(0).fit(warm_x, warm_y)

    linear_rows, nonlinear_rows = [], []
    cells = {"toeplitz": [(make_toeplitz_regression, p, snr) for p in (1000, 5000) for snr in (1.0, 5.0)],
             "equicorrelated": [(make_equicorrelated_regression, 1000, 5.0)]}
    if not args.skip_linear:
        for design in designs:
            for make, p, snr in cells[design]:
                for seed in range(args.seeds):
                    x, y, x_test, y_test, truth = make(500, p, snr=snr, seed=seed)
                    for name, factory in methods(False, only).items():
                        row = {"design": design, "p": p, "snr": snr, **run_one(name, factory, seed, x, y, x_test, y_test, truth)}
                        linear_rows.append(row)
                        print(json.dumps(row), flush=True)
    if not args.skip_nonlinear:
        for p in (100, 1000):
            for seed in range(args.seeds):
                x, y = make_friedman1(n_samples=2000, n_features=p, noise=1.0, random_state=seed)
                for name, factory in methods(True, only).items():
                    row = {"p": p, **run_one(name, factory, seed, x[:1000], y[:1000], x[1000:], y[1000:], range(5))}
                    nonlinear_rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {"threads": 1, "linear": summarise(linear_rows, ("design", "p", "snr", "method")),
              "nonlinear": summarise(nonlinear_rows, ("p", "method")), "linear_runs": linear_rows, "nonlinear_runs": nonlinear_rows}
    save_json(result, args.out)
    for section in ("linear", "nonlinear"):
        for line in result[section]:
            print(section, json.dumps(line))


if __name__ == "__main__":
    main()
