"""The rules: one per kind of operation, saying how it is traced into channel spaces, sliced by prune, and counted.

:func:`l0sparse.core.graph.trace_channels` walks a graph and hands each node to the rule of its module
(:func:`module_rule`) or function (:func:`function_rule`); :func:`l0sparse.prune` slices a module through its
rule's :meth:`ModuleRule.slice`; :class:`l0sparse.CostModel` and :func:`l0sparse.count_flops` count through the
rules. Anything without a rule locks the channels it reads.

A rule's ``trace`` receives the trace (:class:`Trace`: the moves it may make on the spaces), the node, and the
channels of the node's first argument (``source``: a space, the dimension that holds its channels, and the
features per channel after a flatten), and returns False when it does not apply, which locks the channels as
an unknown operation would.

The built-in rules live one family a module (``weights``, ``norms``, ``elementwise``, ``shapes``, ``attention``);
:func:`register_rule` adds one from outside the library, ahead of them.
"""

from __future__ import annotations

from torch import fx, nn

from ..sites import raw_tensor

from .attention import (AtenProducts, AttentionRule, EncoderLayerRule, ScaledDotProductAttention, attention_cost, attention_layout,
                        attention_module_is_plain, inline_encoder, remove_heads, scaled_dot_product_macs)
from .base import FunctionRule, ModuleRule, Trace, flatten, node_inputs, set_submodule
from .elementwise import BinaryFunctions, ChannelwiseFunctions, ChannelwiseRule, ScalarFunctions
from . import fused, heads
from .fused import FusedHeads, FusedUnits, fused_rows, quantities, set_attributes, unit_rows
from .heads import (declared_head_count, grouped_heads_kept, grouped_projections, query_key_value, record_pruned_heads, set_head_count,
                    set_kv_groups)
from .norms import BatchNormRule, ChannelLayerNormRule, GroupNormRule
from .shapes import FlattenFunctions, FlattenRule, PermuteFunctions, ReduceFunctions, ReshapeFunctions, ShapeQueries
from .weights import ConvRule, LinearRule, WeightProduct, is_depthwise

__all__ = [
    "Trace", "ModuleRule", "FunctionRule", "WeightProduct", "LinearRule", "ConvRule", "BatchNormRule", "GroupNormRule",
    "ChannelLayerNormRule", "ChannelwiseRule", "FlattenRule", "AttentionRule", "EncoderLayerRule", "ScalarFunctions",
    "register_rule", "RuleHandle", "module_rule", "weight_product", "input_dim", "function_rule", "aten_owners", "aten_as_torch",
    "user_rule_applies", "node_inputs", "is_depthwise", "flatten", "set_submodule",
    "attention_cost", "attention_layout", "attention_module_is_plain", "scaled_dot_product_macs", "inline_encoder", "remove_heads",
    "head_layouts", "declared_head_count", "set_head_count", "record_pruned_heads", "query_key_value", "grouped_projections",
    "grouped_heads_kept", "set_kv_groups", "FusedHeads", "FusedUnits", "fused_head_layout", "fused_rows", "fused_unit_layouts",
    "quantities", "set_attributes", "unit_rows", "weight_widths",
]

_BUILT_IN_MODULE_RULES: tuple[ModuleRule, ...] = (
    LinearRule(), ConvRule(), BatchNormRule(), GroupNormRule(), ChannelLayerNormRule(), ChannelwiseRule(), FlattenRule(),
    AttentionRule(), EncoderLayerRule(),
)
_BUILT_IN_FUNCTION_RULES: tuple[FunctionRule, ...] = (
    ChannelwiseFunctions(), ScalarFunctions(), BinaryFunctions(), FlattenFunctions(), PermuteFunctions(), ReshapeFunctions(),
    ReduceFunctions(), ShapeQueries(), ScaledDotProductAttention(), AtenProducts(),
)
# rules added with register_rule, newest first: they are asked before the built-in ones
_user_module_rules: list[ModuleRule] = []
_user_function_rules: list[FunctionRule] = []
# the order in which rules are asked, rebuilt only when a rule comes or goes (CostModel asks on every step)
_asked: dict[str, tuple] = {"modules": _BUILT_IN_MODULE_RULES, "functions": _BUILT_IN_FUNCTION_RULES}


def _reorder() -> None:
    _asked["modules"] = (*_user_module_rules, *_BUILT_IN_MODULE_RULES)
    _asked["functions"] = (*_user_function_rules, *_BUILT_IN_FUNCTION_RULES)


class RuleHandle:
    """What :func:`register_rule` returns: ``remove()`` takes the rule out again (as a hook's handle does)."""

    def __init__(self, rule: ModuleRule | FunctionRule, registry: list) -> None:
        self.rule, self._registry = rule, registry

    def remove(self) -> None:
        if self.rule in self._registry:
            self._registry.remove(self.rule)
            _reorder()

    def __enter__(self) -> RuleHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def register_rule(rule: ModuleRule | FunctionRule) -> RuleHandle:
    """Teach l0sparse an operation: ``rule`` is asked before the built-in rules from now on; returns a handle
    whose ``remove()`` (or a ``with`` block) takes it out.

    A :class:`ModuleRule` covers module classes (``kinds``): how a call is traced (``trace``), sliced by prune
    (``slice``), counted by :func:`l0sparse.count_flops` (``dense_macs``), and which ATen ops such a module makes
    from its input under torch.export (``aten``), so that an exported graph is read at the module's level. The
    modules of a registered rule are leaves of torch.fx's trace. A :class:`FunctionRule` covers functions and
    tensor methods (``functions``, ``methods``) and maps the ATen ops that stand for them (``aten``: op -> function).

    Raises:
        TypeError: ``rule`` is no ModuleRule or FunctionRule instance.
        ValueError: it covers nothing (empty ``kinds``, or no functions, methods or ATen ops).
    """
    if isinstance(rule, ModuleRule):
        if not (isinstance(rule.kinds, tuple) and rule.kinds and all(isinstance(kind, type) for kind in rule.kinds)):
            raise ValueError(f"register_rule: rule.kinds must be a non-empty tuple of module classes, got {rule.kinds!r}")
        registry: list = _user_module_rules
    elif isinstance(rule, FunctionRule):
        if not (rule.functions or rule.methods or rule.aten):
            raise ValueError("register_rule: a FunctionRule must name the functions, methods or ATen ops it covers "
                             "(rule.functions, rule.methods, rule.aten)")
        registry = _user_function_rules
    else:
        raise TypeError(f"register_rule: rule must be an instance of l0sparse.ModuleRule or l0sparse.FunctionRule, got "
                        f"{type(rule).__name__}" + (" (a class: pass an instance)" if isinstance(rule, type) else ""))
    registry.insert(0, rule)
    _reorder()
    return RuleHandle(rule, registry)


def _module_rules() -> tuple[ModuleRule, ...]:
    return _asked["modules"]


def _function_rules() -> tuple[FunctionRule, ...]:
    return _asked["functions"]


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of ``module``'s kind, or None (an operation the analysis does not know)."""
    return next((rule for rule in _module_rules() if rule.applies(module)), None)


def user_rule_applies(module: nn.Module) -> bool:
    """Whether a rule added with :func:`register_rule` covers ``module`` (torch.fx then keeps it a leaf)."""
    return any(rule.leaf and rule.applies(module) for rule in _user_module_rules)


def weight_product(module: nn.Module) -> WeightProduct | None:
    """The rule of a Linear or convolution (what mixes channels through a weight), else None."""
    rule = module_rule(module)
    return rule if isinstance(rule, WeightProduct) else None


def input_dim(module: nn.Module) -> int:
    """The dimension of ``module``'s weight that holds its input columns, as its rule says (:attr:`WeightProduct.in_dim`):
    1 for Linear and convolutions (and anything without a weight-product rule), 0 for a transposed weight."""
    rule = weight_product(module)
    return rule.in_dim if rule is not None else 1


def aten_owners() -> dict:
    """ATen op -> the module rules whose modules make it (their ``applies`` says which modules own such a node)."""
    owners: dict = {}
    for rule in _module_rules():
        for op in rule.aten:
            owners[op] = owners.get(op, ()) + (rule,)
    return owners


def aten_as_torch() -> dict:
    """ATen op -> the torch function a function rule knows it as (same argument order), over every rule."""
    mapping: dict = {}
    for rule in reversed(_function_rules()):  # a registered rule's mapping wins
        mapping.update(rule.aten)
    return mapping


def function_rule(node: fx.Node) -> FunctionRule | None:
    """The rule of a call_function / call_method node, or None."""
    for rule in _function_rules():
        if (node.op == "call_function" and node.target in rule.functions) or (node.op == "call_method" and node.target in rule.methods):
            return rule
    return None


def fused_head_layout(owner: str, attention: nn.Module) -> dict | None:
    """The fused head layout that the rule of ``attention`` (named ``owner``) gives (:func:`fused.fused_head_layout`), or None."""
    return fused.fused_head_layout(owner, attention, module_rule(attention), weight_widths)


def weight_widths(module: nn.Module) -> tuple[int, int]:
    """(output rows, input columns) of a weight product's weight, as its rule stores them (:func:`input_dim`); a gated
    weight is read without running its parametrization (which would draw a gate sample)."""
    columns, shape = input_dim(module), raw_tensor(module, "weight").shape
    return shape[1 - columns], shape[columns]


def fused_unit_layouts(model: nn.Module) -> dict[str, dict]:
    """:func:`fused.fused_unit_layouts` through the registered rules."""
    return fused.fused_unit_layouts(model, module_rule)


def head_layouts(model: nn.Module) -> dict[str, dict]:
    """:func:`heads.head_layouts`, fused projections laid out by the registered rules (:class:`FusedHeads`)."""
    return heads.head_layouts(model, fused_head_layout)
