"""HardConcrete against its closed forms (DESIGN.md §1), by Monte Carlo and by hand."""

import math

import pytest
import torch
from scipy import integrate

from l0sparse import HardConcrete

N_SAMPLES = 1_000_000
Z_SCORE = 5.0  # tolerances are Z_SCORE standard errors of the Monte Carlo estimate
LOG_ALPHAS = [-6.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0]
BETAS = [0.1, 2.0 / 3.0, 1.5]
INTERIOR = [0.1, 0.25, 0.5, 0.75, 0.9]


def binomial_tolerance(p: torch.Tensor, n: int) -> torch.Tensor:
    return Z_SCORE * torch.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module", params=BETAS, ids=lambda b: f"beta={b:.3g}")
def monte_carlo(request):
    beta = request.param
    log_alpha = torch.tensor(LOG_ALPHAS, dtype=torch.float64)
    dist = HardConcrete(log_alpha, beta=beta)
    torch.manual_seed(1234)
    samples = dist.sample((N_SAMPLES,))
    return dist, samples


def test_prob_zero_and_one_match_frequencies(monte_carlo):
    dist, samples = monte_carlo
    for closed_form, observed in ((dist.prob_zero(), (samples == 0).double().mean(0)), (dist.prob_one(), (samples == 1).double().mean(0))):
        assert torch.all((observed - closed_form).abs() <= binomial_tolerance(closed_form, N_SAMPLES))


def test_point_masses_are_not_negligible(monte_carlo):
    """The stretch exists so that z is exactly 0 and exactly 1 with positive probability."""
    _, samples = monte_carlo
    assert (samples == 0).any(0).all() and (samples == 1).any(0).all()


def test_cdf_matches_empirical_cdf(monte_carlo):
    dist, samples = monte_carlo
    for x in INTERIOR:
        closed_form = dist.cdf(torch.tensor(x, dtype=torch.float64))
        observed = (samples <= x).double().mean(0)
        assert torch.all((observed - closed_form).abs() <= binomial_tolerance(closed_form, N_SAMPLES)), x


def test_mean_and_variance_match_samples(monte_carlo):
    dist, samples = monte_carlo
    standard_error = samples.std(0) / math.sqrt(N_SAMPLES)
    assert torch.all((samples.mean(0) - dist.mean).abs() <= Z_SCORE * standard_error)
    # variance of the sample variance ≈ (m4 - σ⁴)/n
    centred = samples - samples.mean(0)
    var_se = torch.sqrt(((centred**4).mean(0) - samples.var(0) ** 2) / N_SAMPLES)
    assert torch.all((samples.var(0) - dist.variance).abs() <= Z_SCORE * var_se)


def test_samples_lie_in_the_unit_interval(monte_carlo):
    _, samples = monte_carlo
    assert samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("log_alpha", [-4.0, 0.0, 2.5])
def test_quadrature_mean_matches_adaptive_integration(log_alpha, beta):
    dist = HardConcrete(torch.tensor(log_alpha, dtype=torch.float64), beta=beta)

    def survival(x):
        return 1.0 - float(dist.cdf(torch.tensor(x, dtype=torch.float64)))

    reference, error = integrate.quad(survival, 0.0, 1.0, epsabs=1e-13)
    assert abs(float(dist.mean) - reference) <= 1e-10 + error


def test_closed_forms_by_hand():
    """The numbers DESIGN.md quotes, computed from the formulas with math, not torch."""
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    dist = HardConcrete(torch.tensor([0.0, 2.0], dtype=torch.float64))

    def sig(t):
        return 1 / (1 + math.exp(-t))

    threshold = beta * math.log(-gamma / zeta)
    assert threshold == pytest.approx(-1.5986, abs=1e-4)
    assert dist.prob_nonzero().tolist() == pytest.approx([sig(0.0 - threshold), sig(2.0 - threshold)], rel=1e-12)
    # droprate_init 0.5 means log α = 0, and then P(z = 0) is 0.168, not 0.5
    assert float(dist.prob_zero()[0]) == pytest.approx(0.168, abs=5e-4)
    p_one = sig(2.0 - beta * math.log((1 - gamma) / (zeta - 1)))
    assert float(dist.prob_one()[1]) == pytest.approx(p_one, rel=1e-12)
    assert (dist.prob_zero() + dist.prob_nonzero()).tolist() == pytest.approx([1.0, 1.0], abs=1e-15)


def test_paper_clamp_range_bounds_prob_nonzero():
    dist = HardConcrete(torch.tensor([math.log(1e-2), math.log(1e2)], dtype=torch.float64))
    assert dist.prob_nonzero().tolist() == pytest.approx([0.047, 0.998], abs=5e-4)


def test_deterministic_is_equation_13_exactly():
    log_alpha = torch.linspace(-8, 8, 101, dtype=torch.float64)
    dist = HardConcrete(log_alpha, beta=0.3)  # β must not enter Eq. 13
    expected = [min(1.0, max(0.0, (1 / (1 + math.exp(-a))) * 1.2 - 0.1)) for a in log_alpha.tolist()]
    assert dist.deterministic().tolist() == pytest.approx(expected, abs=1e-15)
    assert torch.equal(dist.deterministic(), dist.deterministic())
    assert float(HardConcrete(torch.tensor(0.0)).deterministic()) == pytest.approx(0.5, abs=1e-7)


def test_everything_increases_with_log_alpha():
    """Large log α means the gate is more likely OPEN."""
    dist = HardConcrete(torch.linspace(-6, 6, 25, dtype=torch.float64))
    for quantity in (dist.prob_nonzero(), dist.prob_one(), dist.mean, dist.deterministic()):
        assert torch.all(quantity.diff() >= 0)
    assert torch.all(dist.prob_zero().diff() < 0)
    assert torch.all(dist.cdf(torch.tensor(0.5, dtype=torch.float64)).diff() < 0)


def test_temperature_divides_in_sampler():
    """With a tiny β the concrete sample is almost binary: few samples fall strictly inside (0, 1)."""
    torch.manual_seed(0)
    cold = HardConcrete(torch.zeros(100_000), beta=0.01).sample()
    warm = HardConcrete(torch.zeros(100_000), beta=2.0).sample()

    def inside(z):
        return ((z > 0) & (z < 1)).float().mean()

    assert inside(cold) < 0.05 < 0.5 < inside(warm)


def test_cdf_ends():
    dist = HardConcrete(torch.tensor([-1.0, 1.0]))
    assert torch.equal(dist.cdf(torch.tensor(1.0)), torch.ones(2))
    assert torch.equal(dist.cdf(torch.tensor(-0.5)), torch.zeros(2))
    assert torch.allclose(dist.cdf(torch.tensor(0.0)), dist.prob_zero())


def test_broadcasting_and_shapes():
    dist = HardConcrete(torch.zeros(3, 4))
    assert dist.batch_shape == (3, 4)
    assert dist.rsample((5,)).shape == (5, 3, 4)
    assert dist.mean.shape == (3, 4)
    assert dist.cdf(torch.full((2, 1, 1), 0.5)).shape == (2, 3, 4)
    expanded = dist.expand((2, 3, 4))
    assert expanded.sample().shape == (2, 3, 4)
    scalar = HardConcrete(0.0)
    assert scalar.batch_shape == () and scalar.sample((7,)).shape == (7,)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"), ({"gamma": 0.0}, "gamma"), ({"gamma": 0.1}, "gamma"),
     ({"zeta": 1.0}, "zeta"), ({"zeta": 0.5}, "zeta"), ({"beta": float("nan")}, "beta")],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HardConcrete(torch.zeros(2), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_log_alpha_rejected(bad):
    with pytest.raises(ValueError, match="log_alpha"):
        HardConcrete(torch.tensor([0.0, bad]), validate_args=True)


@pytest.mark.parametrize("log_alpha", [-100.0, -30.0, 30.0, 100.0])
def test_extreme_log_alpha_is_finite(log_alpha):
    param = torch.full((1000,), log_alpha, requires_grad=True)
    dist = HardConcrete(param)
    values = [dist.rsample(), dist.prob_zero(), dist.prob_nonzero(), dist.prob_one(), dist.deterministic(), dist.mean,
              dist.variance, dist.cdf(torch.tensor(0.3))]
    for value in values:
        assert torch.isfinite(value).all()
    sum(v.sum() for v in values).backward()
    assert torch.isfinite(param.grad).all()
    expected = 1.0 if log_alpha > 0 else 0.0
    assert torch.all(dist.sample() == expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_log_alpha_samples_without_nan(dtype):
    param = torch.linspace(-8, 8, 64).to(dtype).requires_grad_()
    torch.manual_seed(0)
    z = HardConcrete(param).rsample((2000,))
    assert z.dtype == dtype and torch.isfinite(z).all() and z.min() >= 0 and z.max() <= 1
    z.sum().backward()
    assert torch.isfinite(param.grad).all()


def test_noise_is_drawn_in_float32_for_half(monkeypatch):
    seen = []
    original = torch.rand

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", spy)
    HardConcrete(torch.zeros(4, dtype=torch.float16)).rsample()
    HardConcrete(torch.zeros(4, dtype=torch.float64)).rsample()
    assert seen == [torch.float32, torch.float64]


def test_rsample_gradient_flows_to_log_alpha():
    param = torch.zeros(10_000, requires_grad=True)
    torch.manual_seed(0)
    HardConcrete(param).rsample().sum().backward()
    assert torch.isfinite(param.grad).all() and param.grad.sum() > 0
    # the clamp makes the gradient exactly zero where the sample is exactly 0 or 1
    assert (param.grad == 0).any()


def _reference_sample(log_alpha, logistic_noise, beta, gamma, zeta):
    """The sampler written as plain autograd ops, as DESIGN.md §1 states it."""
    return torch.clamp(torch.sigmoid((logistic_noise + log_alpha) / beta) * (zeta - gamma) + gamma, 0.0, 1.0)


@pytest.mark.parametrize("beta", BETAS, ids=lambda b: f"beta={b:.3g}")
def test_fused_sampler_matches_plain_autograd(beta):
    """Values and log α gradients of the fused sampler equal the plain-op formula on the same noise,
    including the broadcast over a sample dimension and the zero gradient where the clamp holds."""
    from l0sparse.core.distributions import _StretchedClampedSigmoid

    torch.manual_seed(0)
    log_alpha = torch.linspace(-4, 4, 33, dtype=torch.float64, requires_grad=True)
    noise = torch.logit(torch.rand(64, 33, dtype=torch.float64), eps=1e-6)
    weights = torch.randn(64, 33, dtype=torch.float64)  # an arbitrary downstream loss
    fused = _StretchedClampedSigmoid.apply(log_alpha, noise, beta, -0.1, 1.1)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), log_alpha)
    reference = _reference_sample(log_alpha, noise, beta, -0.1, 1.1)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), log_alpha)
    assert ((fused == 0) | (fused == 1)).any() and ((fused > 0) & (fused < 1)).any()  # both regimes exercised
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(fused, reference, rtol=0, atol=16 * eps)
    # each gradient is a sum of 64 products that agree to a few ulps
    torch.testing.assert_close(fused_grad, reference_grad, rtol=64 * eps, atol=64 * eps * 64)
    assert torch.autograd.gradcheck(lambda a: _StretchedClampedSigmoid.apply(a, noise[:4], beta, -0.1, 1.1), (log_alpha,))


def test_fused_sampler_gradient_in_half_precision_has_the_parameter_dtype():
    param = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)
    HardConcrete(param).rsample((5,)).float().sum().backward()
    assert param.grad.dtype == torch.bfloat16 and param.grad.shape == param.shape
