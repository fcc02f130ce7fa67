"""l0sparse.register_rule: a rule for a user's own layer, added from outside the library (issue #24, item 2).

The layer below is unknown to l0sparse: a learned per-channel scale. Without a rule, torch.fx traces through it
into a product with an untracked parameter and locks the channels, so the Linear before it cannot lose output
units. With the rule (written here, as a user would) the channels pass through it, prune slices its scale, and
the pruned model gives the gated model's outputs, on the torch.fx path and on the torch.export path alike.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import l0sparse
import l0sparse.core.graph

ATEN = torch.ops.aten


class ChannelScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return x * self.scale


class ChannelScaleRule(l0sparse.ModuleRule):
    """A follower of the channels it scales: one entry per channel, and a zero channel stays zero."""

    kinds = (ChannelScale,)
    aten = (ATEN.mul.Tensor,)

    def trace(self, trace, node, name, module, source) -> bool:
        if source is None or source.block != 1 or source.dim != len(trace.shape(node.args[0])) - 1:
            return False
        trace.follow(node, name, source)
        return True

    def slice(self, module, rows=None, columns=None, entries=None) -> None:
        module.scale.data = module.scale.data[torch.as_tensor(entries, dtype=torch.long)].clone()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), ChannelScale(10), nn.ReLU(), nn.Linear(10, 3))


def _close_half(model: nn.Module) -> None:
    with torch.no_grad():
        for gate in l0sparse.find_gates(model):
            gate.log_alpha.copy_(torch.where(torch.arange(gate.log_alpha.numel()) % 2 == 0, 5.0, -5.0))


def test_without_a_rule_the_unknown_layer_locks_the_channels():
    with pytest.raises(ValueError, match=r"cannot gate the output channels of '0': .*untracked tensor"):
        l0sparse.sparsify(_model(), {"0": "out", "3": "skip"}, example_inputs=torch.randn(2, 6))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_registered_rule_lets_prune_remove_channels_through_the_user_layer(tracer, monkeypatch):
    if tracer == "export":
        def no_fx(self, root, concrete_args=None):
            raise RuntimeError("torch.fx switched off for this test")

        monkeypatch.setattr(l0sparse.core.graph._Tracer, "trace", no_fx)
    x = torch.randn(8, 6)
    with l0sparse.register_rule(ChannelScaleRule()):
        model = _model()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*(cannot gate|no rule supports)")  # the channels are no longer locked
            l0sparse.sparsify(model, {"0": "out", "3": "skip"}, example_inputs=x)
        _close_half(model)
        model.eval()
        pruned = l0sparse.prune(model, x)
        expected_flops = l0sparse.CostModel(model, x).costs(deterministic=True)["flops"]
        pruned_flops = l0sparse.count_flops(pruned, x)
    scale = next(m for m in pruned.modules() if isinstance(m, ChannelScale))
    assert scale.scale.numel() == 5  # half of the 10 channels closed, and the scale lost their entries
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))
    assert float(expected_flops) == pruned_flops == 6 * 5 + 5 * 3


def test_the_handle_removes_the_rule():
    handle = l0sparse.register_rule(ChannelScaleRule())
    assert isinstance(l0sparse.core.ops.module_rule(ChannelScale(3)), ChannelScaleRule)
    handle.remove()
    assert l0sparse.core.ops.module_rule(ChannelScale(3)) is None


def test_a_function_rule_maps_its_aten_ops_while_registered():
    """hardsigmoid has no built-in rule: registered, its ATen op reads as the function; removed, it does not."""
    class Hardsigmoid(l0sparse.FunctionRule):
        functions = frozenset({nn.functional.hardsigmoid})
        aten = {ATEN.hardsigmoid.default: nn.functional.hardsigmoid}

    assert ATEN.hardsigmoid.default not in l0sparse.core.ops.aten_as_torch()
    with l0sparse.register_rule(Hardsigmoid()):
        assert l0sparse.core.ops.aten_as_torch()[ATEN.hardsigmoid.default] is nn.functional.hardsigmoid
    assert ATEN.hardsigmoid.default not in l0sparse.core.ops.aten_as_torch()


@pytest.mark.parametrize("rule, error, match", [
    (ChannelScaleRule, TypeError, r"register_rule: rule must be an instance .* \(a class: pass an instance\)"),
    ("scale", TypeError, r"register_rule: rule must be an instance of l0sparse.ModuleRule or l0sparse.FunctionRule, got str"),
    (l0sparse.ModuleRule(), ValueError, r"rule.kinds must be a non-empty tuple of module classes"),
    (l0sparse.FunctionRule(), ValueError, r"must name the functions, methods or ATen ops"),
])
def test_bad_rules_are_refused_by_name(rule, error, match):
    with pytest.raises(error, match=match):
        l0sparse.register_rule(rule)
