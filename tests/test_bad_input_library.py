"""Bad and extreme inputs to the library (issue #14): each gets a clear error or a right answer, never a silent wrong one.

One table per entry point: (description, call, expected exception, fragment of its message). A failed
call must leave the user's model as it was, train/eval mode included. Focused tests follow the tables.
"""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import l0sparse
from l0sparse.core.sites import find_gates
from l0sparse.core.distributions import EPS, _StretchedClampedSigmoid
from l0sparse.core.prune import _check_same
from l0sparse.sklearn import L0Classifier, L0Regressor
from l0sparse.core.sparsify import gate_masks

from models import mlp

torch.set_num_threads(1)


def gated_mlp() -> nn.Module:
    torch.manual_seed(0)
    return l0sparse.sparsify(mlp())


def with_nan(model: nn.Module, parameter: str) -> nn.Module:
    with torch.no_grad():
        model.get_parameter(parameter).view(-1)[0] = float("nan")
    return model


def with_inf_output() -> nn.Module:
    """Finite weights whose output overflows float32 on a finite input."""
    model = gated_mlp()
    with torch.no_grad():
        model[0].parametrizations.weight.original.fill_(3e38)
    return model


class Twice(nn.Module):
    """``a`` reads the model input and, in the same forward, the output of ``p``: its columns serve both."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.p(x))) + self.a(x)))


class Failing(nn.Module):
    """A model whose own forward fails while copies of it (which prune traces) run."""

    failing: set = set()  # ids of the instances that fail

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if id(self) in Failing.failing:
            raise RuntimeError("the user's forward failed")
        return self.fc(x)


# -- constructors (item 18) --------------------------------------------------------------------------
CONSTRUCTORS = [
    ("Gate with a float shape", lambda: l0sparse.Gate(3.5), "shape must be a positive int"),
    ("Gate with a zero size", lambda: l0sparse.Gate((2, 0)), "shape must be a positive int"),
    ("Gate with a bool shape", lambda: l0sparse.Gate(True), "shape must be a positive int"),
    ("Gate with a string clamp", lambda: l0sparse.Gate(3, clamp_log_alpha="ab"), "clamp_log_alpha must be None or a finite"),
    ("L0Linear with float features", lambda: l0sparse.L0Linear(2.5, 3), "in_features must be a positive int"),
    ("L0Linear with zero outputs", lambda: l0sparse.L0Linear(2, 0), "out_features must be a positive int"),
    ("L0Conv2d with groups=0", lambda: l0sparse.L0Conv2d(3, 4, 3, groups=0), "groups must be a positive int"),
    ("L0Conv2d with a float channel count", lambda: l0sparse.L0Conv2d(3.0, 4, 3), "in_channels must be a positive int"),
    ("L0Conv2d with kernel_size 0", lambda: l0sparse.L0Conv2d(3, 4, 0), "kernel_size must be an int >= 1"),
    ("L0Conv2d with a negative padding", lambda: l0sparse.L0Conv2d(3, 4, 3, padding=-1), "padding must be an int >= 0"),
    ("L0MLP with a fractional width", lambda: l0sparse.L0MLP((5, 2.7, 3)), "sizes must be a positive int"),
    ("L0MLP with one width", lambda: l0sparse.L0MLP((5,)), "at least two positive widths"),
    ("HardConcrete with complex log alpha", lambda: l0sparse.HardConcrete(torch.zeros(2, dtype=torch.complex64)), "log_alpha must be real"),
    # issue #27: β so small that (ζ − γ)/β overflows float32 gave NaN gradients (NaN weights after 20 steps); 1j a TypeError
    ("Gate with beta 1e-40", lambda: l0sparse.Gate(3, beta=1e-40), r"beta \(the temperature\) must be >= \(zeta - gamma\)"),
    ("HardConcrete with beta 1e-40", lambda: l0sparse.HardConcrete(torch.zeros(2), beta=1e-40), "beta"),
    ("HardConcrete with a complex beta", lambda: l0sparse.HardConcrete(torch.zeros(2), beta=1j), "beta must be a finite real number"),
    # accepted before, closing every gate at the first step
    ("TargetController with lr=inf", lambda: l0sparse.TargetController(l0sparse.L0MLP((4, 3, 2)), 0.5, "l0", lr=math.inf),
     "lr must be a finite number > 0"),
    # accepted before (torch refuses it) with a wrong output_size
    ("L0Conv2d with stride 2 and padding 'same'", lambda: l0sparse.L0Conv2d(3, 4, 3, stride=2, padding="same"), "padding='same' needs stride 1"),
    # errors from deep inside that never named the argument
    ("L0LeNet5 with 12-pixel images", lambda: l0sparse.L0LeNet5(image_size=12), "image_size must be an int >= 16"),
    ("L0LeNet5 with no classes", lambda: l0sparse.L0LeNet5(num_classes=0), "num_classes must be a positive int, got 0"),
]


@pytest.mark.parametrize("description, call, fragment", CONSTRUCTORS, ids=[c[0] for c in CONSTRUCTORS])
def test_constructor_junk_is_refused_by_name(description, call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


# -- sparsify (items 5, 17) --------------------------------------------------------------------------
SPARSIFY = [
    ("a second sparsify", lambda: l0sparse.sparsify(gated_mlp()), ValueError, "already has l0sparse gates"),
    ("a name rule that matches nothing", lambda: l0sparse.sparsify(mlp(), {"enc.*": "skip"}), ValueError, r"rules\['enc\.\*'\] matches no module"),
    ("an exact name that matches nothing", lambda: l0sparse.sparsify(mlp(), {"fc9": "in"}), ValueError, "matches no module"),
    ("an empty example batch", lambda: l0sparse.sparsify(mlp(), {"0": "out"}, example_inputs=torch.randn(0, 20)), ValueError, "empty batch"),
    ("example inputs of another dtype", lambda: l0sparse.sparsify(mlp(), {"0": "out"}, example_inputs=torch.randn(2, 20, dtype=torch.float64)),
     ValueError, "is torch.float64 but the model's parameters are torch.float32"),
]


@pytest.mark.parametrize("description, call, error, fragment", SPARSIFY, ids=[c[0] for c in SPARSIFY])
def test_sparsify_bad_input(description, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


def test_a_second_sparsify_leaves_the_model_unchanged():
    model = gated_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="sparsify a model once"):
        l0sparse.sparsify(model, {nn.Linear: "weight"})
    assert len(list(gate_masks(model))) == 3
    assert model.state_dict().keys() == before.keys()


def test_a_type_rule_for_an_absent_type_is_allowed():
    # the training command passes {nn.Linear: ..., nn.Conv2d: ...} for MLPs too
    model = l0sparse.sparsify(mlp(), {nn.Linear: "weight", nn.Conv2d: "weight"})
    assert len(find_gates(model)) == 3


def test_a_failed_explicit_out_rule_registers_no_gate():
    model = mlp()
    with pytest.raises(ValueError, match="cannot gate the output channels of '4'"):
        l0sparse.sparsify(model, {"0": "in", "4": "out"}, example_inputs=torch.randn(2, 20))
    assert not list(gate_masks(model))


@pytest.mark.parametrize("training", [True, False])
def test_a_failed_trace_keeps_the_train_mode(training):
    model = mlp().train(training)
    with pytest.raises(ValueError, match="do not fit the model"):
        l0sparse.sparsify(model, {"0": "out"}, example_inputs=torch.randn(2, 7))
    assert model.training is training
    gated = gated_mlp().train(training)
    with pytest.raises(ValueError, match="do not fit the model"):
        l0sparse.CostModel(gated, torch.randn(2, 7))
    assert gated.training is training


# -- costs (items 6, 17) -----------------------------------------------------------------------------
COSTS = [
    ("CostModel on an empty batch", lambda: l0sparse.CostModel(gated_mlp(), torch.randn(0, 20)), ValueError, "empty batch"),
    ("expected_flops on an empty batch", lambda: l0sparse.expected_flops(gated_mlp(), torch.randn(0, 20)), ValueError, "empty batch"),
    ("count_flops on an empty batch", lambda: l0sparse.count_flops(mlp(), torch.randn(0, 20)), ValueError, "empty batch"),
    ("CostModel on inputs of another dtype", lambda: l0sparse.CostModel(gated_mlp(), torch.randn(2, 20, dtype=torch.float64)),
     ValueError, "cast the inputs"),
    ("CostModel on inputs of another device", lambda: l0sparse.CostModel(gated_mlp(), torch.randn(2, 20, device="meta")),
     ValueError, "is on meta but the model's parameters are on cpu"),
    ("CostModel on the wrong width", lambda: l0sparse.CostModel(gated_mlp(), torch.randn(2, 21)), ValueError, "expects 20 features"),
]


@pytest.mark.parametrize("description, call, error, fragment", COSTS, ids=[c[0] for c in COSTS])
def test_costs_bad_input(description, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


def test_cost_model_counts_every_call_of_a_module():
    torch.manual_seed(0)
    model = l0sparse.sparsify(Twice())
    x = torch.randn(5, 3)
    dense = l0sparse.count_flops(model, x)
    assert dense == 3 * 3 + 2 * 3 * 3 + 3 * 2  # p, a twice, b
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.fill_(100.0)  # every gate open: the expected count is the dense one
    assert float(l0sparse.CostModel(model, x).flops(deterministic=True)) == dense


def test_prune_handles_a_module_called_twice():
    torch.manual_seed(0)
    model = l0sparse.sparsify(Twice())
    with torch.no_grad():
        model.a.parametrizations.weight[0].gate.log_alpha[0] = -10.0  # a's first column closes, for both calls
    x = torch.randn(5, 3)
    pruned = l0sparse.prune(model, x)  # crashed: mat1 and mat2 shapes cannot be multiplied
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))
    assert pruned.a.in_features == 2  # one set of columns for both calls
    assert float(l0sparse.CostModel(model, x).flops(deterministic=True)) == l0sparse.count_flops(pruned, x)


def test_a_module_called_twice_under_out_gates_prunes_exactly():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    model = l0sparse.sparsify(Twice(), {"p": "out"}, example_inputs=x)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha[0] = -10.0
    pruned = l0sparse.prune(model, x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))
    assert float(l0sparse.CostModel(model, x).flops(deterministic=True)) == l0sparse.count_flops(l0sparse.prune(model, x), x)


# -- prune (items 3, 17) -----------------------------------------------------------------------------
PRUNE = [
    ("a NaN weight", lambda: l0sparse.prune(with_nan(gated_mlp(), "0.parametrizations.weight.original"), torch.randn(2, 20)),
     ValueError, r"'0\.parametrizations\.weight\.original' has 1 NaN"),
    ("a NaN log alpha", lambda: l0sparse.prune(with_nan(gated_mlp(), "2.parametrizations.weight.0.gate.log_alpha"), torch.randn(2, 20)),
     ValueError, "gate.log_alpha' has 1 NaN"),
    ("a NaN in an L0 layer", lambda: l0sparse.prune(with_nan(l0sparse.L0MLP((20, 5, 3)), "layers.0.gate.log_alpha"), torch.randn(2, 20)),
     ValueError, "has 1 NaN"),
    ("an infinite example input", lambda: l0sparse.prune(gated_mlp(), torch.full((2, 20), math.inf)),
     ValueError, r"example_inputs\[0\]' has 0 NaN and 40 infinite"),
    ("an output that overflows", lambda: l0sparse.prune(with_inf_output(), torch.ones(2, 20)), ValueError, "output on example_inputs is not finite"),
    ("an empty example batch", lambda: l0sparse.prune(gated_mlp(), torch.randn(0, 20)), ValueError, "empty batch"),
    ("example inputs of another dtype", lambda: l0sparse.prune(gated_mlp(), torch.randn(2, 20, dtype=torch.float64)), ValueError, "cast the inputs"),
    ("a model on the meta device", lambda: l0sparse.prune(gated_mlp().to("meta"), torch.randn(2, 20, device="meta")), ValueError, "meta device"),
    ("round_to of zero", lambda: l0sparse.prune(gated_mlp(), torch.randn(2, 20), round_to=0), ValueError, "round_to must be a positive int"),
]


@pytest.mark.parametrize("description, call, error, fragment", PRUNE, ids=[c[0] for c in PRUNE])
def test_prune_bad_input(description, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


def test_the_output_check_refuses_nan_in_the_pruned_output():
    # NaN compares false: the check passed whatever the pruned model returned
    with pytest.raises(RuntimeError, match="differs from the gated model's"):
        _check_same(torch.ones(3), torch.tensor([1.0, float("nan"), 1.0]))


@pytest.mark.parametrize("training", [True, False])
def test_a_failed_prune_keeps_the_model_and_its_mode(training):
    model = l0sparse.sparsify(Failing()).train(training)
    before = copy.deepcopy(model.state_dict())
    Failing.failing.add(id(model))  # prune's copy traces; the check that runs the user's model fails
    try:
        with pytest.raises(RuntimeError, match="forward failed"):
            l0sparse.prune(model, torch.randn(2, 4))
    finally:
        Failing.failing.discard(id(model))
    assert model.training is training
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


# -- HardConcrete and the paper's layers (items 8, 12, 13) -------------------------------------------
def test_hard_concrete_with_integer_log_alpha_is_a_float_distribution():
    distribution = l0sparse.HardConcrete(torch.tensor([0, 2, -3]))
    assert distribution.rsample().dtype == torch.get_default_dtype()
    assert distribution.mean.dtype == torch.get_default_dtype()
    assert 0 < float(distribution.mean[0]) < 1  # was truncated to 0


@pytest.mark.parametrize("per_example_noise", [True, False])
def test_l0conv2d_takes_an_unbatched_image_in_training(per_example_noise):
    torch.manual_seed(0)
    layer = l0sparse.L0Conv2d(3, 4, 3, per_example_noise=per_example_noise).train()
    assert layer(torch.randn(3, 8, 8)).shape == (4, 6, 6)  # was (3, 4, 6, 6): C taken for the batch
    layer.eval()
    image = torch.randn(3, 8, 8)
    torch.testing.assert_close(layer(image), layer(image[None])[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_variance_is_never_negative(dtype):
    log_alpha = torch.linspace(-12, 12, 2001)
    reference = l0sparse.HardConcrete(log_alpha.double()).variance
    variance = l0sparse.HardConcrete(log_alpha.to(dtype)).variance
    assert variance.dtype == dtype
    assert float(variance.min()) >= 0  # float16 reached -4.9e-4
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    # against float64 at the same (rounded) log α, relative to the variance's scale
    reference = l0sparse.HardConcrete(log_alpha.to(dtype).double()).variance
    assert float((variance.double() - reference).abs().max()) <= tolerance * float(reference.max())


def test_second_derivatives_through_rsample_match_plain_autograd():
    torch.manual_seed(0)
    log_alpha = torch.randn(6, dtype=torch.float64, requires_grad=True)
    noise = torch.rand(4, 6, dtype=torch.float64).logit_(EPS)
    weights = torch.randn(4, 6, dtype=torch.float64)

    def fused(value):
        return _StretchedClampedSigmoid.apply(value, noise, 2 / 3, -0.1, 1.1)

    def plain(value):
        return torch.clamp(torch.sigmoid((noise + value) / (2 / 3)) * 1.2 - 0.1, 0, 1)

    second = []
    for sampler in (fused, plain):
        (first,) = torch.autograd.grad((sampler(log_alpha).pow(2) * weights).sum(), log_alpha, create_graph=True)
        second.append(torch.autograd.grad(first.pow(2).sum(), log_alpha)[0])
    assert float(second[1].abs().max()) > 0
    torch.testing.assert_close(second[0], second[1])  # was all zeros
    assert torch.autograd.gradgradcheck(fused, (log_alpha,))


def test_double_backward_through_a_gate_sample_is_not_zero():
    torch.manual_seed(1)
    gate = l0sparse.Gate(50).train()
    (first,) = torch.autograd.grad(gate().sum(), gate.log_alpha, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), gate.log_alpha)  # first had no graph: "does not require grad"
    assert float(second.abs().sum()) > 0


# -- scikit-learn estimators (items 9, 18) ------------------------------------------------------------
def regression_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 5))
    return x, x[:, 0] * 2 - x[:, 3] + 0.1 * rng.standard_normal(80)


SKLEARN = [
    ("a fractional hidden width", lambda: L0Regressor(hidden_layer_sizes=(2.5,)).fit(*regression_data()),
     ValueError, "hidden_layer_sizes must be a sequence of positive ints"),
    ("a zero hidden width", lambda: L0Classifier(hidden_layer_sizes=(0,)).fit(regression_data()[0], [0, 1] * 40), ValueError, "hidden_layer_sizes"),
]


@pytest.mark.parametrize("description, call, error, fragment", SKLEARN, ids=[c[0] for c in SKLEARN])
def test_sklearn_bad_input(description, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


FAST = {"random_state": 0, "max_iter": 60, "n_lambdas": 5}


@pytest.mark.parametrize("x_scale, y_scale", [(1e200, 1.0), (1e-200, 1.0), (1.0, 1e200), (1e-200, 1e-200)])
def test_regressor_selects_the_same_features_at_extreme_scales(x_scale, y_scale):
    x, y = regression_data()
    model = L0Regressor(**FAST).fit(x * x_scale, y * y_scale)
    assert np.flatnonzero(model.support_).tolist() == [0, 3]  # selected nothing before
    prediction = model.predict(x * x_scale) / y_scale
    assert np.abs(prediction - y).mean() < 0.2


@pytest.mark.slow
@pytest.mark.parametrize("x_scale", [1e200, 1e-200])
def test_classifier_selects_features_at_extreme_scales(x_scale):
    x, y = regression_data()
    labels = (y > 0).astype(int)  # the sign of 2·x0 − x3 (plus noise): features 0 and 3, as at unit scale
    model = L0Classifier(**FAST).fit(x * x_scale, labels)
    unscaled = L0Classifier(**FAST).fit(x, labels)
    assert np.flatnonzero(model.support_).tolist() == np.flatnonzero(unscaled.support_).tolist() == [0, 3]
    assert model.score(x * x_scale, labels) == unscaled.score(x, labels)  # the scale changes nothing the model learns


def test_mlp_selector_with_n_features_to_select():
    x, y = regression_data()
    model = L0Regressor(hidden_layer_sizes=(4,), n_features_to_select=2, random_state=0, max_iter=30, n_lambdas=3).fit(x, y)
    assert model.support_.sum() == 2  # crashed: 'NoneType' object has no attribute 'shape'


def test_selecting_nothing_warns():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="selected no feature"):
        L0Regressor(lam=1.0, random_state=0, max_iter=60).fit(rng.standard_normal((40, 3)), rng.standard_normal(40))


@pytest.mark.parametrize("call", ["sparsify", "prune", "CostModel", "count_flops", "summary"])
def test_a_model_that_is_not_a_module_is_refused_by_name(call):
    function = getattr(l0sparse, call)
    with pytest.raises(TypeError, match=rf"{call}: model must be a torch.nn.Module, got dict"):
        function({"weight": torch.zeros(2)}, torch.zeros(1, 2))


@pytest.mark.parametrize("call", ["prune", "CostModel", "count_flops", "summary"])
def test_example_inputs_as_a_dict_are_keyword_arguments_and_a_wrong_name_is_refused(call):
    """A dict is the forward's keyword arguments (issue #25), never read as its keys; one the forward does not take
    is refused, with its name, and the model is left as it was."""
    model = l0sparse.sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), example_inputs=torch.zeros(2, 4))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    x = torch.randn(2, 4)
    as_dict, positional = getattr(l0sparse, call)(model, {"input": x}), getattr(l0sparse, call)(model, x)
    if call == "count_flops":
        assert as_dict == positional
    with pytest.raises(ValueError, match=r"example_inputs do not fit the model.*unexpected keyword argument 'x'"):
        getattr(l0sparse, call)(model, {"x": x})
    with pytest.raises(TypeError, match=rf"{call}: example_inputs as a dict maps the forward's argument names to values; got the key 0"):
        getattr(l0sparse, call)(model, {0: x})
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_beta_at_the_smallest_accepted_value_gives_finite_gradients():
    """The bound is where the sampler's slope still fits float32: at it, samples and gradients stay finite."""
    smallest = 1.2 / torch.finfo(torch.float32).max  # (ζ − γ) / float32 max at the defaults
    gate = l0sparse.Gate(50, beta=smallest * 1.001)
    gate().sum().backward()
    assert torch.isfinite(gate.log_alpha.grad).all()


class TiedHead(nn.Module):
    """A language-model head tied to its embedding: the hidden units' "out" gates sit on the head's columns."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x))))


@pytest.mark.parametrize("log_alpha, parameters, tied", [([5.0] * 6, 102, True),  # gates 1: the tie stays
                                                         ([5.0, -5.0, 5.0, -5.0, 5.0, 5.0], 128, False),  # columns go
                                                         ([0.5] + [5.0] * 5, 162, False)])  # a fractional gate
def test_prune_keeps_a_tied_head_tied_where_it_can_and_counts_what_it_keeps(log_alpha, parameters, tied):
    """Issue #27: prune broke the tie of a head and its embedding even with every gate at 1 (162 parameters where
    expected_params said 102), and the cost model left out the embedding's copy when the tie must break."""
    torch.manual_seed(0)
    model, x = TiedHead(), torch.randint(0, 10, (2, 5))
    with pytest.warns(UserWarning, match="skipped by rule"):
        l0sparse.sparsify(model, {"mid": "out", "head": "skip"}, x)
    with torch.no_grad():
        find_gates(model)[0].log_alpha.copy_(torch.tensor(log_alpha))
    pruned = l0sparse.prune(model, x)
    assert (pruned.head.weight is pruned.emb.weight) == tied
    assert l0sparse.count_params(pruned) == parameters == float(l0sparse.expected_params(model, x, deterministic=True))


class FunctionalProduct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W, self.lin = nn.Parameter(torch.randn(5, 3)), nn.Linear(3, 5)

    def forward(self, x):
        return self.lin(x) + x @ self.W.T + nn.functional.linear(x, self.W)


@pytest.mark.parametrize("model, inputs, macs", [
    (nn.LSTM(4, 6, batch_first=True), torch.randn(2, 7, 4), 7 * 4 * 6 * (4 + 6)),  # 7 steps × 4 gates × 6 × (in + hidden)
    (nn.GRU(4, 6, num_layers=2, bidirectional=True, batch_first=True), torch.randn(2, 7, 4),
     7 * 2 * 3 * 6 * ((4 + 6) + (12 + 6))),  # two directions; the second layer reads both (12)
    (nn.RNN(4, 6), torch.randn(7, 2, 4), 2 * 6 * (4 + 6)),  # sequence first: per position, so × batch (2)
    (nn.LSTM(4, 6, proj_size=3, batch_first=True), torch.randn(2, 7, 4), 7 * (4 * 6 * (4 + 3) + 6 * 3)),  # and the projection
    (nn.ConvTranspose2d(3, 4, 3, stride=2), torch.randn(2, 3, 5, 5), 3 * 25 * 4 * 9),  # each input entry scatters 4 × 3×3
    (nn.Bilinear(3, 4, 5), (torch.randn(2, 3), torch.randn(2, 4)), 3 * 4 * 5),
    (FunctionalProduct(), torch.randn(2, 3), 3 * 15),  # the Linear, x @ W.T and F.linear: 15 each
])
def test_count_flops_counts_recurrent_transposed_bilinear_and_functional_products(model, inputs, macs):
    """Issue #27: count_flops was 0 for LSTM, ConvTranspose2d and Bilinear and missed a functional x @ W.T (15 of 45)."""
    assert l0sparse.count_flops(model, inputs) == macs


def test_count_flops_leaves_the_paper_layers_functional_products_out():
    """The paper's layers are counted on plain_copy (their own F.linear is not a product outside a counted module)."""
    model = l0sparse.L0MLP((4, 3, 2))
    assert l0sparse.count_flops(model, torch.randn(2, 4)) == 0
    assert l0sparse.count_flops(l0sparse.prune(model, torch.randn(2, 4)), torch.randn(2, 4)) > 0


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: l0sparse.penalty(None, 0.1), TypeError, "penalty: model must be a torch.nn.Module, got NoneType"),
    (lambda: l0sparse.TargetController(None, 0.5, "l0"), TypeError, "TargetController: model must be a torch.nn.Module"),
    (lambda: l0sparse.CostModel(gated_mlp(), torch.randn(2, 20)).gate_costs("latency"), ValueError,
     "gate_costs: metric must be 'flops' \\(MACs\\) or 'params', got 'latency'"),
    (lambda: l0sparse.architecture(l0sparse.L0MLP((4, 3, 2)).to("meta")), ValueError, "architecture: the model is on the meta device"),
    (lambda: l0sparse.penalty(l0sparse.L0MLP((4, 3, 2)), 0.1, N=2.5), ValueError, "N \\(the training-set size\\) must be a positive int"),
    (lambda: L0Regressor().fit(np.random.default_rng(0).standard_normal((10, 2)), np.array(["a", "b"] * 5)), ValueError,
     "L0Regressor needs numeric targets y, got dtype <U1"),
])
def test_unclear_errors_now_name_the_argument(call, error, fragment):
    """Issue #27: each was an AttributeError, a KeyError, a meta-device RuntimeError or a numpy UFuncTypeError."""
    with pytest.raises(error, match=fragment):
        call()


@pytest.mark.parametrize("convert", [np.float64, np.float32, torch.tensor], ids=["numpy64", "numpy32", "tensor0d"])
def test_numpy_and_0d_tensor_scalars_are_numbers_for_the_penalty(convert):
    """Issue #27: N, lam and weight_decay as numpy or 0-d tensor scalars were refused as if they were not numbers."""
    model = l0sparse.L0MLP((4, 3, 2))
    expected = l0sparse.penalty(model, 0.5, weight_decay=0.25, N=4)
    got = l0sparse.penalty(model, convert(0.5), weight_decay=convert(0.25), N=np.int64(4) if convert is not torch.tensor else torch.tensor(4))
    assert float(got.detach()) == float(expected.detach())
    assert float(model.layers[0].penalty(convert(0.5), convert(0.25)).detach()) == float(model.layers[0].penalty(0.5, 0.25).detach())


def test_hard_concrete_on_the_meta_device_keeps_its_shape():
    """Issue #27: "Tensor.item() cannot be called on meta tensors"; a meta distribution has shapes, no values."""
    distribution = l0sparse.HardConcrete(torch.zeros(2, 3, device="meta"))
    assert distribution.prob_nonzero().shape == (2, 3) and distribution.prob_nonzero().device.type == "meta"


def test_a_learning_rate_that_closes_every_gate_at_the_first_lam_warns():
    """Issue #27: L0Regressor(learning_rate=1e8) closed every gate at the first λ and returned a support silently."""
    x, y = regression_data()
    with pytest.warns(UserWarning, match="every gate closed at the smallest lam of the path"):
        L0Regressor(random_state=0, learning_rate=1e8, max_iter=60, n_lambdas=5).fit(x, y)


@pytest.mark.parametrize("closed", ["conv1", "conv2", "fc1"])
@pytest.mark.parametrize("training", [False, True])
def test_conditional_lenet_with_every_gate_of_a_layer_closed_runs_exactly(closed, training):
    """Issue #27: L0LeNet5(conditional=True) with every conv1 gate closed failed on a [0, 1, 5, 5] weight."""
    torch.manual_seed(0)
    model, x = l0sparse.L0LeNet5(conditional=True).train(training), torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        getattr(model, closed).gate.log_alpha.fill_(-10.0)
    torch.manual_seed(1)
    conditional = model(x)
    model.conditional = False
    torch.manual_seed(1)
    plain = model(x)
    # the same draws; the products differ only in float32 summation order (a few eps of the output scale)
    assert float((conditional - plain).abs().max()) <= 16 * torch.finfo(torch.float32).eps * max(float(plain.abs().max()), 1.0)


@pytest.mark.parametrize("call", [lambda x: l0sparse.CostModel(gated_mlp(), x), lambda x: l0sparse.prune(gated_mlp(), x),
                                  lambda x: l0sparse.sparsify(mlp(), {"0": "out"}, x)], ids=["CostModel", "prune", "sparsify"])
def test_integer_inputs_to_float_layers_are_named_as_a_dtype_not_a_shape(call, capfd):
    """Issue #27: int64 inputs were reported as a shape problem ("expects 20 features"), after torch.fx's ShapeProp had
    printed a 20–66-line traceback to stderr."""
    with pytest.raises(ValueError, match=r"example_inputs\[0\] is torch.int64 but the model multiplies it with torch.float32"):
        call(torch.randint(0, 5, (2, 20)))
    assert "Traceback" not in capfd.readouterr().err


def test_a_shape_error_prints_no_traceback_before_its_own_message(capfd):
    with pytest.raises(ValueError, match="expects 20 features"):
        l0sparse.prune(gated_mlp(), torch.randn(2, 21))
    assert capfd.readouterr().err == ""


def small_plan():
    model = l0sparse.sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), example_inputs=torch.zeros(2, 4))
    with torch.no_grad():
        model[2].parametrizations.weight[0].gate.log_alpha.copy_(torch.tensor([5.0, -5.0, 5.0]))
    return model, l0sparse.prune(model, torch.zeros(2, 4), return_plan=True)[1]


@pytest.mark.parametrize("edit, fragment", [
    (lambda plan: plan["columns"].update({"9": [0]}), "columns name module '9', which this model does not have"),
    (lambda plan: plan["rows"].update({"0": [0, 7]}), r"rows of '0' must list indices in \[0, 3\), got \[0, 7\]"),
    (lambda plan: plan.pop("rows"), "plan is not a prune plan"),
    (lambda plan: plan["columns"].update({"2": "all"}), "columns of '2' must list indices"),
])
def test_rebuild_refuses_a_plan_of_another_model(edit, fragment):
    """Issue #27: a plan naming a module the model lacks was ignored (silently a different model); a missing key or an
    index out of range gave a KeyError / IndexError."""
    model, plan = small_plan()
    edit(plan)
    with pytest.raises(ValueError, match=fragment):
        l0sparse.rebuild(model, plan, torch.zeros(2, 4))


def test_rebuild_names_itself_when_example_inputs_are_not_a_batch():
    model = l0sparse.sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), example_inputs=torch.zeros(2, 4))
    _, plan = l0sparse.prune(model, torch.zeros(2, 4), return_plan=True)
    assert "tracer" not in plan  # the fx plan, whose rebuild traces example_inputs
    with pytest.raises(TypeError, match=r"rebuild: example_inputs must be a batch .* got str"):
        l0sparse.rebuild(model, plan, "input")
