"""l0sparse.core.sparsify: where the gates go (rules, granularities, shared gates) and what it refuses."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import l0sparse
from l0sparse.core.sparsify import GateMask

from models import GlobalPoolNet, OwnAttentionNet, TinyResNet, assert_same_outputs, build, mlp


def test_sparsify_keeps_the_users_class_and_documents_state_dict_keys():
    model = TinyResNet()
    l0sparse.sparsify(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert type(model) is TinyResNet
    keys = model.state_dict().keys()
    assert "block.conv1.parametrizations.weight.original" in keys
    assert "block.conv1.parametrizations.weight.0.gate.log_alpha" in keys
    assert isinstance(model.block.conv1, nn.Conv2d)


def test_residual_channels_share_one_gate():
    model = TinyResNet()
    l0sparse.sparsify(model, example_inputs=torch.randn(2, 3, 8, 8))
    # the stem and the block's second conv write the same residual channels; their readers share a gate
    residual_gate = model.block.conv1.parametrizations.weight[0].gate
    fc_gates = [m.gate for m in model.fc.parametrizations.weight if isinstance(m, GateMask)]
    assert any(g is residual_gate for g in fc_gates)
    assert residual_gate.owner == "stem" and residual_gate.granularity == "out"
    # one sample per use in training, one value everywhere in eval
    model.eval()
    assert torch.equal(model.block.conv1.parametrizations.weight[0].mask(model.block.conv1.weight).flatten(),
                       residual_gate().flatten())


def test_heads_of_a_hand_written_attention_module():
    model, x = build("own-attention")
    gates = [m.gate for m in model.attn.proj.parametrizations.weight]
    assert len(gates) == 1 and gates[0].shape == (4,) and gates[0].granularity == "heads"
    assert not parametrize.is_parametrized(model.attn.qkv)  # the rule's module gets no other gates
    with torch.no_grad():
        gates[0].log_alpha.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))  # heads 1 and 3 closed
    kept = int(gates[0].is_open().sum())
    assert kept == 2
    pruned = l0sparse.prune(model, x)
    assert_same_outputs(model, pruned, x)
    assert pruned.attn.proj.in_features == kept * 4  # the closed heads' columns are gone
    with pytest.raises(ValueError, match="inputs divisible by 3"):
        l0sparse.sparsify(OwnAttentionNet(), rules={"attn": ("heads", 3)}, example_inputs=x)
    with pytest.raises(ValueError, match="number_of_heads"):
        l0sparse.sparsify(OwnAttentionNet(), rules={"attn": ("heads", 0)})


def test_bad_rules_and_inputs_are_named():
    with pytest.raises(ValueError, match="'heads' does not apply to '0'"):
        l0sparse.sparsify(mlp(), rules={"0": "heads"})
    with pytest.raises(ValueError, match="grouped"):
        l0sparse.sparsify(GlobalPoolNet(), rules={"grouped": "in"}, example_inputs=torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="granularity must be one of"):
        l0sparse.sparsify(mlp(), rules={"0": "rows"})
    with pytest.raises(ValueError, match="example_inputs is required"):
        l0sparse.sparsify(TinyResNet())
    with pytest.raises(ValueError, match="cannot gate the output channels of '4'"):
        l0sparse.sparsify(mlp(), rules={"4": "out"}, example_inputs=torch.randn(2, 20))
    with pytest.warns(UserWarning, match="skipped by rule"):
        l0sparse.sparsify(mlp(), rules={"2": "skip"})
    model, _ = build("mlp")
    with pytest.raises(ValueError, match="expects 20 features"):
        l0sparse.prune(model, torch.randn(2, 21))


def test_default_rules_warn_on_a_locked_conv():
    class ConvNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.norm(self.conv(x))

    with pytest.warns(UserWarning, match="cannot gate the output channels of 'conv'"):
        l0sparse.sparsify(ConvNorm(), example_inputs=torch.randn(1, 3, 6, 6))
