"""l0sparse: learn sparse networks with L0 regularization (Louizos, Welling & Kingma, 2018)."""

from .core.control import TargetController, param_groups
from .core.costs import CostModel, Penalty, count_flops, count_params, expected_flops, expected_l0, expected_params, penalty
from .core.distributions import HardConcrete
from .core.gates import PAPER_LOG_ALPHA_RANGE, Gate
from .core.layers import L0Conv2d, L0Linear
from .core.models import L0LeNet5, L0MLP
from .core.ops import FunctionRule, ModuleRule, register_rule
from .core.prune import PrunePlan, prune, rebuild
from .core.report import architecture, summary
from .core.sites import GateSite, find_gates, gate_sites
from .core.sparsify import sparsify

__all__ = [
    "HardConcrete",
    "Gate",
    "PAPER_LOG_ALPHA_RANGE",
    "L0Linear",
    "L0Conv2d",
    "L0MLP",
    "L0LeNet5",
    "sparsify",
    "find_gates",
    "gate_sites",
    "GateSite",
    "expected_l0",
    "expected_flops",
    "expected_params",
    "CostModel",
    "penalty",
    "Penalty",
    "count_flops",
    "count_params",
    "prune",
    "rebuild",
    "PrunePlan",
    "architecture",
    "summary",
    "TargetController",
    "param_groups",
    "register_rule",
    "ModuleRule",
    "FunctionRule",
]
__version__ = "0.1.0"
