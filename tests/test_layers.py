import math

import pytest
import torch
import torch.nn.functional as F

import l0sparse
from l0sparse import L0Conv2d, L0LeNet5, L0Linear, L0MLP, penalty
from l0sparse.core.prune import plain_copy


def set_log_alpha(layer, values):
    with torch.no_grad():
        layer.gate.log_alpha.copy_(torch.as_tensor(values, dtype=layer.gate.log_alpha.dtype))


@pytest.mark.parametrize("per_example_noise", [True, False])
def test_linear_eval_is_eq13_on_input_columns(per_example_noise):
    torch.manual_seed(0)
    layer = L0Linear(6, 4, per_example_noise=per_example_noise).eval()
    set_log_alpha(layer, [-5.0, -1.0, 0.0, 0.5, 3.0, 8.0])
    x = torch.randn(10, 6)
    z_hat = torch.clamp(torch.sigmoid(layer.gate.log_alpha) * 1.2 - 0.1, 0, 1)
    expected = x @ (layer.weight * z_hat).T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.equal(layer(x), layer(x))
    assert layer.open_units() == 5  # log α = -5 is below log(1/11)


@pytest.mark.parametrize("per_example_noise", [True, False])
def test_linear_training_with_open_gates_is_a_plain_linear(per_example_noise):
    torch.manual_seed(0)
    layer = L0Linear(5, 3, per_example_noise=per_example_noise).train()
    set_log_alpha(layer, [100.0] * 5)  # every sample is exactly 1
    x = torch.randn(8, 2, 5)
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)


def test_linear_closed_input_is_ignored_in_training():
    torch.manual_seed(0)
    layer = L0Linear(3, 2).train()
    set_log_alpha(layer, [100.0, -100.0, 100.0])
    x = torch.randn(16, 3)
    y = x.clone()
    y[:, 1] = 1e6
    assert torch.equal(layer(x), layer(y))


def test_per_example_noise_differs_across_the_batch():
    torch.manual_seed(0)
    layer = L0Linear(20, 1, bias=False).train()
    set_log_alpha(layer, [0.0] * 20)
    out = layer(torch.ones(2, 20)).squeeze(1)
    assert out[0] != out[1]
    shared = L0Linear(20, 1, bias=False, per_example_noise=False).train()
    set_log_alpha(shared, [0.0] * 20)
    out = shared(torch.ones(2, 20)).squeeze(1)
    # one shared sample: the rows agree to float rounding (per-row kernels may differ in the last bit)
    assert torch.allclose(out[0], out[1], rtol=4 * torch.finfo(out.dtype).eps, atol=0)


def test_linear_penalty_by_hand():
    torch.manual_seed(0)
    layer = L0Linear(3, 2)
    set_log_alpha(layer, [-1.0, 0.0, 2.0])
    lam, wd = 0.3, 0.01
    q = [1 / (1 + math.exp(-(a - (2 / 3) * math.log(0.1 / 1.1)))) for a in (-1.0, 0.0, 2.0)]
    w, b = layer.weight.tolist(), layer.bias.tolist()
    expected = sum(q[j] * sum(lam + 0.5 * wd * w[i][j] ** 2 for i in range(2)) for j in range(3))
    expected += 0.5 * wd * sum(v**2 for v in b)
    assert float(layer.penalty(lam, wd)) == pytest.approx(expected, rel=1e-6)


def test_conv_penalty_counts_the_bias_with_its_channel():
    torch.manual_seed(0)
    layer = L0Conv2d(2, 3, 2)
    set_log_alpha(layer, [-1.0, 0.5, 2.0])
    lam, wd = 0.2, 0.05
    q = layer.gate.prob_nonzero().tolist()
    expected = 0.0
    for c in range(3):
        thetas = layer.weight[c].flatten().tolist() + [float(layer.bias[c])]
        expected += q[c] * sum(lam + 0.5 * wd * t * t for t in thetas)
    assert float(layer.penalty(lam, wd)) == pytest.approx(expected, rel=1e-6)
    assert layer.group_size() == 2 * 2 * 2 + 1


def test_penalty_lowers_log_alpha_and_rejects_bad_lambda():
    layer = L0Linear(4, 4)
    layer.penalty(1.0).backward()
    assert torch.all(layer.gate.log_alpha.grad > 0)  # descent lowers log α: fewer open gates
    with pytest.raises(ValueError, match="lam"):
        layer.penalty(-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        layer.penalty(1.0, weight_decay=-0.1)


@pytest.mark.parametrize("per_example_noise", [True, False])
def test_closed_conv_channel_is_exactly_zero_bias_included(per_example_noise):
    torch.manual_seed(0)
    layer = L0Conv2d(3, 4, 3, padding=1, per_example_noise=per_example_noise)
    with torch.no_grad():
        layer.bias.fill_(5.0)
    set_log_alpha(layer, [3.0, -100.0, 3.0, -100.0])
    x = torch.randn(2, 3, 6, 6)
    for mode in (layer.eval, layer.train):
        mode()
        out = layer(x)
        assert torch.all(out[:, [1, 3]] == 0)
        assert torch.all(out[:, [0, 2]] != 0)
    assert layer.open_units() == 2


def test_conv_eval_matches_conv2d_with_folded_gates():
    torch.manual_seed(0)
    layer = L0Conv2d(4, 6, 3, stride=2, padding=1, groups=2).eval()
    set_log_alpha(layer, torch.linspace(-3, 3, 6))
    z_hat = torch.clamp(torch.sigmoid(layer.gate.log_alpha) * 1.2 - 0.1, 0, 1).detach()
    x = torch.randn(2, 4, 9, 9)
    expected = F.conv2d(x, layer.weight * z_hat[:, None, None, None], layer.bias * z_hat, stride=2, padding=1, groups=2)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_lenet5_expected_flops_by_hand_count():
    """LeNet-5-Caffe (20-50-800-500) on 1×28×28: conv 5×5 valid, 2×2 max-pool after each conv."""
    model = L0LeNet5()
    for layer in (model.conv1, model.conv2, model.fc1, model.fc2):
        set_log_alpha(layer, torch.full(layer.gate.shape, 100.0))
    assert float(model.conv1.expected_flops((1, 28, 28))) == 20 * 1 * 25 * 24 * 24  # 288,000
    assert float(model.conv2.expected_flops((20, 12, 12))) == 50 * 20 * 25 * 8 * 8  # 1,600,000
    assert float(model.fc1.expected_flops((800,))) == 800 * 500
    assert float(model.fc2.expected_flops((500,))) == 500 * 10
    # with random gates each open-probability multiplies its unit's cost
    torch.manual_seed(0)
    set_log_alpha(model.conv2, torch.randn(50) * 3)
    q = model.conv2.gate.prob_nonzero().detach().double()
    assert float(model.conv2.expected_flops((20, 12, 12))) == pytest.approx(float(q.sum()) * 20 * 25 * 64, rel=1e-6)
    set_log_alpha(model.fc1, torch.randn(800) * 3)
    q = model.fc1.gate.prob_nonzero().detach().double()
    assert float(model.fc1.expected_flops((3, 800))) == pytest.approx(3 * 500 * float(q.sum()), rel=1e-6)


def test_conv_output_size_matches_torch():
    layer = L0Conv2d(3, 2, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    x = torch.randn(1, 3, 17, 11)
    assert layer.output_size((3, 17, 11)) == tuple(layer(x).shape[-2:])
    same = L0Conv2d(3, 2, 3, padding="same")
    assert same.output_size((3, 7, 7)) == tuple(same(torch.randn(1, 3, 7, 7)).shape[-2:])


@pytest.mark.parametrize("shape", [(3, 28), (1, 28, 28, 1), (2, 28, 28)])
def test_flops_rejects_wrong_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape"):
        L0Conv2d(1, 2, 3).expected_flops(shape)
    with pytest.raises(ValueError, match="input_shape"):
        L0Linear(10, 2).expected_flops(shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extreme", [-100.0, -30.0, 30.0, 100.0])
def test_layers_in_low_precision_give_no_nan(dtype, extreme):
    torch.manual_seed(0)
    model = L0LeNet5().to(dtype)
    for layer in (model.conv1, model.conv2, model.fc1, model.fc2):
        set_log_alpha(layer, torch.full(layer.gate.shape, extreme))
    x = torch.randn(4, 1, 28, 28, dtype=dtype)
    for mode in (model.train, model.eval):
        mode()
        out = model(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
    model.train()
    (model(x).float().sum() + penalty(model, 0.1, 1e-4, N=100).float()).backward()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()


def test_mlp_architecture_and_counts():
    model = L0MLP((6, 5, 4, 2))
    a, b, c = model.l0_layers()
    set_log_alpha(a, [5, 5, -9, 5, 5, -9])
    set_log_alpha(b, [5, -9, 5, 5, 5])
    set_log_alpha(c, [5, 5, 5, 5])
    assert model.architecture() == "6-5-4 -> 4-4-4"
    x = torch.randn(2, 6)
    kept = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert l0sparse.count_params(plain_copy(model)) == 6 * 5 + 5 * 4 + 4 * 2 + (5 + 4 + 2)
    # layer 1 reads 4 inputs and writes the 4 units layer 2 reads, and so on; every bias stays
    assert float(kept["flops"]) == 4 * 4 + 4 * 4 + 4 * 2
    assert float(kept["params"]) == 4 * 4 + 4 * 4 + 4 * 2 + 4 + 4 + 2


def _plain_per_example_forward(layer, x):
    """The per-example path as plain autograd ops (DESIGN.md §1): noise drawn as ``sample_gates`` draws it, the
    sampler's formula, then the gate on the Linear's input or the conv's output channels."""
    gate = layer.gate
    noise = torch.rand(x.shape[:-1] + gate.shape if isinstance(layer, L0Linear) else (x.shape[0], *gate.shape),
                       dtype=gate.log_alpha.dtype).logit_(1e-6)
    z = torch.clamp(torch.sigmoid((noise + gate.log_alpha) / gate.beta) * (gate.zeta - gate.gamma) + gate.gamma, 0.0, 1.0)
    if isinstance(layer, L0Linear):
        return F.linear(x * z, layer.weight, layer.bias)
    return layer._conv(x, layer.weight, layer.bias) * z[:, :, None, None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "linear, input needs grad", "conv"])
def test_per_example_path_equals_the_plain_formula(kind, dtype):
    """The layers' per-example path (the fused sampler, the gate on the Linear's input or the conv's output) gives
    the outputs and the gradients of the weights, the bias, log α and the input that the plain formula gives on
    the same random numbers."""
    torch.manual_seed(0)
    if kind == "conv":
        layer, x = L0Conv2d(3, 6, 3).to(dtype), torch.randn(16, 3, 7, 7, dtype=dtype)
        set_log_alpha(layer, [-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    else:
        layer, x = L0Linear(12, 5).to(dtype), torch.randn(16, 12, dtype=dtype)
        set_log_alpha(layer, torch.linspace(-3, 4, 12))
    x.requires_grad_(kind != "linear")
    results = []
    for forward in (layer, lambda x: _plain_per_example_forward(layer, x)):
        torch.manual_seed(1)
        out = forward(x)
        upstream = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))  # an arbitrary loss
        inputs = [layer.weight, layer.bias, layer.gate.log_alpha] + ([x] if x.requires_grad else [])
        results.append((out, torch.autograd.grad((out * upstream).sum(), inputs)))
    (out, grads), (reference, reference_grads) = results
    torch.manual_seed(1)  # the gates both paths drew: exactly 0, exactly 1 and in between all occur
    z = layer.gate(x.shape[:-1] if kind != "conv" else x.shape[:1])
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    # the same operations on the same numbers, the products in another order: a few ulps of each result's
    # scale; a gradient is a sum over the batch (16 examples, times 25 positions for the conv) of such products
    eps = torch.finfo(dtype).eps
    terms = 16 * (25 if kind == "conv" else 1)
    torch.testing.assert_close(out, reference, rtol=0, atol=8 * eps * float(reference.detach().abs().max()))
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=8 * terms * eps * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lenet5_gates_after_the_pooling_equal_gates_on_the_conv_output(dtype):
    """L0LeNet5 multiplies each conv's per-example channel gates into the pooled map (they commute with ReLU and
    max-pooling): outputs and the gradients of every parameter equal those of the layers' own forward, which
    gates the conv's output, on the same random numbers, in float64 and float32."""
    torch.manual_seed(0)
    model = L0LeNet5().to(dtype).train()
    with torch.no_grad():  # closed, open and in-between gates all drawn
        for gate in l0sparse.find_gates(model):
            gate.log_alpha.copy_(torch.linspace(-3, 4, gate.log_alpha.numel()).view_as(gate.log_alpha))
    x, y = torch.randn(8, 1, 28, 28, dtype=dtype), torch.randint(0, 10, (8,))

    def previous(x):
        hidden = model.pool(torch.relu(model.conv1(x)))
        hidden = model.pool(torch.relu(model.conv2(hidden)))
        return model.fc2(torch.relu(model.fc1(hidden.flatten(1))))

    results = []
    for forward in (model, previous):
        torch.manual_seed(1)
        out = forward(x)
        results.append((out.detach(), torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))))
    (out, grads), (expected, expected_grads) = results
    torch.manual_seed(1)
    z = model.conv1.gate((8,))
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    # max(z·a) = z·max(a) exactly (rounding is monotonic) and the conv is the same call: the forward is bit-equal,
    # and so is every weight's gradient. A conv gate's gradient sums g·a over its channel's positions: 144
    # pooled ones for conv1 (12×12), 16 for conv2, in another order than before: that many ulps of the largest
    reordered = {"conv1.gate.log_alpha": 144, "conv2.gate.log_alpha": 16}
    assert torch.equal(out, expected)
    eps = torch.finfo(dtype).eps
    for (name, _), grad, reference in zip(model.named_parameters(), grads, expected_grads):
        if name in reordered:
            torch.testing.assert_close(grad, reference, rtol=0, atol=reordered[name] * eps * float(reference.abs().max()))
        else:
            assert torch.equal(grad, reference), name
