"""The whole path on a device other than the CPU (issue #14, item 10).

``meta`` tensors have shapes and devices but no values: every tensor the library makes must follow the
model there, or an operation fails with "Tensor on device meta is not on the expected device cpu" (the
CUDA error of the same pattern). Steps that read values (TargetController's start, prune) cannot run
on meta; they must say so, not fail on a device mismatch. benchmarks/cuda_path.py runs the same path
on CUDA with values.
"""

import warnings

import pytest
import torch

import l0sparse
from l0sparse.core.sites import find_gates

from models import TinyResNet, mlp

torch.set_num_threads(1)

DEVICE_MISMATCH = "not on the expected device"

MODELS = {
    "resnet": (TinyResNet, (2, 3, 8, 8)),  # conv 'out' gates, BatchNorm, a depthwise conv
    "mlp": (mlp, (2, 20)),  # Linear 'in' gates
}


def meta_model(case: str):
    factory, shape = MODELS[case]
    torch.manual_seed(0)
    model, x = factory().to("meta"), torch.randn(shape, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, example_inputs=x)
    return model, x


@pytest.mark.parametrize("case", list(MODELS))
def test_costs_and_penalties_stay_on_the_model_device(case):
    model, x = meta_model(case)
    assert {gate.log_alpha.device.type for gate in find_gates(model)} == {"meta"}
    assert l0sparse.Penalty(model, 0.1, N=100)().device.type == "meta"
    cost_model = l0sparse.CostModel(model, x)
    for deterministic in (False, True):
        costs = cost_model.costs(deterministic=deterministic)
        assert {value.device.type for value in costs.values()} == {"meta"}
    gate_costs = cost_model.gate_costs("flops")
    assert {value.device.type for value in gate_costs.values()} == {"meta"}
    assert l0sparse.Penalty(model, 0.1, N=100, cost_weights=gate_costs)().device.type == "meta"
    assert l0sparse.expected_flops(model, x).device.type == "meta"
    assert l0sparse.expected_params(model, x, deterministic=True).device.type == "meta"
    assert l0sparse.count_flops(model, x) > 0
    penalty = l0sparse.Penalty(model, 0.1, N=100)() + cost_model.flops()
    penalty.backward()  # gradients reach every log α on the device
    assert {gate.log_alpha.grad.device.type for gate in find_gates(model)} == {"meta"}


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_target_controller_on_meta_says_it_needs_values(metric):
    model, x = meta_model("resnet")
    with pytest.raises(ValueError, match="meta device, which holds no values"):
        l0sparse.TargetController(model, 0.5, metric, example_inputs=x)


def test_prune_on_meta_says_it_needs_values():
    model, x = meta_model("resnet")
    with pytest.raises(ValueError, match="on the meta device, which holds none"):
        l0sparse.prune(model, x)
