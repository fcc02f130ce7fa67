"""l0sparse.training.build: the model a config names (per-layer droprates) and the EMA copy."""

import pytest
import torch

import l0sparse
from l0sparse.training.build import ema

from configs import quick_config


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


def test_per_layer_droprates_start_each_layer_where_asked():
    import math

    from l0sparse.training.data import load_dataset
    from l0sparse.training.build import model_for

    config = quick_config(droprate_init=[0.2, 0.5])
    model = model_for(config, load_dataset("digits"))
    means = [float(layer.gate.log_alpha.mean()) for layer in model.l0_layers()]
    # log α₀ = log(1 − p) − log p, jittered by N(0, 0.01²): the mean of ≥ 16 gates is within 4 standard errors
    for mean, rate, count in zip(means, (0.2, 0.5), (64, 16)):
        assert abs(mean - math.log((1 - rate) / rate)) <= 4 * 0.01 / math.sqrt(count)
    with pytest.raises(ValueError, match="droprate_init"):
        model_for(quick_config(droprate_init=[0.2, 0.5, 0.5]), load_dataset("digits"))
    with pytest.raises(ValueError, match="droprate_init"):
        quick_config(droprate_init=[0.2, 1.5])
