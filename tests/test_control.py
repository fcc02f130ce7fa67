
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0sparse
from l0sparse.control import TargetController
from l0sparse.prune import plain_copy
from l0sparse.data import load_digits_split
from l0sparse.train import accuracy, configure_torch, recalibrate_batchnorm

TOLERANCE_POINTS = 0.02  # the acceptance band: ±2 percentage points of the dense size


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def train_to_target(model, x, y, controller, epochs, lr=1e-2):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[index]), y[index]) + controller.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            controller.step()


@pytest.fixture(scope="module")
def digits():
    configure_torch(1)
    return load_digits_split()


@pytest.mark.parametrize("target", [0.5, 0.25])
def test_mlp_reaches_a_flops_target_on_the_pruned_model(digits, target):
    torch.manual_seed(0)
    model = l0sparse.L0MLP((64, 100, 50, 10))
    example = digits.x_train[:2]
    controller = TargetController(model, target, "flops", example_inputs=example, warmup_steps=500, lr=0.05)
    train_to_target(model, digits.x_train, digits.y_train, controller, epochs=60)
    pruned = l0sparse.prune(model.eval(), example)
    dense_flops = l0sparse.count_flops(plain_copy(model), example)
    reached = l0sparse.count_flops(pruned, example) / dense_flops
    assert abs(reached - target) <= TOLERANCE_POINTS
    assert accuracy(model, digits.x_test, digits.y_test) > 0.9


def test_cnn_reaches_a_params_target_and_batchnorm_recalibration_restores_accuracy(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    x_train, x_test = digits.x_train.view(-1, 1, 8, 8), digits.x_test.view(-1, 1, 8, 8)
    l0sparse.sparsify(model, example_inputs=x_train[:2])
    dense_params = l0sparse.count_params(plain_copy(model))
    controller = TargetController(model, 0.5, "params", example_inputs=x_train[:2], warmup_steps=500, lr=0.05)
    train_to_target(model, x_train, digits.y_train, controller, epochs=40)
    # the controller alone lands within a few points, not always within 2 (docs/control.md): snap, as documented
    controller.snap_to_target()
    recalibrate_batchnorm(model, x_train.split(256))
    pruned = l0sparse.prune(model, x_train[:2])
    reached = l0sparse.count_params(pruned) / dense_params
    assert abs(reached - 0.5) <= TOLERANCE_POINTS
    assert accuracy(model, x_test, digits.y_test) > 0.9


def test_l0_metric_and_state_dict_round_trip(digits):
    torch.manual_seed(0)
    model = l0sparse.L0MLP((64, 20, 10))
    controller = TargetController(model, 0.3, "l0", warmup_steps=100, lr=0.05)
    train_to_target(model, digits.x_train, digits.y_train, controller, epochs=3)
    state = controller.state_dict()
    again = TargetController(model, 0.3, "l0", warmup_steps=100, lr=0.05)
    again.load_state_dict(state)
    assert int(again.steps) == int(controller.steps) > 0
    assert float(again.lambda_1) == float(controller.lambda_1) and float(again.lambda_2) == float(controller.lambda_2)
    assert again.current_target() == controller.current_target()
    assert again.optimizer.state_dict()["state"][0]["step"] == controller.optimizer.state_dict()["state"][0]["step"]


def test_multipliers_rise_while_the_model_is_too_large():
    model = l0sparse.L0MLP((10, 8, 3))
    controller = TargetController(model, 0.2, "l0", lr=0.1)
    for _ in range(3):
        controller.penalty().backward()
        controller.step()
    assert float(controller.lambda_1) > 0 and float(controller.lambda_2) > 0
    # and the penalty's gradient then closes gates
    model.zero_grad()
    controller.penalty().backward()
    assert all(float(layer.gate.log_alpha.grad.sum()) > 0 for layer in model.l0_layers())


def test_target_moves_linearly_over_the_warmup():
    model = l0sparse.L0MLP((10, 8, 3))
    controller = TargetController(model, 0.2, "l0", warmup_steps=10)
    start = float(controller.start)
    for step in range(12):
        expected = start + min(1.0, step / 10) * (0.2 - start)
        assert controller.current_target() == pytest.approx(expected, abs=1e-12)
        controller.step()


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0.0}, "target"), ({"target": 1.5}, "target"), ({"target": float("nan")}, "target"),
    ({"target": 0.5, "metric": "latency"}, "metric"), ({"target": 0.5, "metric": "flops"}, "example_inputs"),
    ({"target": 0.5, "metric": "l0", "warmup_steps": -1}, "warmup_steps"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TargetController(l0sparse.L0MLP((4, 3, 2)), **kwargs)


def test_snap_to_target_lands_on_the_pruned_size(digits):
    torch.manual_seed(0)
    model = l0sparse.L0MLP((64, 100, 50, 10))
    example = digits.x_train[:2]
    controller = TargetController(model, 0.3, "flops", example_inputs=example)
    dense = l0sparse.count_flops(plain_copy(model), example)
    # one gate moves the size by at most its unit's cost (with every other gate open): the error bound
    largest_step = max(float(c.max()) for c in l0sparse.CostModel(model, example).gate_costs("flops").values()) / dense
    reached = controller.snap_to_target(tolerance=0.0)
    pruned = l0sparse.prune(model.eval(), example)
    real = l0sparse.count_flops(pruned, example) / dense
    assert real == pytest.approx(reached, abs=1e-12)
    assert abs(real - 0.3) <= largest_step
