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


def test_fit_clamps_log_alpha_where_the_gates_ask_and_gives_the_gates_their_lr():
    """fit takes run_training's steps: the clamp is each gate's own setting, and gate_lr reaches log α alone."""
    from l0sparse.data import load_digits_split

    data = load_digits_split()
    torch.manual_seed(0)
    clamped = l0sparse.L0MLP((64, 16, 10), clamp_log_alpha=l0sparse.PAPER_LOG_ALPHA_RANGE)
    l0sparse.train.fit(clamped, data.x_train, data.y_train, epochs=1, lr=0.2, lam=5.0, progress=False)
    low, high = l0sparse.PAPER_LOG_ALPHA_RANGE
    for gate in l0sparse.find_gates(clamped):
        assert low - 1e-6 <= float(gate.log_alpha.detach().min()) and float(gate.log_alpha.detach().max()) <= high + 1e-6
    torch.manual_seed(0)
    model = l0sparse.L0MLP((64, 16, 10))
    weights_before = [p.detach().clone() for name, p in model.named_parameters() if "log_alpha" not in name]
    log_alpha_before = [g.log_alpha.detach().clone() for g in l0sparse.find_gates(model)]
    l0sparse.train.fit(model, data.x_train, data.y_train, epochs=1, lr=1e-12, gate_lr=0.05, lam=1.0, progress=False)
    weights_after = [p.detach() for name, p in model.named_parameters() if "log_alpha" not in name]
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(weights_before, weights_after))
    assert any(not torch.allclose(a, g.log_alpha.detach()) for a, g in zip(log_alpha_before, l0sparse.find_gates(model)))


def test_fit_stops_at_a_non_finite_loss_naming_epoch_and_step():
    from l0sparse.data import load_digits_split

    data = load_digits_split()
    x = data.x_train.clone()
    x[70] = float("nan")  # in the second batch of 64 of some permutation: the step is named, whichever it is
    with pytest.raises(l0sparse.train.TrainingDiverged, match=r"the loss is nan at epoch 1, step \d+: lower lr"):
        l0sparse.train.fit(l0sparse.L0MLP((64, 16, 10)), x, data.y_train, epochs=1, progress=False)


def test_the_package_has_no_import_cycle():
    """Data flows one way (DESIGN.md §3): no module imports, even lazily inside a function, one that imports it back."""
    import re
    from pathlib import Path

    package = Path(l0sparse.__file__).parent
    imports = {path.stem: set(re.findall(r"^\s*from \.(\w+) import", path.read_text(), re.M)) - {path.stem}
               for path in package.glob("*.py")}

    def reaches(start: str, goal: str, seen: set) -> bool:
        for name in imports.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    assert [name for name in imports if reaches(name, name, set())] == []
    assert "train" not in imports["report"] and "train" not in imports["runs"]
