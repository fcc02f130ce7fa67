"""The paper's layers: L0Linear (input-feature gates) and L0Conv2d (output-channel gates).

Penalty convention (DESIGN.md §1, as in the paper's code): ``penalty(lam,
weight_decay)`` returns Σ_g P(z_g ≠ 0) · Σ_{j∈g} (λ + ½·wd·θ_j²), an
unnormalised sum with λ charged per weight. The per-example training
objective is ``mean_loss + penalty / N`` with N the training-set size, so the
paper's "λ = 0.1/N" is ``lam=0.1`` here, divided by N in the objective.

FLOPs convention: multiply-accumulates (MACs) of the weight product for one
example, bias additions and activations not counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .gates import Gate, accumulation_dtype, check_lam, is_positive_int

__all__ = ["L0Layer", "L0Linear", "L0Conv2d", "conv2d_output_size"]


def _check_sizes(**sizes) -> None:
    """ValueError naming the first of ``sizes`` that is not a positive int."""
    for name, value in sizes.items():
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_pair(name: str, value, minimum: int = 1) -> None:
    """``value`` is an int >= minimum or a pair of them (kernel_size, stride, dilation, padding)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    ok = len(values) in (1, 2) and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values)
    if not ok:
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")


def conv2d_output_size(
    height_width: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a 2-D convolution, as ``torch.nn.Conv2d`` computes it."""
    if padding == "same":
        return tuple(height_width)
    if padding == "valid":
        padding = (0, 0)
    return tuple(
        (size + 2 * pad - dil * (k - 1) - 1) // s + 1
        for size, k, s, pad, dil in zip(height_width, kernel_size, stride, padding, dilation)
    )


class L0Layer(nn.Module):
    """What the paper's layers share: their own ``gate`` multiplies their own tensors along one dimension.

    ``gated_dim`` is the weight dimension the gate indexes, ``gated_tensors`` the tensors it multiplies
    (and pays λ for), ``ungated_l2`` those the penalty's L2 term covers with no gate (L0Linear's bias).
    :mod:`l0sparse.core.sites` reads these; :meth:`plain` is the layer :func:`l0sparse.prune` leaves.
    """

    gate: Gate
    gated_dim: int
    gated_tensors: tuple[str, ...] = ("weight",)
    ungated_l2: tuple[str, ...] = ()

    def plain(self) -> nn.Module:
        """The plain PyTorch layer this one computes in eval mode, the deterministic gates folded into its weights."""
        raise NotImplementedError


class L0Linear(L0Layer):
    """Fully connected layer with one Hard Concrete gate per input feature (the paper's choice).

    A closed input gate removes a whole column of the weight matrix, and with
    it the previous layer's unit that feeds it.

    Args:
        in_features, out_features, bias: as in :class:`torch.nn.Linear`.
        per_example_noise: in training, draw an independent gate sample for
            every example (the default; the paper's code does this only with
            its ``local_rep`` option). ``False`` draws one sample per step,
            shared by the batch and folded into the weight: the paper's
            code's default, and cheaper per step. On the paper's 100-epoch
            Fashion-MNIST MLP both reach the same error; on short budgets
            per-example noise is clearly better (docs/math.md, "Noise").
            Eval mode always uses the deterministic gate.
        **gate_kwargs: ``beta``, ``gamma``, ``zeta``, ``droprate_init``,
            ``clamp_log_alpha`` of :class:`l0sparse.Gate`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        per_example_noise: bool = True,
        device=None,
        dtype=None,
        **gate_kwargs,
    ) -> None:
        super().__init__()
        _check_sizes(in_features=in_features, out_features=out_features)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.per_example_noise = per_example_noise
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.gate = Gate(in_features, **gate_kwargs).to(**factory)
        self.reset_parameters()

    gated_dim = 1  # input columns
    ungated_l2 = ("bias",)  # input gates do not remove the bias: the penalty charges it the L2 term alone

    @torch.no_grad()
    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None).to(self.weight)
        linear.weight.copy_(self.weight * self.gate.deterministic())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def reset_parameters(self) -> None:
        # the same initialisation as nn.Linear, so a swap changes only the gates
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def gate_values(self, batch_shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The gates this forward multiplies by: ``batch_shape + (in_features,)`` per-example samples in
        training with ``per_example_noise``, else one ``(in_features,)`` vector (a sample, or Eq. 13 in eval)."""
        return self.gate(batch_shape) if self.per_example_noise and self.training else self.gate()

    def forward(self, input: Tensor) -> Tensor:
        return self.gated_linear(input, self.gate_values(input.shape[:-1]), self.weight, self.bias)

    @staticmethod
    def gated_linear(input: Tensor, z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear`` with input gates ``z``: per-example gates scale the input, a shared vector the weight."""
        if z.dim() > 1:
            return F.linear(input * z, weight, bias)
        return F.linear(input, weight * z, bias)

    def group_size(self) -> int:
        """Weights controlled by one gate: a column of the weight matrix."""
        return self.out_features

    def penalty(self, lam: float, weight_decay: float = 0.0) -> Tensor:
        """Σ_j P(z_j ≠ 0) · Σ_i (λ + ½·wd·W_ij²) + ½·wd·Σ b².

        λ is per weight; divide the result by N, the training-set size, in
        the per-example objective. The bias is not gated by input gates, so
        it carries only the L2 term.
        """
        lam, weight_decay = check_lam(lam, weight_decay)  # numpy and 0-d tensor scalars as floats
        dtype = accumulation_dtype(self.weight.dtype)
        per_gate = lam * self.group_size()
        if weight_decay:  # skip a pass over the weights (forward and backward) when there is no L2 term
            per_gate = per_gate + 0.5 * weight_decay * self.weight.to(dtype).pow(2).sum(0)
        total = (self.gate.prob_nonzero().to(dtype) * per_gate).sum()
        if self.bias is not None and weight_decay:
            total = total + 0.5 * weight_decay * self.bias.to(dtype).pow(2).sum()
        return total

    def expected_flops(self, input_shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Expected MACs for one example of shape ``(..., in_features)`` (no batch dimension)."""
        input_shape = tuple(input_shape)
        if not input_shape or input_shape[-1] != self.in_features:
            raise ValueError(f"input_shape must end with in_features={self.in_features}, got {input_shape}")
        positions = math.prod(input_shape[:-1])
        return positions * self.out_features * self.gate.expected_l0()

    def open_units(self) -> int:
        """Input features whose deterministic gate is open."""
        return int(self.gate.is_open().sum())


    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class L0Conv2d(L0Layer):
    """2-D convolution with one Hard Concrete gate per output channel.

    The bias is gated with its channel in training and in eval alike, so a
    closed channel outputs exactly zero (the paper's code dropped the bias in
    training but added it at evaluation).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias: as in :class:`torch.nn.Conv2d` (zero padding only).
        per_example_noise, **gate_kwargs: as in :class:`L0Linear`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        per_example_noise: bool = True,
        device=None,
        dtype=None,
        **gate_kwargs,
    ) -> None:
        super().__init__()
        _check_sizes(in_channels=in_channels, out_channels=out_channels, groups=groups)
        _check_pair("kernel_size", kernel_size)
        _check_pair("stride", stride)
        _check_pair("dilation", dilation)
        if not isinstance(padding, str):
            _check_pair("padding", padding, minimum=0)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if padding == "same" and self.stride != (1, 1):  # as torch.nn.Conv2d: "same" is only defined for stride 1
            raise ValueError(f"padding='same' needs stride 1, got stride={stride!r}: give the padding as numbers instead")
        self.per_example_noise = per_example_noise
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.gate = Gate(out_channels, **gate_kwargs).to(**factory)
        self.reset_parameters()

    gated_dim = 0  # output channels: a filter and its bias
    gated_tensors = ("weight", "bias")

    @torch.no_grad()
    def plain(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                         self.groups, bias=self.bias is not None).to(self.weight)
        z_hat = self.gate.deterministic()
        conv.weight.copy_(self.weight * z_hat[:, None, None, None])
        if self.bias is not None:
            conv.bias.copy_(self.bias * z_hat)
        return conv

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _conv(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def gate_values(self, batch_size: int) -> Tensor:
        """``(batch_size, out_channels)`` per-example samples in training with ``per_example_noise``,
        else one ``(out_channels,)`` vector (a sample, or Eq. 13 in eval)."""
        return self.gate((batch_size,)) if self.per_example_noise and self.training else self.gate()

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 3:  # one unbatched (C, H, W) example, as nn.Conv2d accepts: C is not a batch size
            return self.forward(input.unsqueeze(0)).squeeze(0)
        return self.gated_conv(input, self.gate_values(input.shape[0]), self.weight, self.bias)

    def gated_conv(self, input: Tensor, z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's convolution with output-channel gates ``z`` on ``weight`` (all or some of its channels)."""
        if z.dim() > 1:
            return self._conv(input, weight, bias) * z[:, :, None, None]
        return self._conv(input, weight * z[:, None, None, None], None if bias is None else bias * z)

    def group_size(self) -> int:
        """Weights controlled by one gate: the channel's filter, plus its bias."""
        return self.weight[0].numel() + (self.bias is not None)

    def penalty(self, lam: float, weight_decay: float = 0.0) -> Tensor:
        """Σ_c P(z_c ≠ 0) · Σ_{j ∈ channel c, bias included} (λ + ½·wd·θ_j²); divide by N in the objective."""
        lam, weight_decay = check_lam(lam, weight_decay)  # numpy and 0-d tensor scalars as floats
        dtype = accumulation_dtype(self.weight.dtype)
        per_gate = lam * self.group_size()
        if weight_decay:
            squares = self.weight.to(dtype).pow(2).flatten(1).sum(1)
            if self.bias is not None:
                squares = squares + self.bias.to(dtype).pow(2)
            per_gate = per_gate + 0.5 * weight_decay * squares
        return (self.gate.prob_nonzero().to(dtype) * per_gate).sum()

    def output_size(self, input_shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        """(H_out, W_out) for one example of shape ``(in_channels, H, W)``."""
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            raise ValueError(f"input_shape must be (in_channels={self.in_channels}, H, W) without the batch, got {input_shape}")
        return conv2d_output_size(input_shape[1:], self.kernel_size, self.stride, self.padding, self.dilation)

    def expected_flops(self, input_shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Expected MACs for one example of shape ``(in_channels, H, W)``: Σ_c P(z_c≠0) · (C_in/groups)·k_h·k_w·H_out·W_out."""
        height, width = self.output_size(input_shape)
        per_channel = self.weight[0].numel() * height * width
        return per_channel * self.gate.expected_l0()

    def open_units(self) -> int:
        """Output channels whose deterministic gate is open."""
        return int(self.gate.is_open().sum())


    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )
