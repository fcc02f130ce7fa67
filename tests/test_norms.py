import math

import pytest
import torch
from torch import nn

from l0sparse.core.norms import lk_norm, lk_penalty, sparsity, threshold_


def test_lk_norm_by_hand():
    x = torch.tensor([3.0, -4.0, 0.0, 0.0])
    assert float(lk_norm(x, 0)) == 2
    assert float(lk_norm(x, 1)) == 7
    assert float(lk_norm(x, 2)) == pytest.approx(5.0)
    assert float(lk_norm(x, 3)) == pytest.approx((27 + 64) ** (1 / 3))
    assert float(lk_norm(x, 1.5)) == pytest.approx((3**1.5 + 4**1.5) ** (1 / 1.5))
    assert float(lk_norm(x, math.inf)) == 4


@pytest.mark.parametrize("q", [-1, 0.5, float("nan"), "2", True])
def test_lk_norm_rejects_bad_q(q):
    with pytest.raises(ValueError, match="q"):
        lk_norm(torch.ones(3), q)


def test_penalties_by_hand():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 2.0]]))
    model = nn.Sequential(layer)
    assert float(lk_penalty(model, "l1", 0.5, N=5)) == pytest.approx(0.5 * 5 / 5)
    assert float(lk_penalty(model, "l2", 1.0)) == pytest.approx(0.5 * 9)
    # groups are input columns: [1, 0] and [-2, 2]
    assert float(lk_penalty(model, "group_l1", 1.0)) == pytest.approx(math.sqrt(2) * (1 + math.sqrt(8)))
    with pytest.raises(ValueError, match="regularizer"):
        lk_penalty(model, "l3", 1.0)
    with pytest.raises(ValueError, match="lam"):
        lk_penalty(model, "l1", -1.0)


def test_threshold_and_sparsity():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-4, 0.5, 2e-4], [-1e-4, 0.3, 1.0]]))
    model = nn.Sequential(layer)
    threshold_(model, "l1", 1e-3)
    assert torch.equal(layer.weight, torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.3, 1.0]]))
    assert sparsity(model) == {"weights_kept": 3 / 6, "units_kept": 2 / 3}
    threshold_(model, "group_l1", 0.6)  # column RMS: 0, 0.412, 0.707
    assert layer.weight[:, 1].abs().sum() == 0 and layer.weight[1, 2] == 1.0


@pytest.mark.slow
def test_l1_training_drives_weights_to_zero_and_l2_does_not():
    torch.manual_seed(0)
    x = torch.randn(200, 10)
    # noise gives the irrelevant weights least-squares values of order 0.5/√200 ≈ 0.035
    y = x[:, :2].sum(1, keepdim=True) + 0.5 * torch.randn(200, 1)
    results = {}
    for regularizer in ("l1", "l2"):
        model = nn.Sequential(nn.Linear(10, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3000):
            loss = ((model(x) - y) ** 2).mean() + lk_penalty(model, regularizer, 0.2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # subgradient steps leave L1's zeros oscillating within lr·λ = 0.002 of 0: the tolerance sits above that
        threshold_(model, regularizer, 5e-3)
        results[regularizer] = sparsity(model)["weights_kept"]
    # L1 keeps (about) the two relevant weights; L2 shrinks the irrelevant ones but leaves most of them non-zero
    assert results["l1"] <= 0.3 and results["l2"] >= 0.8
