"""l0sparse: learn sparse networks with L0 regularization (Louizos, Welling & Kingma, 2018)."""

from .costs import expected_l0, penalty
from .distributions import HardConcrete
from .gates import PAPER_LOG_ALPHA_RANGE, Gate
from .layers import L0Conv2d, L0Linear
from .models import L0LeNet5, L0MLP

__all__ = [
    "HardConcrete",
    "Gate",
    "PAPER_LOG_ALPHA_RANGE",
    "L0Linear",
    "L0Conv2d",
    "L0MLP",
    "L0LeNet5",
    "expected_l0",
    "penalty",
]
__version__ = "0.1.0"
