"""Reference architectures of the paper, built from the L0 layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers import L0Conv2d, L0Linear

__all__ = ["L0MLP", "L0LeNet5", "LeNet5", "mlp", "mlp_counts", "build_model"]


def mlp_counts(layer_inputs: Sequence[int], out_features: int) -> tuple[int, int]:
    """(parameters, MACs per example) of a plain MLP whose layers take ``layer_inputs`` inputs.

    Layer l maps ``layer_inputs[l]`` to ``layer_inputs[l+1]`` (the last to
    ``out_features``), with a bias on every output.
    """
    widths = list(layer_inputs) + [out_features]
    macs = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return macs + sum(widths[1:]), macs


class L0MLP(nn.Module):
    """MLP of :class:`L0Linear` layers with ReLU between them (the paper's 784-300-100 by default).

    Each layer gates its inputs, so the paper's architecture string lists the
    kept inputs of each layer.
    """

    def __init__(self, sizes: Sequence[int] = (784, 300, 100, 10), **gate_kwargs) -> None:
        super().__init__()
        if len(sizes) < 2 or any(int(s) <= 0 for s in sizes):
            raise ValueError(f"sizes must list at least two positive widths, got {tuple(sizes)}")
        self.sizes = tuple(int(s) for s in sizes)
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            layers.append(L0Linear(fan_in, fan_out, **gate_kwargs))
            if index < len(self.sizes) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        return self.layers(input.flatten(1))

    def l0_layers(self) -> list[L0Linear]:
        return [layer for layer in self.layers if isinstance(layer, L0Linear)]

    def kept_inputs(self) -> list[int]:
        return [layer.active_units() for layer in self.l0_layers()]

    def architecture(self) -> str:
        """The paper's notation, e.g. ``784-300-100 -> 219-214-100``."""
        before = "-".join(str(s) for s in self.sizes[:-1])
        return f"{before} -> {'-'.join(str(k) for k in self.kept_inputs())}"

    def counts(self) -> dict[str, int]:
        """Parameters and MACs of the dense network and of the pruned one (deterministic gates)."""
        dense_params, dense_macs = mlp_counts(self.sizes[:-1], self.sizes[-1])
        kept_params, kept_macs = mlp_counts(self.kept_inputs(), self.sizes[-1])
        return {"params": dense_params, "kept_params": kept_params, "flops": dense_macs, "kept_flops": kept_macs}


class L0LeNet5(nn.Module):
    """LeNet-5-Caffe (20-50-800-500) with the paper's gates: conv output channels, FC inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, **gate_kwargs) -> None:
        super().__init__()
        self.conv1 = L0Conv2d(in_channels, 20, 5, **gate_kwargs)
        self.conv2 = L0Conv2d(20, 50, 5, **gate_kwargs)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = L0Linear(50 * side * side, 500, **gate_kwargs)
        self.fc2 = L0Linear(500, num_classes, **gate_kwargs)
        self.pool = nn.MaxPool2d(2)

    def forward(self, input: Tensor) -> Tensor:
        hidden = self.pool(torch.relu(self.conv1(input)))
        hidden = self.pool(torch.relu(self.conv2(hidden)))
        hidden = torch.relu(self.fc1(hidden.flatten(1)))
        return self.fc2(hidden)

    def architecture(self) -> str:
        """The paper's notation, e.g. ``20-50-800-500 -> 20-25-45-462``."""
        before = f"20-50-{self.fc1.in_features}-500"
        kept = [self.conv1.active_units(), self.conv2.active_units(), self.fc1.active_units(), self.fc2.active_units()]
        return f"{before} -> {'-'.join(str(k) for k in kept)}"


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """A plain (dense) MLP with the same layout as :class:`L0MLP`: flatten, Linear/ReLU pairs, a last Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """Plain LeNet-5-Caffe (20-50-800-500) for 1×28×28 inputs: the dense counterpart of :class:`L0LeNet5`."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def build_model(name: str, num_features: int, num_classes: int, hidden: Sequence[int] = (300, 100), gated: bool = True,
                **gate_kwargs) -> nn.Module:
    """The model a training config names: ``"mlp"`` (flattened inputs) or ``"lenet5"``, gated or dense."""
    if name == "mlp":
        sizes = (num_features, *hidden, num_classes)
        return L0MLP(sizes, **gate_kwargs) if gated else mlp(sizes)
    if name == "lenet5":
        return L0LeNet5(num_classes=num_classes, **gate_kwargs) if gated else LeNet5(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; known: 'mlp', 'lenet5'")
