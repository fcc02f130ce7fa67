"""The paper's MLP 784-300-100 on Fashion-MNIST with the paper's code's settings, read top to bottom.

Settings taken from the paper's code (AMLab-Amsterdam/L0_regularization, L0MLP): λ = 0.1/N per weight,
L2 under the gates with the code's effective strength (weight_decay 5e-4 · N = 30 here, divided by N in the
objective), input gates at drop rate 0.2 and the others at 0.5, log α clamped to [log 1e-2, log 1e2] after
every step, Kaiming-normal weights (std √(2/fan_in)) and zero biases, Adam at 1e-3 on everything, batch 100,
one gate sample per minibatch, and an exponential moving average (0.999) of every parameter, log α
included, for evaluation. Each of them can be switched off to see what it is worth.

Run:   .venv/bin/python benchmarks/paper_mlp.py --epochs 100                  (about 8 min on 1 thread)
       .venv/bin/python benchmarks/paper_mlp.py --epochs 100 --noise per-example
Needs: apt-get install dataset-fashion-mnist
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

import l0sparse  # noqa: E402
from l0sparse.training.data import load_fashion_mnist  # noqa: E402
from l0sparse.core.gates import PAPER_LOG_ALPHA_RANGE  # noqa: E402
from l0sparse.core.prune import plain_copy  # noqa: E402
from l0sparse.training.regularizers import L0  # noqa: E402
from l0sparse.training.train import configure_torch, train_epoch  # noqa: E402
from l0sparse.training.build import ema  # noqa: E402
from l0sparse.training.runs import accuracy  # noqa: E402


def build(args) -> l0sparse.L0MLP:
    clamp = PAPER_LOG_ALPHA_RANGE if args.clamp else None
    model = l0sparse.L0MLP((784, 300, 100, 10), per_example_noise=args.noise == "per-example", clamp_log_alpha=clamp)
    for index, layer in enumerate(model.l0_layers()):
        layer.gate.droprate_init = args.droprate_input if index == 0 else args.droprate
        layer.gate.reset_parameters()
        if args.init == "paper":  # Kaiming normal over the fan-in, zero bias
            torch.nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / layer.in_features))
            torch.nn.init.zeros_(layer.bias)
    return model


def evaluate(model, data, cost_model, dense_flops) -> dict:
    model.eval()
    return {"test_error": 1 - accuracy(model, data.x_test, data.y_test),
            "flops_kept": float(cost_model.flops(deterministic=True)) / dense_flops,
            "architecture": l0sparse.architecture(model)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lam", type=float, default=0.1, help="λ per weight before the division by N")
    parser.add_argument("--weight-decay", type=float, default=30.0, help="L2 under the gates, divided by N (paper: 5e-4·N)")
    parser.add_argument("--droprate-input", type=float, default=0.2)
    parser.add_argument("--droprate", type=float, default=0.5)
    parser.add_argument("--noise", choices=("shared", "per-example"), default="shared")
    parser.add_argument("--init", choices=("paper", "torch"), default="paper")
    parser.add_argument("--no-clamp", dest="clamp", action="store_false")
    parser.add_argument("--ema", type=float, default=0.999, help="0 turns the average off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure_torch(args.threads)
    torch.manual_seed(args.seed)
    data = load_fashion_mnist()
    x_train, y_train = data.x_train.flatten(1), data.y_train
    n_train = len(x_train)

    model = build(args)
    averaged = ema(model, args.ema) if args.ema > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    regularizer = L0(model, args.lam, args.weight_decay, N=n_train)  # the penalty, then the clamp after each step
    cost_model = l0sparse.CostModel(model, x_train[:2])
    dense_flops = l0sparse.count_flops(plain_copy(model), x_train[:2])

    history, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train_epoch(model, optimizer, regularizer, torch.randperm(n_train).split(100), lambda index: (x_train[index], y_train[index]),
                    lambda logits, targets, _: F.cross_entropy(logits, targets), averaged=averaged)
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            record = {"epoch": epoch, "seconds": round(time.perf_counter() - start, 1), **evaluate(model, data, cost_model, dense_flops)}
            if averaged is not None:
                ema_cost = l0sparse.CostModel(averaged.module, x_train[:2])
                record["ema"] = evaluate(averaged.module, data, ema_cost, dense_flops)
            history.append(record)
            print(json.dumps(record), flush=True)
    result = {"settings": vars(args) | {"out": None}, "history": history}
    if args.out is not None:
        save_json(result, args.out)


if __name__ == "__main__":
    main()
