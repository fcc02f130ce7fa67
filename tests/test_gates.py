import math

import pytest
import torch

from l0sparse import PAPER_LOG_ALPHA_RANGE, Gate, HardConcrete


def test_init_follows_the_paper():
    torch.manual_seed(0)
    n = 100_000
    gate = Gate(n, droprate_init=0.2)
    values = gate.log_alpha.detach().double()
    expected_mean = math.log(0.8) - math.log(0.2)
    # mean within 5 SE of log(1-p) - log p; std within 5 SE of 0.01 (SE of a std ≈ σ/√(2n))
    assert abs(values.mean() - expected_mean) <= 5 * 0.01 / math.sqrt(n)
    assert abs(values.std() - 0.01) <= 5 * 0.01 / math.sqrt(2 * n)


def test_droprate_half_does_not_mean_half_closed():
    gate = Gate(1000, droprate_init=0.5)
    assert float(gate.distribution().prob_zero().mean().detach()) == pytest.approx(0.168, abs=1e-3)


def test_training_samples_vary_and_eval_is_deterministic():
    torch.manual_seed(0)
    gate = Gate((3, 5))
    first, second = gate(), gate()
    assert first.shape == (3, 5) and not torch.equal(first, second)
    assert gate((7,)).shape == (7, 3, 5)
    gate.eval()
    expected = HardConcrete(gate.log_alpha.detach()).deterministic()
    assert torch.equal(gate(), expected) and torch.equal(gate(), gate())
    assert gate((7,)).shape == (7, 3, 5) and torch.equal(gate((7,))[4], expected)


def test_per_example_samples_are_independent():
    torch.manual_seed(0)
    gate = Gate(1)
    with torch.no_grad():
        gate.log_alpha.zero_()
    samples = gate((200_000,)).squeeze(1).detach()
    # independent draws: the lag-1 correlation of the sequence is 0 within 5 SE (1/√n)
    a, b = samples[:-1] - samples.mean(), samples[1:] - samples.mean()
    correlation = (a * b).mean() / samples.var()
    assert abs(float(correlation)) <= 5 / math.sqrt(len(samples))


def test_training_samples_hit_zero_and_one_at_predicted_rates():
    torch.manual_seed(1)
    gate = Gate(4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    n = 400_000
    z = gate((n,)).detach().double()
    dist = gate.distribution()
    for closed_form, observed in ((dist.prob_zero(), (z == 0).double().mean(0)), (dist.prob_one(), (z == 1).double().mean(0))):
        closed_form = closed_form.detach().double()
        assert torch.all((observed - closed_form).abs() <= 5 * torch.sqrt(closed_form * (1 - closed_form) / n))


def test_expected_l0_and_is_open():
    gate = Gate(4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-10.0, -2.0, 0.0, 10.0]))
    assert float(gate.expected_l0().detach()) == pytest.approx(float(gate.prob_nonzero().sum().detach()))
    # Eq. 13 opens a gate when sigmoid(log α)·1.2 - 0.1 > 0, i.e. log α > log(1/11) ≈ -2.398
    assert gate.is_open().tolist() == [False, True, True, True]


def test_one_name_each_for_finding_gates_and_for_an_open_gate():
    """#15: costs.gates (read like the module l0sparse.core.gates), is_active and active_units were renamed, not aliased."""
    import l0sparse

    assert l0sparse.find_gates is l0sparse.core.sites.find_gates and not hasattr(l0sparse.core.costs, "gates")
    layer = l0sparse.L0Linear(3, 2)
    assert layer.open_units() == 3 and not hasattr(layer, "active_units") and not hasattr(layer.gate, "is_active")


def test_open_reward_raises_log_alpha_and_penalty_lowers_it():
    torch.manual_seed(0)
    rewarded, penalised = Gate(50), Gate(50)
    start = rewarded.log_alpha.detach().clone(), penalised.log_alpha.detach().clone()
    opt = torch.optim.SGD(list(rewarded.parameters()) + list(penalised.parameters()), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        loss = -rewarded().sum() + penalised.expected_l0()
        loss.backward()
        assert torch.isfinite(rewarded.log_alpha.grad).all() and torch.isfinite(penalised.log_alpha.grad).all()
        opt.step()
    assert torch.all(rewarded.log_alpha > start[0]) and torch.all(penalised.log_alpha < start[1])


def test_clamp():
    gate = Gate(3, clamp_log_alpha=PAPER_LOG_ALPHA_RANGE)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-50.0, 0.0, 50.0]))
    gate.clamp_()
    assert gate.log_alpha.tolist() == pytest.approx([math.log(1e-2), 0.0, math.log(1e2)])
    unclamped = Gate(1)
    with torch.no_grad():
        unclamped.log_alpha.fill_(50.0)
    assert float(unclamped.clamp_().log_alpha) == 50.0


@pytest.mark.parametrize(
    "kwargs, name",
    [({"droprate_init": 0.0}, "droprate_init"), ({"droprate_init": 1.0}, "droprate_init"), ({"beta": -1}, "beta"),
     ({"gamma": 0.2}, "gamma"), ({"zeta": 0.9}, "zeta"), ({"clamp_log_alpha": (1.0, -1.0)}, "clamp_log_alpha")],
)
def test_gate_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Gate(3, **kwargs)


def test_gate_rejects_empty_shape():
    with pytest.raises(ValueError, match="shape"):
        Gate((3, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gate(dtype):
    gate = Gate(64).to(dtype)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-30, 30, 64))
    z = gate((1000,))
    assert z.dtype == dtype and torch.isfinite(z).all()
    z.float().sum().backward()
    assert torch.isfinite(gate.log_alpha.grad).all()
