"""l0sparse.core.graph: trace_channels keeps torch.fx where fx follows the model and reads torch.export's graph where it
cannot (the channel spaces, producers and followers)."""

import pytest
import torch
from torch import nn

import l0sparse
from l0sparse.core.graph import trace_channels
from l0sparse.core.sites import find_gates

pytestmark = pytest.mark.usefixtures("torch_export_loaded")  # conftest.py: torch.export's set-up, paid outside the tests


def test_models_fx_follows_keep_the_fx_path():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert trace_channels(model, (torch.randn(3, 4),)).tracer == "fx"


class BranchOnRank(nn.Module):
    """A residual CNN with BatchNorm whose forward branches on ``x.dim()``: torch.fx cannot follow it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.norm2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.norm3 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        if x.dim() == 3:  # one unbatched image
            x = x[None]
        y = torch.relu(self.norm1(self.conv1(x)))
        y = y + torch.relu(self.norm2(self.conv2(y)))
        y = torch.relu(self.norm3(self.conv3(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_a_cnn_torch_fx_cannot_follow_prunes_through_torch_export():
    torch.manual_seed(0)
    model = BranchOnRank().eval()
    with torch.no_grad():  # BatchNorm that shifts a closed channel away from zero: only the consumer's gate removes it exactly
        for norm in (model.norm1, model.norm2, model.norm3):
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    graph = trace_channels(model, (x,))
    assert graph.tracer == "export"
    residual = graph.space_of_output("conv1")  # conv1 and conv2 are added: one space, its BatchNorms follow it
    assert residual.removable and sorted(residual.producers) == ["conv1", "conv2"] and sorted(residual.followers) == ["norm1", "norm2"]
    l0sparse.sparsify(model, {"conv1": "out", "conv3": "out", "fc": "skip"}, example_inputs=x)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.where(torch.arange(gate.log_alpha.numel()) % 2 == 0, -10.0, 10.0))
    pruned = l0sparse.prune(model, x)
    assert (pruned.conv1.out_channels, pruned.norm2.num_features, pruned.conv3.out_channels, pruned.fc.in_features) == (4, 4, 8, 8)
    with torch.no_grad():
        assert float((model(x) - pruned(x)).abs().max()) <= 1e-5 * float(model(x).abs().max())
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert (float(costs["params"]), float(costs["flops"])) == (l0sparse.count_params(pruned), l0sparse.count_flops(pruned, x))
