"""One meaning of λ: a gate pays for the weights it removes in the layer that owns it, whichever way it was made.

The paper's layers (L0Linear, L0Conv2d) and sparsify gates on plain layers, at equal log α and weights,
give equal penalties: λ term and ½·wd·θ² term alike (DESIGN.md §1, "who pays").
"""

import pytest
import torch
from torch import nn

import l0sparse
from l0sparse import L0Conv2d, L0LeNet5, L0Linear, Penalty, sparsify
from l0sparse.core.models import LeNet5


def _gate_of(module: nn.Module):
    return module.parametrizations.weight[0].gate


def _random_log_alpha_(*gates) -> None:
    with torch.no_grad():
        for gate in gates:
            gate.log_alpha.normal_(0.0, 2.0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.7])
def test_conv_output_gates_cost_the_same_on_both_paths(weight_decay):
    torch.manual_seed(0)
    paper = L0Conv2d(3, 6, 3)
    plain = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))  # the second conv reads the gated channels
    plain[0].load_state_dict({"weight": paper.weight.detach(), "bias": paper.bias.detach()})
    sparsify(plain, rules={"0": "out", "2": "skip"}, example_inputs=torch.randn(2, 3, 9, 9))
    _random_log_alpha_(paper.gate)
    with torch.no_grad():
        _gate_of(plain[2]).log_alpha.copy_(paper.gate.log_alpha)
    expected = float(paper.penalty(1.3, weight_decay))
    assert float(Penalty(plain, 1.3, weight_decay)()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.7])
def test_linear_input_gates_cost_the_same_on_both_paths(weight_decay):
    torch.manual_seed(1)
    paper = L0Linear(7, 5, bias=False)
    plain = nn.Sequential(nn.Linear(7, 5, bias=False))
    plain[0].weight.data.copy_(paper.weight.detach())
    sparsify(plain, rules={"0": "in"})
    _random_log_alpha_(paper.gate)
    with torch.no_grad():
        _gate_of(plain[0]).log_alpha.copy_(paper.gate.log_alpha)
    assert float(Penalty(plain, 0.4, weight_decay)()) == pytest.approx(float(paper.penalty(0.4, weight_decay)), rel=1e-6)


def test_lenet5_costs_the_same_gated_either_way():
    """L0LeNet5 against the plain LeNet5 with the same gates made by sparsify: conv1 and conv2 pay for their
    filters and biases (not for the columns of conv2 and fc1 that read them), fc1 and fc2 for their columns.
    The fully connected biases are zero here: only the paper's layers charge ½·wd·b² for a bias no gate removes."""
    torch.manual_seed(2)
    paper = L0LeNet5()
    plain = LeNet5()
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc1", "fc2"):
            getattr(plain, name).weight.copy_(getattr(paper, name).weight)
            getattr(plain, name).bias.copy_(getattr(paper, name).bias)
        for name in ("fc1", "fc2"):
            getattr(plain, name).bias.zero_()
            getattr(paper, name).bias.zero_()
    sparsify(plain, rules={"conv1": "out", "conv2": "out", "fc1": "in", "fc2": "in"}, example_inputs=torch.randn(2, 1, 28, 28))
    _random_log_alpha_(*(layer.gate for layer in (paper.conv1, paper.conv2, paper.fc1, paper.fc2)))
    with torch.no_grad():
        _gate_of(plain.conv2).log_alpha.copy_(paper.conv1.gate.log_alpha)  # conv1's channels, gated where conv2 reads them
        # fc1 holds two gates: conv2's channels (16 columns each) and its own inputs
        masks = list(plain.fc1.parametrizations.weight)
        by_owner = {mask.gate.owner: mask.gate for mask in masks}
        by_owner["conv2"].log_alpha.copy_(paper.conv2.gate.log_alpha)
        by_owner["fc1"].log_alpha.copy_(paper.fc1.gate.log_alpha)
        _gate_of(plain.fc2).log_alpha.copy_(paper.fc2.gate.log_alpha)
    for weight_decay in (0.0, 0.3):
        expected = float(l0sparse.penalty(paper, 0.1, weight_decay, N=60000))
        assert float(l0sparse.penalty(plain, 0.1, weight_decay, N=60000)) == pytest.approx(expected, rel=1e-6)


def test_half_precision_penalty_is_accumulated_in_float32():
    """λ·weights summed over LeNet-5's gates (about 1.1e6 at λ = 1) overflows float16 (max 65504) before the
    division by N; the sum is accumulated in float32."""
    import copy

    model = L0LeNet5()
    reference = float(l0sparse.penalty(copy.deepcopy(model).double(), 1.0, N=60000))
    value = l0sparse.penalty(model.half(), 1.0, N=60000)
    assert torch.isfinite(value)
    # log α (|log α| < 1 at initialisation) rounds to 2⁻¹¹ relative in float16, and |Δp / p| ≤ (1 − p)·|Δ log α|
    assert float(value) == pytest.approx(reference, rel=2.0 ** -11)
