"""Reach 50%, 25% and 10% of the FLOPs with TargetController on Fashion-MNIST.

MLP 784-300-100 and LeNet-5-Caffe (the paper's layers) and a small ResNet
(16-32-64, 2 blocks a stage, gated with sparsify). For each: train with Adam
(lr 1e-3 for weights, 1e-2 for log α) and the controller (lr 0.01, warm-up
over the first half of the steps), snap the gates to the target (TargetController.snap_to_target; --no-snap
to skip), recalibrate BatchNorm, prune, and count the pruned model's FLOPs
(real, not expected) against the dense model's. Budgets are epochs given on
the command line (the defaults are small; say which you ran).

Run:  .venv/bin/python benchmarks/target_controller.py [--epochs-mlp 5 --epochs-lenet 3 --epochs-resnet 2]
Needs: apt-get install dataset-fashion-mnist
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402
from prune_latency import SmallResNet  # noqa: E402

import l0sparse  # noqa: E402
from l0sparse.training.data import load_fashion_mnist  # noqa: E402
from l0sparse.core.prune import plain_copy  # noqa: E402
from l0sparse.training.regularizers import L0WithTarget  # noqa: E402
from l0sparse.training.train import configure_torch, recalibrate_batchnorm, train_epoch  # noqa: E402
from l0sparse.training.runs import accuracy  # noqa: E402


SNAP = True
GATE_LR = 1e-2
CONTROLLER_LR = 0.01


def make(name):
    if name == "MLP 784-300-100":
        return l0sparse.L0MLP((784, 300, 100, 10))
    if name == "LeNet-5-Caffe":
        return l0sparse.L0LeNet5()
    model = SmallResNet()
    model.stem[0] = torch.nn.Conv2d(1, 16, 3, 1, 1, bias=False)  # one input channel for Fashion-MNIST
    return model


def run(name, target, epochs, data, batch_size=100):
    torch.manual_seed(0)
    model = make(name)
    example = data.x_train[:2]
    if not any(isinstance(m, l0sparse.Gate) for m in model.modules()):
        l0sparse.sparsify(model, example_inputs=example)
    steps = epochs * (len(data.x_train) // batch_size)
    controller = l0sparse.TargetController(model, target, "flops", example_inputs=example, warmup_steps=steps // 2, lr=CONTROLLER_LR)
    # the gates get a larger step than the weights: with both at 1e-3 the multipliers grew for a thousand
    # steps before log α moved, and the MLP overshot to 0% of the FLOPs
    gate_parameters = [g.log_alpha for g in model.modules() if isinstance(g, l0sparse.Gate)]
    gate_ids = {id(p) for p in gate_parameters}
    optimizer = torch.optim.Adam([{"params": [p for p in model.parameters() if id(p) not in gate_ids], "lr": 1e-3},
                                  {"params": gate_parameters, "lr": GATE_LR}])
    regularizer = L0WithTarget(model, controller)  # the controller's term, and its step after each optimizer step
    start = time.perf_counter()
    for _ in range(epochs):
        train_epoch(model, optimizer, regularizer, torch.randperm(len(data.x_train)).split(batch_size),
                    lambda index: (data.x_train[index], data.y_train[index]), lambda logits, targets, _: F.cross_entropy(logits, targets))
    seconds = time.perf_counter() - start
    trained_fraction = controller.deterministic_fraction()
    if SNAP:
        controller.snap_to_target()
    recalibrate_batchnorm(model, data.x_train[:5000].split(500))
    pruned = l0sparse.prune(model, example)
    dense_flops = l0sparse.count_flops(plain_copy(model), example)
    reached = l0sparse.count_flops(pruned, example) / dense_flops
    return {"model": name, "target": target, "epochs": epochs, "fraction_after_training": trained_fraction, "snapped": SNAP,
            "reached_flops": reached,
            "within_2_points": abs(reached - target) <= 0.02, "test_accuracy": accuracy(model, data.x_test, data.y_test),
            "architecture": l0sparse.architecture(model) if name != "ResNet 16-32-64" else None, "train_seconds": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs-mlp", type=int, default=5)
    parser.add_argument("--epochs-lenet", type=int, default=3)
    parser.add_argument("--epochs-resnet", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-snap", action="store_true", help="report the size training reached, without snap_to_target")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "target_controller.json")
    args = parser.parse_args()
    configure_torch(args.threads)
    global SNAP
    SNAP = not args.no_snap
    data = load_fashion_mnist()
    rows = []
    for name, epochs in (("MLP 784-300-100", args.epochs_mlp), ("LeNet-5-Caffe", args.epochs_lenet), ("ResNet 16-32-64", args.epochs_resnet)):
        for target in (0.5, 0.25, 0.1):
            row = run(name, target, epochs, data)
            rows.append(row)
            print(json.dumps(row), flush=True)
            save_json(rows, args.out)


if __name__ == "__main__":
    main()
