"""Gate: an ``nn.Module`` that owns the log α of a set of Hard Concrete gates."""

from __future__ import annotations

import math
import numbers
from numbers import Integral

import torch
from torch import Tensor, nn

from .distributions import HardConcrete, check_hyperparameters, deterministic_gates, prob_nonzero, sample_gates

__all__ = ["Gate", "PAPER_LOG_ALPHA_RANGE", "is_positive_int", "check_positive_ints", "check_lam", "accumulation_dtype"]

#: The paper's code clamps log α to [log 1e-2, log 1e2] after every step.
PAPER_LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))

_INIT_JITTER_STD = 0.01


def is_positive_int(value) -> bool:
    """An integer >= 1 (Python or NumPy), not a bool and not a float that happens to be whole."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def check_positive_ints(name: str, value) -> tuple[int, ...]:
    """``value`` (an int or a sequence of them) as a tuple of positive ints; ValueError naming ``name`` otherwise."""
    values = (value,) if isinstance(value, Integral) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if values is None or not all(is_positive_int(v) for v in values):
        raise ValueError(f"{name} must be a positive int or a sequence of positive ints, got {value!r}")
    return tuple(int(v) for v in values)


def as_number(value, integral: bool = False):
    """``value`` as a Python float (int if ``integral``): numpy scalars and 0-d tensors are numbers too (issue #27);
    bools, strings, None and tensors of several entries are not (None: the caller says what is allowed)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
        return None
    return int(value) if integral else float(value)


def check_lam(lam: float, weight_decay: float) -> tuple[float, float]:
    """λ and the weight decay of a penalty as floats; ValueError unless both are finite numbers >= 0."""
    number = as_number(lam)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    decay = as_number(weight_decay)
    if decay is None or not math.isfinite(decay) or decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    return number, decay


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions (a sum of λ·weights overflows float16), the dtype itself when wider."""
    return torch.promote_types(dtype, torch.float32)


class Gate(nn.Module):
    """A tensor of Hard Concrete gates with learnable log α.

    In training mode ``gate()`` returns one sample per call (shared by the
    whole batch) and ``gate(sample_shape)`` independent samples of shape
    ``sample_shape + shape``; in eval mode both return the deterministic
    test-time gate (Eq. 13), expanded to the requested shape.

    Args:
        shape: shape of ``log_alpha`` (one gate per entry).
        beta, gamma, zeta: temperature and stretch limits (DESIGN.md §1).
        droprate_init: initial drop rate p of the paper's code, in (0, 1):
            log α₀ = log(1-p) - log p plus N(0, 0.01²) jitter. This does NOT
            make P(z = 0) equal p (at p = 0.5 it is 0.168).
        clamp_log_alpha: ``None`` (default: no clamp) or a ``(low, high)``
            range that :meth:`clamp_` enforces; the paper's code used
            :data:`PAPER_LOG_ALPHA_RANGE` after every optimizer step.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...] | torch.Size,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        droprate_init: float = 0.5,
        clamp_log_alpha: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        check_hyperparameters(beta, gamma, zeta)
        if not (isinstance(droprate_init, (int, float)) and 0.0 < droprate_init < 1.0):
            raise ValueError(f"droprate_init must be in the open interval (0, 1), got {droprate_init!r}")
        if clamp_log_alpha is not None:
            pair = tuple(clamp_log_alpha) if isinstance(clamp_log_alpha, (tuple, list)) else ()
            low, high = pair if len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair) else (math.nan, math.nan)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"clamp_log_alpha must be None or a finite (low, high) with low < high, got {clamp_log_alpha!r}")
        shape = torch.Size(check_positive_ints("shape", shape))
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.droprate_init = float(droprate_init)
        self.clamp_log_alpha = None if clamp_log_alpha is None else (float(low), float(high))
        self.log_alpha = nn.Parameter(torch.empty(shape))
        # set by l0sparse.sparsify: the module whose rule made this gate, the granularity, and for output-unit
        # gates the layers whose rows it removes (a tuple, so they are not registered as submodules)
        self.owner: str | None = None
        self.granularity: str | None = None
        self.producers: tuple[nn.Module, ...] = ()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        p = self.droprate_init
        with torch.no_grad():
            self.log_alpha.normal_(math.log(1 - p) - math.log(p), _INIT_JITTER_STD)

    @property
    def shape(self) -> torch.Size:
        return self.log_alpha.shape

    def distribution(self, index: Tensor | None = None) -> HardConcrete:
        """The gates' HardConcrete; ``index`` selects a subset of them (along the first dimension)."""
        log_alpha = self.log_alpha if index is None else self.log_alpha[index]
        # log α is a trained parameter; checking its finiteness would sync every step.
        return HardConcrete(log_alpha, self.beta, self.gamma, self.zeta, validate_args=False)

    def forward(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        # the distribution's functions called directly: building a HardConcrete each step costs more than the math
        if self.training:
            return sample_gates(self.log_alpha, sample_shape, self.beta, self.gamma, self.zeta)
        return deterministic_gates(self.log_alpha, self.gamma, self.zeta).expand(torch.Size(sample_shape) + self.shape)

    def prob_nonzero(self) -> Tensor:
        """P(z ≠ 0) per gate, differentiable in log α."""
        return prob_nonzero(self.log_alpha, self.beta, self.gamma, self.zeta)

    def expected_l0(self) -> Tensor:
        """Σ P(z ≠ 0): the expected number of open gates."""
        return self.prob_nonzero().sum()

    @torch.no_grad()
    def deterministic(self) -> Tensor:
        """The test-time gate values (Eq. 13), without gradient."""
        return deterministic_gates(self.log_alpha, self.gamma, self.zeta)

    @torch.no_grad()
    def is_open(self) -> Tensor:
        """Boolean mask: the deterministic gate is > 0 (the gate is *open*: its unit survives pruning)."""
        return self.deterministic() > 0


    @torch.no_grad()
    def clamp_(self) -> Gate:
        """Clamp log α into ``clamp_log_alpha`` in place; a no-op when it is None."""
        if self.clamp_log_alpha is not None:
            self.log_alpha.clamp_(*self.clamp_log_alpha)
        return self

    def extra_repr(self) -> str:
        return (
            f"shape={tuple(self.shape)}, beta={self.beta:g}, gamma={self.gamma:g}, zeta={self.zeta:g}, "
            f"droprate_init={self.droprate_init:g}"
        )
