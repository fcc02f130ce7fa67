"""Training-step time of gated models over the same dense model (issue: speed and scale).

MLP 784-300-100 and LeNet-5-Caffe at batch 100, one thread, Adam; the dense
model and each gated variant are stepped in turn, in blocks of 10 steps, in one
process (common.median_step_seconds), and the median over --steps steps
(after --warmup) is reported, with the ratio to the dense median. Variants:
the paper's layers (L0MLP / L0LeNet5, per-example noise as in the paper, and
one shared sample), sparsify with unit gates (default rules), and sparsify
with per-weight gates. Freed memory is kept in the process (mallopt) unless
--default-malloc.

--rounds R repeats the whole comparison R times in the process (the rounds interleave every model again)
and reports, per variant, the median of the R ratios and their range: on a shared machine one round's ratio
moves by tens of percent. --references adds variants that are not gated models but bound what a gated step
can cost: on the MLP, the dense model with its input's gradient computed (the first layer's extra matmul
that the gate's gradient needs under per-example noise) and the same plus the per-example noise drawn
(rand and logit over 100 × 1184 gates); on LeNet-5, the paper layers' previous forward, which gated each
conv's output before ReLU and pooling instead of the pooled map.

Run:  .venv/bin/python benchmarks/gate_overhead.py [--steps 100 --warmup 20] [--rounds 1] [--references] [--models mlp,lenet5]
      [--fused-adam] [--compile] [--default-malloc] [--out ...]
"""

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_step_seconds, reuse_freed_memory, save_json  # noqa: E402
import l0sparse  # noqa: E402
from l0sparse.core.models import LeNet5, mlp  # noqa: E402
from l0sparse.training.train import configure_torch  # noqa: E402


def dense_mlp():
    return mlp((784, 300, 100, 10))


class InputGradient(nn.Module):
    """A dense model whose input needs a gradient: its first layer computes grad · W, as a per-example input gate's
    gradient needs (the dense model skips it). ``noise``: also draw per-example noise for ``noise`` gates a step."""

    def __init__(self, model: nn.Module, noise: int = 0) -> None:
        super().__init__()
        self.model, self.noise = model, noise

    def forward(self, x):
        if self.noise:
            torch.rand(x.shape[0], self.noise).logit_(1e-6)  # what the gates' sampler draws, unused
        return self.model(x.detach().requires_grad_())


def gate_conv_outputs(model: l0sparse.L0LeNet5) -> l0sparse.L0LeNet5:
    """The L0LeNet5 forward before issue #28: each conv's gates multiply its output, then ReLU and pooling."""

    def forward(self, input):
        hidden = self.pool(torch.relu(self.conv1(input)))
        hidden = self.pool(torch.relu(self.conv2(hidden)))
        return self.fc2(torch.relu(self.fc1(hidden.flatten(1))))

    model.forward = types.MethodType(forward, model)
    return model


def variants(name, references=False):
    x = torch.randn(100, 1, 28, 28)
    if name == "MLP 784-300-100":
        paper = lambda per_example: l0sparse.L0MLP((784, 300, 100, 10), per_example_noise=per_example)  # noqa: E731
        dense = dense_mlp
    else:
        paper = lambda per_example: l0sparse.L0LeNet5(per_example_noise=per_example)  # noqa: E731
        dense = LeNet5
    models = {
        "dense": dense(),
        "paper layers, per-example noise": paper(True),
        "paper layers, shared sample": paper(False),
        "sparsify, unit gates": l0sparse.sparsify(dense(), example_inputs=x[:2]),
        "sparsify, per-weight gates": l0sparse.sparsify(dense(), rules={nn.Linear: "weight", nn.Conv2d: "weight"}),
    }
    if references and name == "MLP 784-300-100":
        models["reference: dense, input gradient"] = InputGradient(dense())
        models["reference: dense, input gradient, per-example noise drawn"] = InputGradient(dense(), noise=784 + 300 + 100)
    if references and name == "LeNet-5-Caffe":
        models["reference: paper layers, per-example noise, gates on the conv outputs"] = gate_conv_outputs(paper(True))
    return x, models


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True) for every model")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings as they are")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model's loss (inductor, with "
                        "fallback_random: eager's random numbers, which were faster here than inductor's own)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the comparison; report the median ratio and range")
    parser.add_argument("--references", action="store_true", help="add the reference variants (see the docstring)")
    parser.add_argument("--models", default="mlp,lenet5", help="comma-separated: mlp, lenet5")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gate_overhead.json")
    args = parser.parse_args()
    if not args.default_malloc:
        reuse_freed_memory()
    configure_torch(args.threads)  # fixed threads; denormals flushed (closed gates' Adam moments decay into them)
    if args.compile:
        from torch._inductor import config as inductor_config  # (a plain `import torch...` here would shadow torch)

        inductor_config.fallback_random = True
    rows = []
    names = {"mlp": "MLP 784-300-100", "lenet5": "LeNet-5-Caffe"}
    for name in (names[key] for key in args.models.split(",")):
        torch.manual_seed(0)
        x, models = variants(name, args.references)
        y = torch.randint(0, 10, (100,))
        rounds = [median_step_seconds(models, x, y, args.steps, args.warmup, args.fused_adam, compile=args.compile)
                  for _ in range(args.rounds)]
        for key in models:
            ratios = [medians[key] / medians["dense"] for medians in rounds]
            row = {"model": name, "variant": key, "threads": args.threads, "batch": 100, "fused_adam": args.fused_adam,
                   "compiled": args.compile, "malloc": "glibc default" if args.default_malloc else "freed memory reused",
                   "median_ms": 1000 * statistics.median(medians[key] for medians in rounds),
                   "ratio_to_dense": statistics.median(ratios), "rounds": args.rounds,
                   "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios}
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_json(rows, args.out)


if __name__ == "__main__":
    main()
