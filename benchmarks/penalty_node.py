"""Training-step time with ``Penalty`` (one autograd node) against the same penalty in plain autograd.

MLP 784-300-100 at batch 100, one thread, Adam, per-weight gates (sparsify) and unit gates
(L0MLP, one shared sample). The two penalties are stepped in turn, in blocks of 10 steps, in one
process on two copies of the same model (common.median_step_seconds, freed memory kept); medians
after warm-up. The plain version is the formula
Σ charge · sigmoid(log α − β·log(−γ/ζ)) / N through ``cat``, ``prob_nonzero`` and ``dot``.

Run:  .venv/bin/python benchmarks/penalty_node.py [--steps 150 --warmup 20]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_step_seconds, reuse_freed_memory, save_json  # noqa: E402
import l0sparse  # noqa: E402
from l0sparse.core.distributions import prob_nonzero  # noqa: E402
from l0sparse.core.models import mlp  # noqa: E402
from l0sparse.training.train import configure_torch  # noqa: E402


class PlainAutogradPenalty(l0sparse.Penalty):
    """The same charges, differentiated op by op by autograd (weight decay 0)."""

    def __call__(self):
        terms = [torch.dot(prob_nonzero(torch.cat([gate.log_alpha.reshape(-1) for gate in members]), beta, gamma, zeta), charge)
                 for (beta, gamma, zeta), (members, charge) in self._groups.items()]
        return torch.stack(terms).sum() / self.N


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "penalty_node.json")
    args = parser.parse_args()
    reuse_freed_memory()
    configure_torch(args.threads)
    x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    builders = {
        "per-weight gates (sparsify)": lambda: l0sparse.sparsify(mlp((784, 300, 100, 10)), rules={torch.nn.Linear: "weight"}),
        "unit gates (L0MLP, shared sample)": lambda: l0sparse.L0MLP((784, 300, 100, 10), per_example_noise=False),
    }
    rows = []
    for variant, build in builders.items():
        models, penalties = {}, {}
        for name, penalty_class in (("plain autograd", PlainAutogradPenalty), ("Penalty", l0sparse.Penalty)):
            torch.manual_seed(0)
            models[name] = build()
            penalties[name] = penalty_class(models[name], 0.1, N=60000)
        medians = median_step_seconds(models, x, y, args.steps, args.warmup, penalties=penalties)
        row = {"variant": variant, "threads": args.threads, "batch": 100,
               "plain_autograd_ms": 1000 * medians["plain autograd"], "penalty_ms": 1000 * medians["Penalty"],
               "ratio": medians["Penalty"] / medians["plain autograd"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    save_json(rows, args.out)


if __name__ == "__main__":
    main()
