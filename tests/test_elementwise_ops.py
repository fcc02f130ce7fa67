"""Element-wise functions of one tensor and numbers (operations.ScalarFunctions): the pieces Hugging Face
activations are written with (gelu_new's pow(x, 3) and tanh, erf, roots, clamps, division by a number) pass the
channels on, so the feed-forward units behind them prune, on the torch.export path and the fx path alike."""

import warnings

import pytest
import torch
from torch import nn

import l0sparse
import l0sparse.core.graph as graph
from l0sparse.core.graph import trace_channels
from l0sparse.core.prune import plain_copy
from l0sparse.core.sites import find_gates

from models import FFN, HEADS, VOCAB, WIDTH, assert_plain, input_ids

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")
import l0sparse.hf  # noqa: E402 (after the skip: it needs transformers)

pytestmark = pytest.mark.usefixtures("torch_export_loaded")  # conftest.py: torch.export's set-up, paid outside the tests


def half_closed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` gated by encoder_rules, about half of every gate closed and the open ones fractional at test time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and LayerNorms have weights but no gate
        l0sparse.sparsify(model, l0sparse.hf.encoder_rules(model), example_inputs=x)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in find_gates(model):
            closed = torch.rand(gate.log_alpha.shape, generator=generator) < 0.5
            gate.log_alpha.copy_(torch.where(closed, -10.0, torch.rand(gate.log_alpha.shape, generator=generator) * 3 - 1.5))
    return model.eval()


def relative(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


# the activations of transformers.activations.ACT2FN and the ATen ops they reach torch.export's graph as
ACTIVATIONS = {
    "gelu_new": "pow, tanh", "gelu_python_tanh": "pow, tanh", "gelu_accurate": "pow, tanh", "gelu_pytorch_tanh": "gelu(tanh)",
    "gelu_python": "div, erf", "laplace": "div, erf", "gelu_10": "gelu, clip", "relu2": "relu, square",
    "sqrtsoftplus": "softplus, sqrt", "silu": "silu", "quick_gelu": "sigmoid", "mish": "mish", "gelu_fast": "tanh",
}


@pytest.mark.slow
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_feed_forward_units_behind_hugging_face_activations_prune(activation):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=FFN,
                                     vocab_size=VOCAB, max_position_embeddings=32, hidden_act=activation)
    model, x = transformers.BertModel(config, add_pooling_layer=False).eval(), input_ids()
    space = trace_channels(model, (x,)).space_of_output("encoder.layer.0.intermediate.dense")
    assert space.removable, space.locked
    model = half_closed(model, x)
    (unit_gate,) = [g for g in find_gates(model) if g.granularity == "in"]
    kept = int(unit_gate.is_open().sum())
    pruned = l0sparse.prune(model, x)
    assert_plain(pruned)
    assert pruned.encoder.layer[0].intermediate.dense.out_features == kept < FFN
    with torch.no_grad():
        assert relative(model(x).last_hidden_state, pruned(x).last_hidden_state) <= 1e-4


def test_albert_with_its_default_gelu_new_loses_heads_and_units():
    torch.manual_seed(0)
    config = transformers.AlbertConfig(hidden_size=WIDTH, embedding_size=16, num_hidden_layers=2, num_attention_heads=HEADS,
                                       intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=32)
    assert config.hidden_act == "gelu_new"
    x = input_ids()
    model = half_closed(transformers.AlbertModel(config).eval(), x)
    gates = {g.granularity: g for g in find_gates(model)}
    units = int(gates["in"].is_open().sum())
    pruned = l0sparse.prune(model, x)
    layer = pruned.encoder.albert_layer_groups[0].albert_layers[0]
    assert layer.ffn.out_features == layer.ffn_output.in_features == units < FFN
    assert l0sparse.count_params(pruned) < l0sparse.count_params(plain_copy(model))
    with torch.no_grad():
        assert relative(model(x).last_hidden_state, pruned(x).last_hidden_state) <= 1e-4


class WrittenOut(nn.Module):
    """A feed-forward block whose activation is written with torch functions (fx traces it)."""

    def __init__(self, activation):
        super().__init__()
        self.first, self.second, self.activation = nn.Linear(6, 12), nn.Linear(12, 3), activation

    def forward(self, x):
        return self.second(self.activation(self.first(x)))


WRITTEN_OUT = {
    "pow": lambda h: 0.5 * h * (1 + torch.tanh(0.79 * (h + 0.044715 * torch.pow(h, 3.0)))),
    "operator.pow": lambda h: h + h ** 2,
    "erf and division": lambda h: h * 0.5 * (1.0 + torch.erf(h / 1.41421)),
    "sqrt and abs": lambda h: torch.sqrt(torch.abs(h)),
    "rsqrt": lambda h: torch.rsqrt(h.square() + 1.0),
    "reciprocal and neg": lambda h: torch.reciprocal(1.0 + torch.exp(-h)),
    "clamp": lambda h: torch.clamp(h, min=-1.0, max=1.0),
    "expm1": lambda h: torch.expm1(h).clip(-2, 2),
}


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("case", WRITTEN_OUT)
def test_written_out_element_wise_functions_pass_the_channels_on(case, tracer, monkeypatch):
    if tracer == "export":  # the ATen graph: make fx give up, as it does on Hugging Face models
        def no_fx(*args, **kwargs):
            raise TypeError("no fx here")

        monkeypatch.setattr(graph._Tracer, "trace", no_fx)
    torch.manual_seed(0)
    model, x = WrittenOut(WRITTEN_OUT[case]), torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'first' skipped by rule
        l0sparse.sparsify(model, {"second": "in", "first": "skip"}, example_inputs=x)
    (gate,) = find_gates(model)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([10.0, -10.0] * 6))
    pruned, plan = l0sparse.prune(model.eval(), x, return_plan=True)
    assert plan.get("tracer", "fx") == tracer
    assert pruned.first.out_features == pruned.second.in_features == 6
    with torch.no_grad():
        assert relative(model(x), pruned(x)) <= 1e-4


def test_a_tensor_exponent_or_divisor_still_locks_the_channels():
    for activation in (lambda h: torch.pow(h, h), lambda h: h / (h.abs() + 1.0)):
        model, x = WrittenOut(activation), torch.randn(5, 6)
        space = trace_channels(model, (x,)).space_of_output("first")
        assert not space.removable and any("reads it" in why for why in space.locked), space.locked
