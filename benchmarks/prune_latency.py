"""Inference latency of pruned vs dense models (issue: gate any model and shrink it).

LeNet-5-Caffe (20-50-800-500, via sparsify on a plain nn.Module) and small
ResNets (CIFAR-style, 3 stages of 2 basic blocks, 32×32 inputs, widths
16-32-64 and 32-64-128). Gates are set, not trained: every gate's log α is
drawn so that channels and units close at random until about 30% of the
FLOPs remain (the benchmark is about what a given sparsity buys at
inference, not about which channels training closes). Each model is pruned
as it is (``round_to=1``, channel counts such as 7 or 9) and with
``prune(..., round_to=16)``, which keeps closed (zero) channels until every
count is a multiple of 16, the float lanes of an AVX-512 register; with
rounding the gates are closed until the *pruned* model keeps about 30%.

Dense and pruned models are timed side by side in one process, alternating,
one thread; medians over repeats. Each pair is timed in four configurations,
both models alike: the default (contiguous, NCHW) layout or channels_last,
each with the model as it is or with every BatchNorm folded into the conv
before it (``torch.fx.experimental.optimization.fuse``, the usual inference
step).

Memory allocator: by default glibc returns large freed blocks to the system
and maps fresh ones, so every forward pays page faults in proportion to its
activations, which made the dense ResNet up to 2× slower from run to run and
the speed-up ratios swing by 0.3. The script therefore sets glibc's mmap and
trim thresholds (``mallopt``) so freed memory is reused, as jemalloc or
tcmalloc would; ``--default-malloc`` measures glibc's default instead.

Run:  .venv/bin/python benchmarks/prune_latency.py [--repeats 20] [--threads 1] [--default-malloc]
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import reuse_freed_memory, save_json  # noqa: E402
from torch import nn
from torch.fx.experimental.optimization import fuse

import l0sparse
from l0sparse import Gate
from l0sparse.core.models import LeNet5
from l0sparse.training.train import configure_torch  # noqa: E402


class Block(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks):
                layers.append(Block(channels, width, 2 if stage > 0 and index == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


@torch.no_grad()
def close_until(model, example, target_fraction, generator, round_to=1):
    """Raise a common threshold on random scores until the pruned model's FLOPs fall to the target."""
    gates = [g for g in model.modules() if isinstance(g, Gate)]
    scores = [torch.rand(g.log_alpha.shape, generator=generator) for g in gates]
    dense = l0sparse.count_flops(l0sparse.prune(model, example, round_to=round_to), example)
    low, high = 0.0, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        for gate, score in zip(gates, scores):
            gate.log_alpha.copy_(torch.where(score < middle, -10.0, 10.0))
        kept = l0sparse.count_flops(l0sparse.prune(model, example, round_to=round_to), example) / dense
        low, high = (middle, high) if kept > target_fraction else (low, middle)
    return kept


def median_latency(models, x, repeats):
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.30)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings as they are")
    parser.add_argument("--out", type=Path, default=None, help="default: results/prune_latency.json "
                        "(prune_latency-default-malloc.json with --default-malloc)")
    args = parser.parse_args()
    if args.out is None:
        stem = "prune_latency-default-malloc" if args.default_malloc else "prune_latency"
        args.out = Path(__file__).resolve().parent / "results" / f"{stem}.json"
    if not args.default_malloc:
        reuse_freed_memory()
    configure_torch(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    resnet_16 = ("ResNet (16-32-64, 2 blocks)", SmallResNet, (3, 32, 32))
    resnet_32 = ("ResNet (32-64-128, 2 blocks)", lambda: SmallResNet((32, 64, 128)), (3, 32, 32))
    # 16-32-64 cannot reach 30% with every count a multiple of 16: its first stage is 16 wide
    cases = [(("LeNet-5-Caffe", LeNet5, (1, 28, 28)), 1), (("LeNet-5-Caffe", LeNet5, (1, 28, 28)), 16),
             (resnet_16, 1), (resnet_32, 1), (resnet_32, 16)]
    for (name, factory, shape), round_to in cases:
        torch.manual_seed(0)
        model = factory().eval()
        example = torch.randn(2, *shape)
        dense = factory().eval()
        dense.load_state_dict(model.state_dict())
        l0sparse.sparsify(model, example_inputs=example)
        close_until(model, example, args.target, generator, round_to)
        model.eval()
        pruned = l0sparse.prune(model, example, round_to=round_to)
        configurations = [(layout, folded) for folded in (False, True) for layout in (torch.contiguous_format, torch.channels_last)]
        for memory_format, fold_batchnorm in configurations:
            # the same layout and the same BatchNorm folding for both models
            pair = {"dense": dense, "pruned": pruned}
            if fold_batchnorm:
                pair = {key: fuse(copy.deepcopy(module)) for key, module in pair.items()}
            pair = {key: module.to(memory_format=memory_format) for key, module in pair.items()}
            for batch in (1, 256):
                x = torch.randn(batch, *shape).contiguous(memory_format=memory_format)
                latency = median_latency(pair, x, args.repeats)
                flops_dense, flops_pruned = l0sparse.count_flops(dense, x), l0sparse.count_flops(pruned, x)
                row = {"model": name, "round_to": round_to, "malloc": "glibc default" if args.default_malloc else "freed memory reused",
                       "memory_format": str(memory_format).removeprefix("torch."), "batchnorm_folded": fold_batchnorm,
                       "batch": batch,
                       "threads": args.threads, "flops_kept": flops_pruned / flops_dense,
                       "dense_ms": 1000 * latency["dense"], "pruned_ms": 1000 * latency["pruned"],
                       "speedup": latency["dense"] / latency["pruned"], "flops_ratio": flops_dense / flops_pruned}
                row["speedup_over_flops_ratio"] = row["speedup"] / row["flops_ratio"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    save_json(rows, args.out)


if __name__ == "__main__":
    main()
