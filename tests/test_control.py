
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0sparse
from l0sparse.core.control import TargetController
from l0sparse.core.prune import plain_copy
from l0sparse.core.sites import find_gates
from l0sparse.training.data import load_digits_split
from l0sparse.training.train import configure_torch, recalibrate_batchnorm
from l0sparse.training.runs import accuracy

from models import promised_band



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


@pytest.mark.slow
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
    assert abs(reached - target) <= promised_band(controller, model, example)
    assert accuracy(model, digits.x_test, digits.y_test) > 0.9


@pytest.mark.slow
def test_cnn_reaches_a_params_target_and_batchnorm_recalibration_restores_accuracy(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    x_train, x_test = digits.x_train.view(-1, 1, 8, 8), digits.x_test.view(-1, 1, 8, 8)
    l0sparse.sparsify(model, example_inputs=x_train[:2])
    dense_params = l0sparse.count_params(plain_copy(model))
    controller = TargetController(model, 0.5, "params", example_inputs=x_train[:2], warmup_steps=500, lr=0.05)
    train_to_target(model, x_train, digits.y_train, controller, epochs=40)
    # the controller alone, without snap_to_target
    recalibrate_batchnorm(model, x_train.split(256))
    pruned = l0sparse.prune(model, x_train[:2])
    reached = l0sparse.count_params(pruned) / dense_params
    assert abs(reached - 0.5) <= promised_band(controller, model, x_train[:2])
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
    # no landing from above on the way (landing="target"): the size stays above the schedule for the three steps;
    # a landing would bring it to the nearest reachable size at once, where the multipliers stop (issue #27)
    controller = TargetController(model, 0.2, "l0", lr=0.1, warmup_steps=10, landing="target")
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


def test_the_target_waits_for_the_delay_then_moves_linearly_and_no_gate_closes_before():
    """delay_steps: the target stays at the starting size (every unit kept) while the loss alone moves the gates;
    the warm-up then runs from there, and the target is reached at delay + warm-up."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((40, 30, 3))
    controller = TargetController(model, 0.3, "l0", warmup_steps=8, delay_steps=5, tolerance=0.0)
    start = float(controller.start)
    assert start == 1.0
    with torch.no_grad():
        controller.lambda_1.fill_(5.0)
    for step in range(16):
        expected = start if step < 5 else start + min(1.0, (step - 5) / 8) * (0.3 - start)
        assert controller.current_target() == pytest.approx(expected, abs=1e-12)
        if step < 5:  # nothing pushes, and nothing is closed
            assert float(controller.penalty().detach()) == 0.0
            assert controller.deterministic_fraction() == 1.0
        controller.step()
    one_gate = 1 / sum(g.log_alpha.numel() for g in find_gates(model))
    assert abs(controller.deterministic_fraction() - 0.3) <= one_gate
    assert "delay_steps=5" in repr(controller)


def test_a_ceiling_waits_for_the_delay_and_the_warmup():
    model = l0sparse.L0MLP((10, 8, 3))
    controller = TargetController(model, 0.5, "l0", warmup_steps=3, delay_steps=2, ceiling=True)
    for _ in range(5):
        assert controller.current_target() == 1.0
        controller.step()
    assert controller.current_target() == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0.0}, "target"), ({"target": 1.5}, "target"), ({"target": float("nan")}, "target"),
    ({"target": 0.5, "metric": "latency"}, "metric"), ({"target": 0.5, "metric": "flops"}, "example_inputs"),
    ({"target": 0.5, "metric": "l0", "warmup_steps": -1}, "warmup_steps"),
    ({"target": 0.5, "metric": "l0", "delay_steps": -1}, "delay_steps"), ({"target": 0.5, "metric": "l0", "delay_steps": 2.5}, "delay_steps"),
    ({"target": 0.5, "metric": "l0", "delay_steps": True}, "delay_steps"),
    ({"target": 0.5, "metric": "l0", "landing": "always"}, "landing must be one of"),
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


def _closed_fraction_(model, fraction: float) -> None:
    """Close the gates of lowest log α (random order) until ``fraction`` of them are open."""
    all_gates = find_gates(model)
    with torch.no_grad():
        for gate in all_gates:
            gate.log_alpha.normal_(0.0, 3.0)
        values = torch.cat([g.log_alpha.flatten() for g in all_gates])
        threshold = torch.quantile(values, 1 - fraction)
        offset = float(threshold) - math.log(0.1 / 1.1)  # Eq. 13 opens a gate above log(−γ/ζ)
        for gate in all_gates:
            gate.log_alpha.sub_(offset - 1e-4)


def test_penalty_is_zero_once_the_pruned_size_is_at_the_target():
    torch.manual_seed(0)
    model = l0sparse.L0MLP((100, 50, 10))
    controller = TargetController(model, 0.5, "l0")
    _closed_fraction_(model, 0.4)
    assert controller.deterministic_fraction() <= 0.5
    with torch.no_grad():
        controller.lambda_1.fill_(5.0)
    penalty = controller.penalty()
    penalty.backward()
    assert float(penalty) == 0.0
    assert all(float(layer.gate.log_alpha.grad.abs().max()) == 0.0 for layer in model.l0_layers())


def test_multipliers_fall_below_the_target_and_stay_non_negative():
    torch.manual_seed(0)
    model = l0sparse.L0MLP((100, 50, 10))
    controller = TargetController(model, 0.5, "l0", lr=0.1, tolerance=0.9)  # a wide band: no landing here
    _closed_fraction_(model, 0.3)
    with torch.no_grad():
        controller.lambda_1.fill_(0.25)
    values = []
    for _ in range(10):
        controller.penalty()
        controller.step()
        values.append(float(controller.lambda_1))
    assert values[0] < 0.25 and values[-1] == 0.0 and min(values) >= 0.0


@pytest.mark.parametrize("start, warmup", [(0.2, 100), (0.9, 0)])
def test_step_lands_the_pruned_size_back_in_the_band_keeping_the_gates_order(start, warmup):
    """Below the band at any time (an overshoot), or above it after the warm-up (a lag), one step brings the
    pruned size back within the tolerance: the open gates are the top of the order, and only gates that
    crossed the threshold changed (the kept units keep their test-time values)."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((300, 100, 10))
    controller = TargetController(model, 0.5, "l0", warmup_steps=warmup, tolerance=0.01)
    _closed_fraction_(model, start)
    if warmup:
        controller.start.fill_(0.5)  # the schedule is at the target already
    before = torch.cat([g.log_alpha.detach().flatten().clone() for g in find_gates(model)])
    controller.penalty()
    controller.step()
    after_open = torch.cat([g.is_open().flatten() for g in find_gates(model)])
    # a gate is 1/410 of the count, under the band's width: the landing lands within the tolerance itself
    assert abs(controller.deterministic_fraction() - 0.5) <= controller.tolerance
    assert controller.landings == 1
    assert float(before[after_open].min()) > float(before[~after_open].max())
    after = torch.cat([g.log_alpha.detach().flatten() for g in find_gates(model)])
    threshold = math.log(0.1 / 1.1)
    crossed = (before > threshold) != after_open
    assert crossed.any() and torch.equal(after[~crossed], before[~crossed])


def test_the_pruned_size_follows_the_schedule_through_the_warmup_even_when_the_gates_do_not_move():
    """Gates that no optimizer moves (a learning rate too small for the schedule): the schedule starts at the
    pruned size (every gate open here, though P(z ≠ 0) < 1), and each step's landing keeps the pruned size
    within the tolerance of the target of that step, closing the gates of lowest log α first."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((300, 100, 10))
    controller = TargetController(model, 0.2, "l0", warmup_steps=20, tolerance=0.01)
    assert float(controller.start) == controller.deterministic_fraction() == 1.0
    order = torch.cat([g.log_alpha.detach().flatten().clone() for g in find_gates(model)])
    for _ in range(25):  # a gate (1/410) is narrower than the band: within the tolerance at every step
        target = controller.current_target()
        controller.penalty()
        controller.step()
        assert abs(controller.deterministic_fraction() - target) <= controller.tolerance
    open_now = torch.cat([g.is_open().flatten() for g in find_gates(model)])
    assert float(order[open_now].min()) > float(order[~open_now].max())


def test_landing_at_the_target_leaves_the_warmup_to_the_penalty_then_lands():
    """landing="target": gates that no optimizer moves stay open through the warm-up (on the schedule they
    would be closed step by step), the penalty pushes all the while, and the step that reaches the target
    lands the pruned size in its band."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((300, 100, 10))
    controller = TargetController(model, 0.2, "l0", warmup_steps=20, tolerance=0.01, landing="target")
    assert "landing='target'" in repr(controller)
    with torch.no_grad():
        controller.lambda_1.fill_(1.0)
    for _ in range(20):
        assert float(controller.penalty().detach()) > 0.0 or controller.current_target() == 1.0
        controller.step()
    assert controller.landings == 0 and controller.deterministic_fraction() == 1.0
    controller.penalty()
    controller.step()
    assert controller.landings == 1 and abs(controller.deterministic_fraction() - 0.2) <= controller.tolerance


def test_landing_at_the_target_still_reopens_gates_below_the_band_during_the_warmup():
    torch.manual_seed(0)
    model = l0sparse.L0MLP((300, 100, 10))
    controller = TargetController(model, 0.2, "l0", warmup_steps=20, tolerance=0.01, landing="target")
    for _ in range(5):
        controller.step()
    target = controller.current_target()  # 0.8: a quarter of the way from 1.0 to 0.2 after 5 of 20 steps
    _closed_fraction_(model, 0.3)  # the loss closed far more than the schedule asks for
    controller.step()
    assert controller.landings == 1 and abs(controller.deterministic_fraction() - target) <= controller.tolerance


@pytest.mark.parametrize("growing", [False, True])
def test_a_landing_steps_past_a_unit_larger_than_the_band(growing):
    """The unit next to the cut in log α order is worth more than the band (an input of the first layer carries
    up to 100 weights, one of the second about 14): the landing leaves it as it is and moves the small units
    behind it instead, so the pruned size ends in the band, not one large unit away from it."""
    model = l0sparse.L0MLP((4, 100, 10))
    first, second = model.l0_layers()
    with torch.no_grad():
        first.gate.log_alpha.fill_(5.0)
        second.gate.log_alpha.copy_(torch.linspace(1.0, 4.0, 100))
        if growing:  # the large unit is the closed one nearest the threshold; 40 small units are closed further down
            first.gate.log_alpha[0] = -3.0
            second.gate.log_alpha[60:] = torch.linspace(-6.0, -3.5, 40)
        else:  # the large unit is the open one nearest the threshold
            first.gate.log_alpha[0] = 0.5
    controller = TargetController(model, 0.5, "params", example_inputs=torch.randn(2, 4))
    start = controller.deterministic_fraction()
    with torch.no_grad():  # the premise: moving the large unit alone jumps over the whole band
        saved = float(first.gate.log_alpha[0])
        first.gate.log_alpha[0] = 5.0 if growing else -3.0
        assert abs(controller.deterministic_fraction() - start) > 4 * controller.tolerance
        first.gate.log_alpha[0] = saved
    controller.target = start + 2 * controller.tolerance if growing else start - 2 * controller.tolerance
    controller.penalty()
    controller.step()
    assert controller.landings == 1
    assert abs(controller.deterministic_fraction() - controller.target) <= controller.tolerance
    assert bool(first.gate.is_open()[0]) is not growing  # the large unit stayed as it was


def test_on_the_way_to_the_target_a_landing_keeps_the_log_alpha_order_and_steps_past_only_at_the_target():
    """During the warm-up, a large unit next to the cut is not skipped: the band widens to the nearest cut
    instead (the next steps' cuts take the unit in its order). When the schedule reaches the target the band
    is the tolerance again, and the landing steps past the unit. The widened band is a buffer: it is in
    ``state_dict``, and a state saved before it existed still loads."""
    model = l0sparse.L0MLP((4, 100, 10))
    first, second = model.l0_layers()
    with torch.no_grad():
        first.gate.log_alpha.fill_(5.0)
        first.gate.log_alpha[0] = 0.5  # the open unit nearest the threshold, worth about 7% of the parameters
        second.gate.log_alpha.copy_(torch.linspace(1.0, 4.0, 100))
    controller = TargetController(model, 0.5, "params", example_inputs=torch.randn(2, 4), warmup_steps=4)
    start = controller.deterministic_fraction()
    controller.target = start - 4 * controller.tolerance  # 0.5 points a step, reached at step 4
    order = torch.cat([g.log_alpha.detach().flatten().clone() for g in find_gates(model)])
    with torch.no_grad():
        controller.steps.fill_(2)
    for _ in range(2):  # steps 2 and 3: the nearest cut is to close nothing, 1 and 1.5 points above the target
        controller.penalty()
        controller.step()
    assert torch.equal(torch.cat([g.log_alpha.detach().flatten() for g in find_gates(model)]), order)
    assert float(controller.residual) == pytest.approx(3 * controller.tolerance, rel=1e-5)
    assert "residual" in controller.state_dict()
    old_state = {key: value for key, value in controller.state_dict().items() if key != "residual"}
    TargetController(model, 0.5, "params", example_inputs=torch.randn(2, 4)).load_state_dict(old_state)
    controller.penalty()
    controller.step()  # step 4: the target itself
    assert abs(controller.deterministic_fraction() - controller.target) <= controller.tolerance
    assert bool(first.gate.is_open()[0])  # the large unit stayed open; small ones behind it closed instead


def test_a_ceiling_waits_for_the_warmup_then_lands_only_from_above():
    """target_mode "ceiling": no push and no landing during the warm-up, then the size is brought under the
    budget from above; a model already under the budget is left alone (no gate reopens)."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((300, 100, 10))
    controller = TargetController(model, 0.5, "l0", warmup_steps=3, tolerance=0.01, ceiling=True)
    _closed_fraction_(model, 0.9)
    with torch.no_grad():
        controller.lambda_1.fill_(5.0)
    for _ in range(3):  # the warm-up: the target is the whole model, so nothing pushes and nothing lands
        assert controller.current_target() == 1.0
        assert float(controller.penalty().detach()) == 0.0
        controller.step()
    assert controller.landings == 0 and controller.deterministic_fraction() > 0.85
    assert controller.current_target() == 0.5
    assert float(controller.penalty().detach()) > 0.0
    controller.step()
    # a budget: at or under target + tolerance (before #27 the test allowed a gate above it)
    assert controller.landings == 1 and 0.5 - controller.tolerance <= controller.deterministic_fraction() <= 0.5 + controller.tolerance
    _closed_fraction_(model, 0.2)  # far under the budget: an exact target would reopen gates here, a ceiling does not
    before = torch.cat([g.log_alpha.detach().flatten().clone() for g in find_gates(model)])
    controller.penalty()
    controller.step()
    after = torch.cat([g.log_alpha.detach().flatten() for g in find_gates(model)])
    assert controller.landings == 1 and torch.equal(before, after)


@pytest.mark.parametrize("sizes, metric, target", [((3, 4, 2), "params", 0.6), ((3, 4, 2), "l0", 0.7),
                                                     ((2, 2, 2), "l0", 0.7), ((3, 4, 2), "flops", 0.45)])
@pytest.mark.parametrize("seed", range(4))
def test_a_ceiling_with_coarse_units_never_lands_above_target_plus_tolerance(sizes, metric, target, seed):
    """Item 2 of issue #27: units worth more than the band. Before, the landing kept the cut nearest the target in
    absolute distance and the widened band accepted it: L0MLP((3, 4, 2)) with a params ceiling of 0.6 landed at
    0.654 (the pruned model 65.4%), an l0 ceiling of 0.7 at 0.714 (0.75 on (2, 2, 2))."""
    torch.manual_seed(seed)
    model = l0sparse.L0MLP(sizes)
    x = torch.randn(2, sizes[0])
    controller = TargetController(model, target, metric, example_inputs=None if metric == "l0" else x, ceiling=True)
    for _ in range(3):
        controller.penalty()
        controller.step()
        assert controller.deterministic_fraction() <= target + controller.tolerance
    assert controller.landings == 1  # landed once, then left alone under the budget
    if metric != "l0":  # and the pruned model itself, counted on its own
        pruned = l0sparse.prune(model.eval(), x)
        count = l0sparse.count_params(pruned) if metric == "params" else l0sparse.count_flops(pruned, x)
        assert count / controller._dense <= target + controller.tolerance


def test_multipliers_stay_bounded_when_no_cut_reaches_the_band_and_say_so_once():
    """Item 3 of issue #27: L0MLP((2, 2, 2)) holds 4 gates, so an l0 target of 0.7 is reachable only as 0.5 or 0.75.
    Before, λ1 grew 0.01 → 0.77 → 9.47 over 1,000 steps and kept growing (windup), silently."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((2, 2, 2))
    controller = TargetController(model, 0.7, "l0")
    with pytest.warns(UserWarning, match=r"nearest size reached is 0\.7500") as caught:
        for _ in range(1000):
            assert controller.penalty().requires_grad
            controller.step()
    assert len([w for w in caught if "nearest size reached" in str(w.message)]) == 1
    # the landing alone brought the size to the nearest reachable one: nothing is integrated there
    assert float(controller.lambda_1.detach()) == 0.0 and float(controller.lambda_2.detach()) == 0.0
    assert controller.deterministic_fraction() == 0.75
    assert float(controller.penalty().detach()) == 0.0  # and nothing pushes the gates past it


def test_multipliers_stay_bounded_in_training_when_the_band_is_out_of_reach():
    """Item 3 in a training loop (the gates and the penalty move together): λ1 stays at most what the first steps
    gave it, and the pruned size stays at the nearest reachable size (0.75), instead of the wound-up penalty
    closing units all at once later."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((2, 2, 2))
    x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
    controller = TargetController(model, 0.7, "l0", lr=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sizes, lambdas = [], []
    with pytest.warns(UserWarning, match="nearest size reached"):
        for _ in range(400):
            loss = F.cross_entropy(model(x), y) + controller.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            controller.step()
            sizes.append(controller.deterministic_fraction())
            lambdas.append(float(controller.lambda_1.detach()))
    assert set(sizes) == {0.75}
    assert max(lambdas) == lambdas[0]


def test_ceiling_must_be_a_bool():
    with pytest.raises(ValueError, match="ceiling"):
        TargetController(l0sparse.L0MLP((4, 3, 2)), 0.5, "l0", ceiling="yes")


def test_a_target_below_the_floor_is_refused_with_the_floor():
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 500), nn.ReLU(), nn.Linear(500, 3))
    with pytest.warns(UserWarning):
        l0sparse.sparsify(model, rules={"0": "in", "2": "skip", "4": "skip"})
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"smallest params fraction this model can be pruned to, 0\.9"):
        TargetController(model, 0.5, "params", example_inputs=x)
    TargetController(model, 0.99, "params", example_inputs=x)  # above the floor: accepted


def test_param_groups_give_the_gates_their_own_rate_and_no_weight_decay():
    model = l0sparse.L0MLP((6, 5, 3))
    groups = l0sparse.param_groups(model, lr=1e-3, gate_lr=1e-2, weight_decay=0.1)
    gate_ids = {id(g.log_alpha) for g in find_gates(model)}
    assert {id(p) for p in groups[1]["params"]} == gate_ids
    assert groups[1]["lr"] == 1e-2 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.1
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    for bad in ({"lr": 0.0}, {"lr": 1e-3, "gate_lr": -1.0}, {"lr": float("nan")}, {"lr": 1e-3, "weight_decay": -1}):
        with pytest.raises(ValueError, match=next(iter(k for k in bad if k != "lr" or len(bad) == 1))):
            l0sparse.param_groups(model, **bad)


def test_the_pruned_size_is_counted_once_per_training_step():
    """penalty() and step() both read the pruned size; the count runs once per state of the gates: after the
    optimizer's step (in step()), reused by the next penalty(), and again whenever a gate is written in place."""
    torch.manual_seed(0)
    model = l0sparse.L0MLP((20, 16, 4))
    x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
    # a ceiling during its warm-up never lands (a landing's bisection counts each of its cuts)
    controller = TargetController(model, 0.5, "flops", example_inputs=x[:2], warmup_steps=50, ceiling=True)
    counts = []
    original = controller._cost_model.costs

    def counting(deterministic=False, **kwargs):
        counts.append(deterministic)
        return original(deterministic=deterministic, **kwargs)

    controller._cost_model.costs = counting
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = 20
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y) + controller.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step()
    assert controller.landings == 0
    assert counts.count(True) == steps  # one per step (the first penalty() reuses the constructor's count of the start)
    # the cached value is the count of the gates as they are now, and a write through detach() invalidates it
    fresh = float(original(deterministic=True)["flops"]) / controller._dense
    assert controller.deterministic_fraction() == fresh
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.detach().fill_(-10.0)
    assert controller.deterministic_fraction() < fresh
