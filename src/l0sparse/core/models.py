"""Reference architectures of the paper, built from the L0 layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from .gates import check_positive_ints, is_positive_int
from .layers import L0Conv2d, L0Linear
from .sites import ConditionalComputation

__all__ = ["L0MLP", "L0LeNet5", "LeNet5", "mlp"]


def _open_index(z: Tensor) -> Tensor:
    """Indices of the units whose gate is non-zero (for any example, when ``z`` has a batch dimension); unit 0 alone,
    closed, when every gate is zero: its z = 0 keeps the result exact, and convs and pools refuse zero channels."""
    is_open = z != 0
    if z.dim() > 1:
        is_open = is_open.flatten(0, -2).any(0)
    index = is_open.nonzero().squeeze(1)
    return index if index.numel() else torch.zeros(1, dtype=index.dtype, device=index.device)


def _select(tensor: Tensor | None, dim: int, index: Tensor | None) -> Tensor | None:
    """``tensor.index_select(dim, index)``; ``None`` passes through (no bias, or keep everything)."""
    return tensor if tensor is None or index is None else tensor.index_select(dim, index)


class L0MLP(ConditionalComputation, nn.Module):
    """MLP of :class:`L0Linear` layers with ReLU between them (the paper's 784-300-100 by default).

    Each layer gates its inputs, so the paper's architecture string lists the
    kept inputs of each layer.

    Args:
        sizes: input width, hidden widths, output width.
        conditional: compute only the units whose gate is non-zero (in training,
            for at least one example of the batch; in eval, the test-time gates).
            Every gate is drawn first, then each layer multiplies only the rows
            and columns that its own gates and the next layer's gates leave open.
            Exact (closed units contribute 0 and get 0 gradient either way), with
            the plain forward's random stream. It saves time once most units are
            closed, most with one shared sample per step
            (``per_example_noise=False``): a per-example sample keeps a unit if
            any example of the batch opens it. See docs/scale.md.
        **gate_kwargs: passed to every :class:`L0Linear`.
    """

    def __init__(self, sizes: Sequence[int] = (784, 300, 100, 10), conditional: bool = False, **gate_kwargs) -> None:
        super().__init__()
        self.conditional = conditional
        sizes = check_positive_ints("sizes", sizes)  # 2.7 is refused, not truncated to 2
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least two positive widths (input and output), got {sizes}")
        self.sizes = sizes
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            layers.append(L0Linear(fan_in, fan_out, **gate_kwargs))
            if index < len(self.sizes) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        if self.conditional and not is_fx_symbolic_tracing():  # traced for costs and pruning: the same function, plainly
            return self._conditional_forward(input.flatten(1))
        return self.layers(input.flatten(1))

    def _conditional_forward(self, hidden: Tensor) -> Tensor:
        layers = self.l0_layers()
        gate_values = [layer.gate_values(hidden.shape[:1]) for layer in layers]  # in layer order, as the plain forward
        open_inputs = [_open_index(z) for z in gate_values] + [None]  # the last layer keeps all its outputs
        hidden = hidden.index_select(1, open_inputs[0])
        for index, (layer, z) in enumerate(zip(layers, gate_values)):
            columns, rows = open_inputs[index], open_inputs[index + 1]
            weight = _select(layer.weight.index_select(1, columns), 0, rows)
            hidden = layer.gated_linear(hidden, z.index_select(-1, columns), weight, _select(layer.bias, 0, rows))
            if rows is not None:
                hidden = torch.relu(hidden)
        return hidden

    def l0_layers(self) -> list[L0Linear]:
        return [layer for layer in self.layers if isinstance(layer, L0Linear)]

    def kept_inputs(self) -> list[int]:
        return [layer.open_units() for layer in self.l0_layers()]

    def architecture(self) -> str:
        """The paper's notation, e.g. ``784-300-100 -> 219-214-100``."""
        before = "-".join(str(s) for s in self.sizes[:-1])
        return f"{before} -> {'-'.join(str(k) for k in self.kept_inputs())}"


class L0LeNet5(ConditionalComputation, nn.Module):
    """LeNet-5-Caffe (20-50-800-500) with the paper's gates: conv output channels, FC inputs.

    Args:
        in_channels, num_classes, image_size: of the input images and the labels.
        conditional: as in :class:`L0MLP`: convolve only the open channels of
            conv1 and conv2 (conv2 reading only conv1's open ones) and multiply
            only fc1's open input features and fc2's open inputs.
        **gate_kwargs: passed to every L0 layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, conditional: bool = False,
                 **gate_kwargs) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not is_positive_int(value):  # num_classes=0 failed inside L0Linear without naming the argument
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # two 5×5 valid convs, each followed by a 2×2 pool, must leave at least one pixel: ((s − 4) // 2 − 4) // 2 >= 1
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 (two 5×5 convs and two 2×2 pools leave a pixel), got {image_size!r}")
        self.conditional = conditional
        self.conv1 = L0Conv2d(in_channels, 20, 5, **gate_kwargs)
        self.conv2 = L0Conv2d(20, 50, 5, **gate_kwargs)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = L0Linear(50 * side * side, 500, **gate_kwargs)
        self.fc2 = L0Linear(500, num_classes, **gate_kwargs)
        self.pool = nn.MaxPool2d(2)

    def forward(self, input: Tensor) -> Tensor:
        if self.conditional and not is_fx_symbolic_tracing():
            return self._conditional_forward(input)
        hidden = self._conv_relu_pool(self.conv1, input)
        hidden = self._conv_relu_pool(self.conv2, hidden)
        hidden = torch.relu(self.fc1(hidden.flatten(1)))
        return self.fc2(hidden)

    def _conv_relu_pool(self, conv: L0Conv2d, input: Tensor) -> Tensor:
        """``pool(relu(conv(input)))``, with per-example channel gates applied after the pooling.

        A gate z ≥ 0, one per example and channel, commutes with ReLU and with max-pooling over a channel's
        positions (relu(z·a) = z·relu(a), max(z·a) = z·max(a), also as rounded floats: rounding is monotonic),
        so the gate multiplies the pooled map, a quarter of the conv's output, forward and backward. The
        gradients are those of gating the conv's output (tests/test_layers.py): where z = 0 neither passes
        any to the conv, and log α gets none through a clamped gate either way. A shared sample, or the
        deterministic gate in eval mode, is folded into the conv's weight as the layer does it.
        """
        if is_fx_symbolic_tracing() or not (conv.per_example_noise and conv.training):  # traced: the layer, a leaf
            return self.pool(torch.relu(conv(input)))
        z = conv.gate_values(input.shape[0])
        return self.pool(torch.relu(conv._conv(input, conv.weight, conv.bias))) * z[:, :, None, None]

    def _conditional_forward(self, input: Tensor) -> Tensor:
        batch = input.shape[0]
        z_conv1, z_conv2 = self.conv1.gate_values(batch), self.conv2.gate_values(batch)
        z_fc1, z_fc2 = self.fc1.gate_values((batch,)), self.fc2.gate_values((batch,))
        channels1, channels2 = _open_index(z_conv1), _open_index(z_conv2)
        weight = self.conv1.weight.index_select(0, channels1)
        hidden = self.conv1.gated_conv(input, z_conv1.index_select(-1, channels1), weight, _select(self.conv1.bias, 0, channels1))
        hidden = self.pool(torch.relu(hidden))
        weight = self.conv2.weight.index_select(0, channels2).index_select(1, channels1)
        hidden = self.conv2.gated_conv(hidden, z_conv2.index_select(-1, channels2), weight, _select(self.conv2.bias, 0, channels2))
        hidden = self.pool(torch.relu(hidden)).flatten(1)
        # fc1's input features of the open conv2 channels, in flatten order; then those fc1's gates leave open
        per_channel = self.fc1.in_features // self.conv2.out_channels
        features = (channels2[:, None] * per_channel + torch.arange(per_channel, device=input.device)).flatten()
        kept = _open_index(z_fc1.index_select(-1, features))
        columns, rows = features.index_select(0, kept), _open_index(z_fc2)
        weight = self.fc1.weight.index_select(1, columns).index_select(0, rows)
        hidden = self.fc1.gated_linear(hidden.index_select(1, kept), z_fc1.index_select(-1, columns), weight,
                                       _select(self.fc1.bias, 0, rows))
        hidden = torch.relu(hidden)
        return self.fc2.gated_linear(hidden, z_fc2.index_select(-1, rows), self.fc2.weight.index_select(1, rows), self.fc2.bias)

    def architecture(self) -> str:
        """The paper's notation, e.g. ``20-50-800-500 -> 20-25-45-462``."""
        before = f"20-50-{self.fc1.in_features}-500"
        kept = [self.conv1.open_units(), self.conv2.open_units(), self.fc1.open_units(), self.fc2.open_units()]
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

