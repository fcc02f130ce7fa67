"""Training-step time of gated models over the same dense model (issue: speed and scale).

MLP 784-300-100 and LeNet-5-Caffe at batch 100, one thread, Adam; the dense
model and each gated variant are stepped in turn, in blocks of 10 steps, in one
process (common.median_step_seconds), and the median over --steps steps
(after --warmup) is reported, with the ratio to the dense median. Variants:
the paper's layers (L0MLP / L0LeNet5, per-example noise as in the paper, and
one shared sample), sparsify with unit gates (default rules), and sparsify
with per-weight gates. Freed memory is kept in the process (mallopt) unless
--default-malloc.

Run:  .venv/bin/python benchmarks/gate_overhead.py [--steps 100 --warmup 20] [--fused-adam] [--compile] [--default-malloc] [--out ...]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_step_seconds, reuse_freed_memory, save_json  # noqa: E402
import l0sparse  # noqa: E402
from l0sparse.models import LeNet5, mlp  # noqa: E402
from l0sparse.train import configure_torch  # noqa: E402


def dense_mlp():
    return mlp((784, 300, 100, 10))


def variants(name):
    x = torch.randn(100, 1, 28, 28)
    if name == "MLP 784-300-100":
        paper = lambda per_example: l0sparse.L0MLP((784, 300, 100, 10), per_example_noise=per_example)  # noqa: E731
        dense = dense_mlp
    else:
        paper = lambda per_example: l0sparse.L0LeNet5(per_example_noise=per_example)  # noqa: E731
        dense = LeNet5
    return x, {
        "dense": dense(),
        "paper layers, per-example noise": paper(True),
        "paper layers, shared sample": paper(False),
        "sparsify, unit gates": l0sparse.sparsify(dense(), example_inputs=x[:2]),
        "sparsify, per-weight gates": l0sparse.sparsify(dense(), rules={nn.Linear: "weight", nn.Conv2d: "weight"}),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True) for every model")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings as they are")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model's loss (inductor, with "
                        "fallback_random: eager's random numbers, which were faster here than inductor's own)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gate_overhead.json")
    args = parser.parse_args()
    if not args.default_malloc:
        reuse_freed_memory()
    configure_torch(args.threads)  # fixed threads; denormals flushed (closed gates' Adam moments decay into them)
    if args.compile:
        from torch._inductor import config as inductor_config  # (a plain `import torch...` here would shadow torch)

        inductor_config.fallback_random = True
    rows = []
    for name in ("MLP 784-300-100", "LeNet-5-Caffe"):
        torch.manual_seed(0)
        x, models = variants(name)
        y = torch.randint(0, 10, (100,))
        medians = median_step_seconds(models, x, y, args.steps, args.warmup, args.fused_adam, compile=args.compile)
        for key, median in medians.items():
            row = {"model": name, "variant": key, "threads": args.threads, "batch": 100, "fused_adam": args.fused_adam,
                   "compiled": args.compile, "malloc": "glibc default" if args.default_malloc else "freed memory reused",
                   "median_ms": 1000 * median, "ratio_to_dense": median / medians["dense"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_json(rows, args.out)


if __name__ == "__main__":
    main()
