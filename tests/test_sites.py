"""l0sparse.core.sites: what each gate is charged for (sites.charges, read by the penalty)."""

import pytest
import torch
from torch import nn

import l0sparse

from models import TinyResNet


def test_a_shared_gate_pays_once_per_producing_layer():
    """The residual gate pays for the rows of the convs that produce its channels (the stem's filter and
    bias, the block's second conv, the depthwise conv's filter and bias), not for the columns that read them."""
    model = TinyResNet()
    x = torch.randn(2, 3, 8, 8)
    l0sparse.sparsify(model, rules={nn.Linear: "skip"}, example_inputs=x)
    shared = model.block.conv1.parametrizations.weight[0].gate
    inner = model.block.conv2.parametrizations.weight[0].gate  # block.conv1's outputs, read by block.conv2
    assert shared is not inner
    weights_per_shared_gate = (3 * 9 + 1) + 8 * 9 + (9 + 1)
    weights_per_inner_gate = 8 * 9  # block.conv1 has no bias
    expected = (float(shared.prob_nonzero().sum()) * weights_per_shared_gate
                + float(inner.prob_nonzero().sum()) * weights_per_inner_gate)
    assert float(l0sparse.penalty(model, lam=1.0).detach()) == pytest.approx(expected, rel=1e-5)
