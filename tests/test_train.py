import pytest
import torch

import l0sparse
from l0sparse.train import ema


def test_ema_averages_log_alpha_like_the_formula():
    torch.manual_seed(0)
    model = l0sparse.L0MLP((4, 3, 2))
    averaged = ema(model, decay=0.9)
    gate = model.l0_layers()[0].gate
    by_hand = gate.log_alpha.detach().clone()
    for step in range(5):
        with torch.no_grad():
            gate.log_alpha.add_(1.0)
        averaged.update_parameters(model)
        # AveragedModel copies on its first update and averages from the second on
        by_hand = gate.log_alpha.detach().clone() if step == 0 else 0.9 * by_hand + 0.1 * gate.log_alpha.detach()
    averaged_gate = averaged.module.l0_layers()[0].gate
    assert torch.allclose(averaged_gate.log_alpha, by_hand, atol=1e-6)
    assert not torch.allclose(averaged_gate.log_alpha, gate.log_alpha)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        ema(l0sparse.L0MLP((4, 3, 2)), decay=1.0)


def test_magnitude_baseline_counts_flops_as_a_physically_smaller_network():
    """The baseline's FLOPs for given widths equal count_flops of a plain network built with those widths."""
    from l0sparse.baselines import _flops_for_widths, _layer_macs
    from l0sparse.models import mlp

    dense, x = mlp((20, 16, 12, 4)), torch.randn(2, 20)
    assert _flops_for_widths(_layer_macs(dense, x), [16, 12], [10, 5]) == l0sparse.count_flops(mlp((20, 10, 5, 4)), x)
