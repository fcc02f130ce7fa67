"""Conditional computation along a training run: step time of L0MLP with and without it, beside dense.

MLP 784-300-100 on Fashion-MNIST (λ = 0.1/N per weight, gates at lr 1e-2:
about 25% of the FLOPs are left after ~10 epochs), batch 100, Adam, one
thread. Five models train side by side in one process, taking turns at
blocks of 10 batches, the same batches for all (the first step of each block
is not timed; freed memory is kept in the process with mallopt unless
--default-malloc): the dense MLP, and L0MLP with per-example noise and with
one shared sample per step, each plain and with ``conditional=True``. A
plain model and its conditional twin keep their own RNG state, so they draw
the same gates and follow the same trajectory up to float reordering. Per
epoch: the median step time of each, the FLOPs the test-time gates keep,
and the test accuracy. Then a table at fixed sparsity (gates set by hand:
a fraction of each layer's inputs open, the rest closed) at batch 100 and
1000, to show where the saving goes. ``--fused-adam`` uses
``torch.optim.Adam(fused=True)`` for every model (Adam is about half of the
dense step at batch 100 with the default implementation, and conditional
computation does not shrink it). Writes benchmarks/results/conditional.json
(or conditional-fused-adam.json).

``--model lenet5`` runs the same comparison on LeNet-5-Caffe (L0LeNet5
against the plain LeNet5), written to conditional-lenet5.json; its
fixed-sparsity table keeps given numbers of conv channels and FC inputs
open, at batch 100, with both kinds of noise.

Run:  .venv/bin/python benchmarks/conditional.py [--epochs 15 --data fashion-mnist] [--fused-adam]
      .venv/bin/python benchmarks/conditional.py --model lenet5 --lam 1.0 --epochs 8
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_step_seconds, reuse_freed_memory, save_json, timed_step, training_loss  # noqa: E402

import l0sparse  # noqa: E402
from l0sparse.training.data import load_dataset  # noqa: E402
from l0sparse.core.models import LeNet5, mlp  # noqa: E402
from l0sparse.core.sites import find_gates  # noqa: E402
from l0sparse.training.train import configure_torch  # noqa: E402
from l0sparse.training.runs import accuracy  # noqa: E402

BLOCK = 10  # batches each model runs in a row

VARIANTS = {  # name: (per_example_noise, conditional)
    "per-example noise": (True, False),
    "per-example noise, conditional": (True, True),
    "shared sample": (False, False),
    "shared sample, conditional": (False, True),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("mlp", "lenet5"), default="mlp")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fused-adam", action="store_true")
    parser.add_argument("--fixed-only", action="store_true", help="re-measure only the fixed-sparsity table, keeping the run's rows")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings as they are")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.default_malloc:
        reuse_freed_memory()
    results = Path(__file__).resolve().parent / "results"
    args.out = args.out or results / ("conditional" + ("-lenet5" if args.model == "lenet5" else "")
                                      + ("-fused-adam" if args.fused_adam else "") + ".json")
    configure_torch(args.threads)
    data = load_dataset(args.data)
    sizes = (data.num_features, 300, 100, data.num_classes)
    n_train = len(data.x_train)
    if args.fixed_only:
        previous = json.loads(args.out.read_text())
        fixed = fixed_sparsity(sizes, args.fused_adam) if args.model == "mlp" else fixed_sparsity_lenet5(args.fused_adam)
        save_json({**previous, "fixed_sparsity": fixed, "fixed_sparsity_malloc": "glibc default" if args.default_malloc else "freed memory reused"}, args.out)
        return

    torch.manual_seed(0)
    if args.model == "mlp":
        dense_model = lambda: mlp(sizes)  # noqa: E731
        gated_model = lambda **kwargs: l0sparse.L0MLP(sizes, **kwargs)  # noqa: E731
    else:
        data.x_train, data.x_test = data.x_train.view(-1, 1, 28, 28), data.x_test.view(-1, 1, 28, 28)
        dense_model = lambda: LeNet5(num_classes=data.num_classes)  # noqa: E731
        gated_model = lambda **kwargs: l0sparse.L0LeNet5(num_classes=data.num_classes, **kwargs)  # noqa: E731
    models = {"dense": dense_model()}
    for name, (per_example, conditional) in VARIANTS.items():
        torch.manual_seed(0)  # the same initial weights and gates for every gated variant
        models[name] = gated_model(per_example_noise=per_example, conditional=conditional)
    optimizers, penalties = {}, {}
    for name, model in models.items():
        gate_ids = {id(g.log_alpha) for g in find_gates(model)}
        groups = [{"params": [p for p in model.parameters() if id(p) not in gate_ids], "lr": 1e-3}]
        if gate_ids:
            groups.append({"params": [g.log_alpha for g in find_gates(model)], "lr": 1e-2})
            penalties[name] = l0sparse.Penalty(model, args.lam, N=n_train)
        optimizers[name] = torch.optim.Adam(groups, fused=args.fused_adam or None)
    losses = {name: training_loss(model, penalties.get(name)) for name, model in models.items()}
    rng_states = {name: torch.get_rng_state() for name in models}  # twins draw the same gates
    dense_flops = l0sparse.count_flops(models["dense"], data.x_test[:2])
    batches = torch.Generator().manual_seed(1)
    rows = []
    for epoch in range(1, args.epochs + 1):
        times = {name: [] for name in models}
        # each model steps through the same block of 10 batches in turn; the first step of a block
        # follows another model (its data in the caches) and is not timed
        for block in torch.randperm(n_train, generator=batches).split(100 * BLOCK):
            for name in models:
                torch.set_rng_state(rng_states[name])
                for position, index in enumerate(block.split(100)):
                    seconds = timed_step(losses[name], optimizers[name], data.x_train[index], data.y_train[index])
                    if position > 0:
                        times[name].append(seconds)
                rng_states[name] = torch.get_rng_state()
        dense_step = statistics.median(times["dense"])
        for name, model in models.items():
            row = {"epoch": epoch, "variant": name, "median_step_ms": 1000 * statistics.median(times[name]),
                   "ratio_to_dense": statistics.median(times[name]) / dense_step,
                   "test_accuracy": accuracy(model, data.x_test, data.y_test)}
            if name in penalties:
                row["flops_kept"] = float(l0sparse.CostModel(model, data.x_test[:2]).flops(deterministic=True)) / dense_flops
            rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        save_json({"threads": args.threads, "model": args.model, "data": args.data, "lam": args.lam, "fused_adam": args.fused_adam,
                   "malloc": "glibc default" if args.default_malloc else "freed memory reused",
                   "rows": rows}, args.out)
    fixed = fixed_sparsity(sizes, args.fused_adam) if args.model == "mlp" else fixed_sparsity_lenet5(args.fused_adam)
    save_json({"threads": args.threads, "data": args.data, "lam": args.lam, "fused_adam": args.fused_adam,
                   "malloc": "glibc default" if args.default_malloc else "freed memory reused", "rows": rows,
               "fixed_sparsity": fixed}, args.out)


def fixed_sparsity(sizes, fused_adam: bool, steps: int = 60, warmup: int = 20) -> list[dict]:
    """Median step time of the conditional L0MLP (one shared sample) over dense, with a fraction of every
    layer's inputs open (log α = 6) and the rest closed (log α = -12), at batch 100 and 1000."""
    rows = []
    for batch in (100, 1000):
        x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
        for open_fraction in (1.0, 0.5, 0.3, 0.2, 0.1):
            torch.manual_seed(0)
            models = {"dense": mlp(sizes), "conditional": l0sparse.L0MLP(sizes, per_example_noise=False, conditional=True)}
            with torch.no_grad():
                for layer in models["conditional"].l0_layers():
                    is_open = torch.randperm(layer.in_features) < max(1, round(open_fraction * layer.in_features))
                    layer.gate.log_alpha.copy_(torch.where(is_open, 6.0, -12.0))
            kept = float(l0sparse.CostModel(models["conditional"], x[:2]).flops(deterministic=True))
            dense_flops = l0sparse.count_flops(models["dense"], x[:2])
            medians = median_step_seconds(models, x, y, steps, warmup, fused_adam)
            ratio = medians["conditional"] / medians["dense"]
            row = {"batch": batch, "inputs_open": open_fraction, "flops_kept": kept / dense_flops,
                   "dense_step_ms": 1000 * medians["dense"], "ratio_to_dense": ratio}
            rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows



def fixed_sparsity_lenet5(fused_adam: bool, steps: int = 40, warmup: int = 10) -> list[dict]:
    """Median step time of L0LeNet5 (plain and conditional, both kinds of noise) over LeNet5, batch 100, with
    (conv1, conv2, fc1, fc2) channels / inputs open (log α = 6, the rest -12), the gated models stepped in turn."""
    x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    rows = []
    for kept_units in ((10, 25, 400, 250), (8, 15, 240, 150), (5, 10, 160, 100)):
        torch.manual_seed(0)
        models = {"dense": LeNet5()}
        for name, (per_example, conditional) in VARIANTS.items():
            model = l0sparse.L0LeNet5(per_example_noise=per_example, conditional=conditional)
            with torch.no_grad():
                for layer, count in zip((model.conv1, model.conv2, model.fc1, model.fc2), kept_units):
                    is_open = torch.randperm(layer.gate.shape[0]) < count
                    layer.gate.log_alpha.copy_(torch.where(is_open, 6.0, -12.0))
            models[name] = model
        flops_kept = float(l0sparse.CostModel(models["shared sample"], x[:2]).flops(deterministic=True)) / l0sparse.count_flops(models["dense"], x[:2])
        medians = median_step_seconds(models, x, y, steps, warmup, fused_adam)
        dense_step = medians["dense"]
        row = {"kept_units": list(kept_units), "flops_kept": flops_kept, "dense_step_ms": 1000 * dense_step,
               **{name: median / dense_step for name, median in medians.items() if name != "dense"}}
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows

if __name__ == "__main__":
    main()
