"""l0sparse.core.costs: the deterministic counts against the pruned model's, count_flops, and the penalty (penalty,
Penalty, expected_l0, λ per layer, cost weights)."""

import pytest
import torch

import l0sparse
from l0sparse import L0MLP, expected_l0, penalty

from models import CASES, PreNormAttentionNet, build


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_costs_equal_the_pruned_models_counts(case):
    model, x = build(case)
    pruned = l0sparse.prune(model, x)
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    # exact integers, except where sequence-first attention divides by the length (a float32 ratio)
    assert float(costs["flops"]) == pytest.approx(l0sparse.count_flops(pruned, x), rel=4 * torch.finfo(torch.float32).eps)
    assert float(costs["params"]) == l0sparse.count_params(pruned)


def test_sequence_first_attention_is_counted_per_entry_of_the_first_dimension():
    """(length, batch, features) inputs: every count is per position, so the two layouts differ by batch / length."""
    torch.manual_seed(0)
    first, seq_first = PreNormAttentionNet().eval(), PreNormAttentionNet(batch_first=False).eval()
    seq_first.load_state_dict(first.state_dict())
    x = torch.randn(3, 5, 16)
    assert l0sparse.count_flops(seq_first, x.transpose(0, 1)) == pytest.approx(l0sparse.count_flops(first, x) * 3 / 5, rel=1e-12)


def test_model_level_penalty_and_expected_l0():
    model = L0MLP((10, 8, 3))
    layers = model.l0_layers()
    assert float(expected_l0(model)) == pytest.approx(sum(float(layer.gate.expected_l0()) for layer in layers), rel=1e-6)
    assert float(penalty(model, 0.5, 0.1, N=7)) == pytest.approx(sum(float(layer.penalty(0.5, 0.1)) for layer in layers) / 7, rel=1e-6)
    with pytest.raises(ValueError, match="N"):
        penalty(model, 0.5, N=0)
    with pytest.raises(ValueError, match="no l0sparse gates"):
        expected_l0(torch.nn.Linear(2, 2))


def test_prepared_penalty_follows_the_parameters_and_mixed_temperatures():
    """A Penalty built once equals the per-layer sum after the weights and log α have moved,
    also when the layers' gates have different β (they are summed in separate groups)."""
    from l0sparse import Penalty

    torch.manual_seed(0)
    model = L0MLP((10, 8, 3))
    first, second = model.l0_layers()
    second.gate.beta = 0.3
    prepared = Penalty(model, 0.5, 0.1, N=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (model(torch.randn(5, 10)).square().sum() + prepared()).backward()
        optimizer.step()
    expected = (first.penalty(0.5, 0.1) + second.penalty(0.5, 0.1)) / 7
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(prepared(), expected, rtol=16 * eps, atol=0)


def test_prepared_penalty_gradient_matches_plain_autograd():
    """Penalty's written-out backward gives what autograd gives through the per-layer penalties (float64)."""
    from l0sparse import Penalty

    torch.manual_seed(0)
    model = L0MLP((10, 8, 3)).double()
    for layer in model.l0_layers():
        with torch.no_grad():
            layer.gate.log_alpha.normal_(0.0, 3.0)
    prepared = Penalty(model, 0.5, N=7)
    prepared().backward()
    fused = [layer.gate.log_alpha.grad.clone() for layer in model.l0_layers()]
    model.zero_grad()
    (sum(layer.penalty(0.5) for layer in model.l0_layers()) / 7).backward()
    eps = torch.finfo(torch.float64).eps
    for layer, grad in zip(model.l0_layers(), fused):
        torch.testing.assert_close(grad, layer.gate.log_alpha.grad, rtol=16 * eps, atol=16 * eps * float(grad.abs().max()))
    # and a finite-difference check of the node itself
    log_alphas = [layer.gate.log_alpha.detach().clone().requires_grad_() for layer in model.l0_layers()]
    charge = torch.rand(sum(t.numel() for t in log_alphas), dtype=torch.float64)
    function = l0sparse.core.costs._ChargedProbNonzero.apply
    assert torch.autograd.gradcheck(lambda *tensors: function(-2.3, charge, *tensors), log_alphas)


def test_penalty_with_a_lambda_per_layer():
    model = L0MLP((10, 8, 3))
    first, second = model.l0_layers()
    separate = penalty(model, {"layers.0": 2.0, "layers.*": 0.5})
    expected = first.penalty(2.0) + second.penalty(0.5)
    assert float(separate) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="no entry for the gates of 'layers.2'"):
        penalty(model, {"layers.0": 1.0})
    with pytest.raises(ValueError, match="lam"):
        penalty(model, {"*": -1.0})


def test_cost_weighted_penalty_is_lambda_times_the_linearised_cost():
    from l0sparse import CostModel

    torch.manual_seed(0)
    model = L0MLP((6, 5, 3))
    x = torch.randn(2, 6)
    cost_model = CostModel(model, x)
    weights = cost_model.gate_costs("flops")
    first, second = model.l0_layers()
    # closing one input of the first layer saves its 5 MACs; one input of the second saves its 3 MACs
    # plus the first layer's row that fed it (6 MACs)
    assert torch.equal(weights[id(first.gate)], torch.full((6,), 5.0))
    assert torch.equal(weights[id(second.gate)], torch.full((5,), 3.0 + 6.0))
    value = penalty(model, 0.1, cost_weights=weights)
    by_hand = 0.1 * (5 * first.gate.prob_nonzero().sum() + 9 * second.gate.prob_nonzero().sum())
    assert float(value) == pytest.approx(float(by_hand), rel=1e-6)
    with pytest.raises(ValueError, match="cost_weights has no entry"):
        penalty(L0MLP((6, 5, 3)), 0.1, cost_weights=weights)
