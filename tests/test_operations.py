"""Norms over the channels, each one rule in l0sparse.core.ops: GroupNorm and a channels-last LayerNorm.

What is exact (docs/design.md, "Norms over the channels"): a gate on the consumers closes a channel after
the norm, so its consumer columns always go; its producer rows and norm entries go only with their whole
group (a GroupNorm's statistics are per group; a LayerNorm over C is one group). A closed L0Conv2d channel
is a zero *before* the norm, which still counts in the mean and variance, so it is never removed.
"""

import json

import pytest
import torch
from torch import nn

import l0sparse
from l0sparse import L0Conv2d

# Removing units whose weights are exact zeros changes only the order of float32 sums: each output sums at most
# 8·3·3 = 72 products per layer, whose rounding error grows like √72·eps ≈ 1e-6 of the terms' scale, and a norm
# computes its statistics over the same elements. 1e-5 of the output scale leaves a tenfold margin.
FLOAT32_TOLERANCE = 1e-5


class GroupNormNet(nn.Module):
    """conv → GroupNorm (4 groups of 2 channels) → ReLU → conv → mean → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv1(x)))
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


class ChannelsLastNormNet(nn.Module):
    """ConvNeXt's pattern: conv → channels-last LayerNorm over C → Linear (a 1×1 conv) → GELU → back → conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.pointwise = nn.Linear(8, 12)
        self.conv2 = nn.Conv2d(12, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.norm(self.conv1(x).permute(0, 2, 3, 1))
        x = nn.functional.gelu(self.pointwise(x)).permute(0, 3, 1, 2)
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


class GatedBeforeNormNet(nn.Module):
    """The paper's L0Conv2d gates its output before the norm."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv1 = L0Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def _randomise_norm_(norm: nn.Module) -> None:
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)


def _close_(gate, channels) -> None:
    with torch.no_grad():
        gate.log_alpha.fill_(3.0)
        gate.log_alpha[list(channels)] = -10.0


def _gate_on(module: nn.Module, owner: str):
    return next(mask.gate for mask in module.parametrizations.weight if mask.gate.owner == owner)


def assert_prunes_exactly(model: nn.Module, x: torch.Tensor, **prune_kwargs) -> nn.Module:
    """Equal outputs, fewer or equal parameters, and CostModel's deterministic counts equal the pruned model's."""
    model.eval()
    pruned = l0sparse.prune(model, x, **prune_kwargs)
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    assert float((expected - got).abs().max()) <= FLOAT32_TOLERANCE * float(expected.abs().max())
    if not prune_kwargs:
        costs = l0sparse.CostModel(model, x).costs(deterministic=True)
        assert float(costs["flops"]) == l0sparse.count_flops(pruned, x)
        assert float(costs["params"]) == l0sparse.count_params(pruned)
    return pruned


def test_group_norm_loses_whole_closed_groups_only():
    torch.manual_seed(0)
    model = GroupNormNet()
    _randomise_norm_(model.norm)
    x = torch.randn(4, 3, 6, 6)
    l0sparse.sparsify(model, example_inputs=x)
    # groups 1 and 3 closed whole, group 0 in part (channel 0): its statistics need channel 0
    _close_(_gate_on(model.conv2, "conv1"), [0, 2, 3, 6, 7])
    pruned = assert_prunes_exactly(model, x)
    norm = pruned.get_submodule("norm")
    assert (norm.num_groups, norm.num_channels) == (2, 4)  # two channels per group, as before
    assert pruned.get_submodule("conv1").out_channels == 4
    assert pruned.get_submodule("conv2").in_channels == 3  # channel 0's closed column goes after the norm
    assert l0sparse.count_params(pruned) < l0sparse.count_params(GroupNormNet())


def test_group_norm_plan_rebuilds_and_rounds_in_whole_groups(tmp_path):
    torch.manual_seed(1)
    model = GroupNormNet()
    x = torch.randn(4, 3, 6, 6)
    l0sparse.sparsify(model, example_inputs=x)
    _close_(_gate_on(model.conv2, "conv1"), [2, 3, 4, 5, 6, 7])
    pruned = assert_prunes_exactly(model, x, round_to=4)  # rounded up to 4 channels: two whole groups
    assert (pruned.get_submodule("norm").num_groups, pruned.get_submodule("norm").num_channels) == (2, 4)
    pruned, plan = l0sparse.prune(model, x, return_plan=True)
    assert pruned.get_submodule("norm").num_groups == 1
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    torch.manual_seed(1)
    fresh = l0sparse.rebuild(GroupNormNet(), json.loads((tmp_path / "plan.json").read_text()), x)
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(fresh(x), pruned(x))


def test_channels_last_layer_norm_keeps_its_channels_and_drops_closed_columns_after_it():
    torch.manual_seed(2)
    model = ChannelsLastNormNet()
    _randomise_norm_(model.norm)
    x = torch.randn(4, 3, 6, 6)
    l0sparse.sparsify(model, rules={"pointwise": "out"}, example_inputs=x)
    _close_(_gate_on(model.pointwise, "conv1"), [1, 5])  # after the norm: the norm still reads all 8 channels
    _close_(_gate_on(model.conv2, "pointwise"), [0, 1, 2, 3])
    pruned = assert_prunes_exactly(model, x)
    assert pruned.get_submodule("conv1").out_channels == 8 and pruned.get_submodule("norm").normalized_shape == (8,)
    assert pruned.get_submodule("pointwise").in_features == 6  # its closed columns, picked by an index_select
    assert (pruned.get_submodule("pointwise").out_features, pruned.get_submodule("conv2").in_channels) == (8, 8)


def test_a_layer_norm_over_more_than_the_channels_locks_them():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([8, 4, 4]), nn.Flatten(), nn.Linear(128, 2))
    with pytest.raises(ValueError, match="LayerNorm '1' reads it"):
        l0sparse.sparsify(model, rules={"0": "out"}, example_inputs=torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(4, 8), lambda: nn.BatchNorm2d(8)], ids=["groupnorm", "batchnorm"])
def test_a_channel_closed_before_the_norm_is_kept(norm):
    """A closed L0Conv2d channel is a zero that the norm's statistics count (and its β makes non-zero): it stays."""
    torch.manual_seed(3)
    model = GatedBeforeNormNet(norm())
    _randomise_norm_(model.norm)
    _close_(model.conv1.gate, [2, 3])  # a whole group
    x = torch.randn(4, 3, 6, 6)
    pruned = assert_prunes_exactly(model, x)
    assert pruned.get_submodule("conv1").out_channels == 8


@pytest.mark.parametrize("net", ["groupnorm", "layernorm"])
def test_norm_rules_hold_on_the_torch_export_path(net, monkeypatch):
    """The same rules read torch.export's ATen graph (aten.group_norm, aten.layer_norm, aten.permute)."""

    def no_fx(self, root, concrete_args=None):
        raise RuntimeError("torch.fx switched off for this test")

    monkeypatch.setattr(l0sparse.core.graph._Tracer, "trace", no_fx)
    torch.manual_seed(4)
    model = GroupNormNet() if net == "groupnorm" else ChannelsLastNormNet()
    _randomise_norm_(model.norm)
    x = torch.randn(4, 3, 6, 6)
    l0sparse.sparsify(model, rules=None if net == "groupnorm" else {"pointwise": "out"}, example_inputs=x)
    if net == "groupnorm":
        _close_(_gate_on(model.conv2, "conv1"), [0, 2, 3, 6, 7])
    else:
        _close_(_gate_on(model.conv2, "pointwise"), [0, 1, 2, 3])
    pruned = assert_prunes_exactly(model, x)
    assert type(pruned) is type(model)  # sliced in place: the export path
    if net == "groupnorm":
        assert (pruned.norm.num_groups, pruned.conv1.out_channels) == (2, 4)
    else:
        assert (pruned.conv1.out_channels, pruned.pointwise.out_features) == (8, 8)
