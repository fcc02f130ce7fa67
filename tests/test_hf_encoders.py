"""Hugging Face encoders (issue #12, parts 1-3): tracing through torch.export, heads, feed-forward units and
whole blocks, prune to a plain, smaller model with the same outputs. Small random configs: nothing is downloaded.
The torch.export path is also checked on models without transformers (those tests need no extra)."""

import io
import warnings

import pytest
import torch
from torch import nn

import l0sparse
from l0sparse.core.sites import find_gates
from l0sparse.core.graph import trace_channels
from l0sparse.core.sparsify import declared_head_count, gate_masks

from models import CASES, HEADS, VOCAB, WIDTH, assert_plain, build, input_ids


def hf():
    """transformers, or a skip: the Hugging Face tests need the 'hf' extra (CI installs it with 'dev')."""
    return pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")

FFN = 64  # the tiny BERT of models.py, with a wider feed-forward
pytestmark = pytest.mark.usefixtures("torch_export_loaded")  # conftest.py: torch.export's set-up, paid outside the tests


def bert() -> nn.Module:
    config = hf().BertConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FFN,
                                     vocab_size=VOCAB, max_position_embeddings=32)
    return hf().BertModel(config).eval()


def distilbert() -> nn.Module:
    config = hf().DistilBertConfig(dim=WIDTH, n_layers=2, n_heads=HEADS, hidden_dim=FFN, vocab_size=VOCAB,
                                           max_position_embeddings=32)
    return hf().DistilBertModel(config).eval()


def roberta() -> nn.Module:
    config = hf().RobertaConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FFN,
                                        vocab_size=VOCAB, max_position_embeddings=40)
    return hf().RobertaModel(config).eval()


def electra() -> nn.Module:  # embeddings narrower than the encoder, projected by a Linear
    config = hf().ElectraConfig(embedding_size=16, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                                        intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=32)
    return hf().ElectraModel(config).eval()


# family -> (builder, attention modules, feed-forward output projection, q/k/v and output projection inside attention)
FAMILIES = {
    "bert": (bert, "encoder.layer.*.attention", "encoder.layer.*.output.dense",
             ("self.query", "self.key", "self.value", "output.dense")),
    "roberta": (roberta, "encoder.layer.*.attention", "encoder.layer.*.output.dense",
                ("self.query", "self.key", "self.value", "output.dense")),
    "electra": (electra, "encoder.layer.*.attention", "encoder.layer.*.output.dense",
                ("self.query", "self.key", "self.value", "output.dense")),
    "distilbert": (distilbert, "transformer.layer.*.attention", "transformer.layer.*.ffn.lin2",
                   ("q_lin", "k_lin", "v_lin", "out_lin")),
}


def gated(family: str, seed: int = 0) -> nn.Module:
    """A random encoder with heads and feed-forward gates, about half of them closed (log α = ±10)."""
    build, attention, feed_forward, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and LayerNorms have weights but no gate
        l0sparse.sparsify(model, {attention: ("heads", HEADS), feed_forward: "in"}, example_inputs=input_ids())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in find_gates(model):
            closed = torch.rand(gate.log_alpha.shape, generator=generator) < 0.5
            gate.log_alpha.copy_(torch.where(closed, -10.0, 10.0))
    return model.eval()


def prune_checked(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict, torch.Tensor]:
    """``prune(model, x)``, checked: the gated model's last_hidden_state (≤ 1e-4 relative) with fewer parameters.
    Returns the pruned model, its plan and its last_hidden_state."""
    pruned, plan = l0sparse.prune(model, x, return_plan=True)
    with torch.no_grad():
        expected, got = model(x).last_hidden_state, pruned(x).last_hidden_state
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert l0sparse.count_params(pruned) < l0sparse.count_params(model) - sum(g.log_alpha.numel() for g in find_gates(model))
    return pruned, plan, got


def assert_exports_and_loads(pruned: nn.Module, plan: dict, fresh: nn.Module, x: torch.Tensor, got: torch.Tensor) -> None:
    """The pruned model runs under torch.export, and its state_dict, saved and loaded with weights_only=True, fills
    ``l0sparse.rebuild`` of ``fresh`` (a new model of the original architecture) to the same outputs ``got``."""
    exported = torch.export.export(pruned, (x,))
    assert torch.allclose(exported.module()(x).last_hidden_state, got, atol=1e-6)
    saved = io.BytesIO()
    torch.save(pruned.state_dict(), saved)
    saved.seek(0)
    empty = l0sparse.rebuild(fresh, plan, x)
    empty.load_state_dict(torch.load(saved, weights_only=True))
    with torch.no_grad():
        assert torch.equal(empty.eval()(x).last_hidden_state, got)


def attention_modules(model: nn.Module, family: str) -> list[nn.Module]:
    pattern = FAMILIES[family][1].replace("*", "{}")
    return [model.get_submodule(pattern.format(i)) for i in range(2)]


def test_fx_cannot_follow_them_and_trace_channels_uses_torch_export():
    model = bert()
    # B017: which error fx stops on depends on the transformers version (today a TypeError on a Proxy)
    with pytest.raises(Exception):  # noqa: B017
        torch.fx.symbolic_trace(model)
    graph = trace_channels(model, (input_ids(),))
    assert graph.tracer == "export"
    for layer in range(2):  # intermediate units: made by one Linear, through GELU, read by the output Linear
        space = graph.space_of_output(f"encoder.layer.{layer}.intermediate.dense")
        assert space.removable and space.size == FFN
        assert [c.name for c in space.consumers] == [f"encoder.layer.{layer}.output.dense"]
        # the residual stream goes through LayerNorm: never removable
        assert not graph.space_of_output(f"encoder.layer.{layer}.output.dense").removable
    assert graph.shapes["encoder.layer.0.attention.self.query"][1] == (2, 8, WIDTH)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_removes_heads_and_feed_forward_units(family):
    model = gated(family)
    pruned, plan, _ = prune_checked(model, input_ids())
    assert not any(type(m).__module__.startswith("l0sparse") for m in pruned.modules())
    assert not list(gate_masks(pruned))
    q, k, v, out = FAMILIES[family][3]
    for attention, original in zip(attention_modules(pruned, family), attention_modules(model, family)):
        head_gate = next(mask.gate for _, _, _, mask in gate_masks(original) if mask.gate.granularity == "heads")
        kept = max(1, int(head_gate.is_open().sum()))
        width = kept * (WIDTH // HEADS)
        for name in (q, k, v):  # physically smaller matrices, not masks
            assert attention.get_submodule(name).weight.shape == (width, WIDTH)
        assert attention.get_submodule(out).weight.shape == (WIDTH, width)
        assert declared_head_count(attention) == kept
    holder = attention_modules(pruned, family)[0]
    if family != "distilbert":  # the head bookkeeping the forward reads
        assert holder.self.all_head_size == holder.self.num_attention_heads * holder.self.attention_head_size
    else:
        assert holder.dim == holder.n_heads * holder.attention_head_size
    assert plan["tracer"] == "export"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_pruned_model_exports_and_loads_with_weights_only(family):
    x = input_ids()
    pruned, plan, got = prune_checked(gated(family, seed=1), x)
    assert_exports_and_loads(pruned, plan, FAMILIES[family][0](), x, got)  # a fresh, ungated model of the original architecture


def test_prune_with_an_attention_mask():
    model = gated("bert", seed=3)
    x = input_ids()
    mask = torch.ones_like(x)
    mask[0, 5:] = 0  # padding
    pruned = l0sparse.prune(model, (x, mask))
    with torch.no_grad():
        expected, got = model(x, mask).last_hidden_state, pruned(x, mask).last_hidden_state
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert pruned.encoder.layer[0].attention.self.query.out_features < WIDTH or pruned.encoder.layer[1].attention.self.query.out_features < WIDTH


def test_all_heads_closed_keeps_one_zero_head_one_row_wide_and_round_to_rounds_units():
    model = gated("bert", seed=4)
    x = input_ids()
    rounded = l0sparse.prune(model, x, round_to=16)
    assert all(layer.intermediate.dense.out_features % 16 == 0 for layer in rounded.encoder.layer)
    with torch.no_grad():
        for _, _, _, mask in gate_masks(model):
            if mask.gate.granularity == "heads":
                mask.gate.log_alpha.fill_(-10.0)
    pruned = l0sparse.prune(model, x)
    assert [layer.attention.self.num_attention_heads for layer in pruned.encoder.layer] == [1, 1]
    # the forward's reshapes need one head; its output is zero, so its width can be 1
    assert [layer.attention.self.attention_head_size for layer in pruned.encoder.layer] == [1, 1]
    assert pruned.encoder.layer[0].attention.self.query.weight.shape == (1, WIDTH)
    assert pruned.encoder.layer[0].attention.output.dense.weight.shape == (WIDTH, 1)
    assert float(l0sparse.CostModel(model, x).costs(deterministic=True)["params"]) == l0sparse.count_params(pruned)


def test_out_gates_on_intermediate_units_through_export():
    torch.manual_seed(0)
    model = bert()
    l0sparse.sparsify(model, {"encoder.layer.*.intermediate.dense": "out", "encoder.layer.*": "skip", "pooler.dense": "skip"},
                      example_inputs=input_ids())
    masks = {name: mask for name, _, _, mask in gate_masks(model)}
    assert sorted(masks) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]  # the consumers' columns
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha[: FFN // 2] = -10.0
    pruned = l0sparse.prune(model, input_ids())
    assert pruned.encoder.layer[0].intermediate.dense.out_features == FFN // 2
    assert pruned.encoder.layer[0].output.dense.in_features == FFN // 2


@pytest.mark.filterwarnings("ignore:sparsify.*has weights but no gate")
def test_a_head_count_that_does_not_divide_the_width_names_the_module():
    model = bert()
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention' \(BertAttention\).*divisible by 5"):
        l0sparse.sparsify(model, {"encoder.layer.*.attention": ("heads", 5)})
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention'.*has 4 heads"):
        l0sparse.sparsify(model, {"encoder.layer.*.attention": ("heads", 8)})
    assert not list(gate_masks(model))


def test_heads_on_a_module_without_its_output_projection_warn_and_prune_keeps_the_heads():
    model = bert()
    with pytest.warns(UserWarning, match="cannot remove whole heads"):
        l0sparse.sparsify(model, {"encoder.layer.*.attention.self": ("heads", HEADS), "encoder.layer.*": "skip", "pooler.dense": "skip"})
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha[:2] = -10.0
    pruned = l0sparse.prune(model, input_ids())  # the value layer's input columns close, as zeros; no head leaves
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == HEADS
    assert pruned.encoder.layer[0].attention.self.query.out_features == WIDTH


class Branchy(nn.Module):
    """Data-dependent Python control flow: neither torch.fx nor torch.export can follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        hidden = self.body(x)
        if hidden.sum() > 0:
            hidden = hidden * 2
        return self.head(hidden)


@pytest.mark.parametrize("training", [True, False])
def test_an_untraceable_model_says_which_tracer_failed_where_and_stays_unchanged(training):
    model = Branchy().train(training)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    x = torch.randn(3, 4)
    with pytest.raises(ValueError) as caught:
        l0sparse.sparsify(model, {"body.0": "out"}, example_inputs=x)
    message = str(caught.value)
    assert "torch.fx failed at" in message and "torch.export failed at" in message
    assert "test_hf_encoders.py" in message and "in forward" in message  # where: the user's line
    assert "gate and prune traceable submodules" in message and "'body'" in message
    assert not list(gate_masks(model)) and model.training is training
    l0sparse.sparsify(model, {"body.0": "in", "head": "in"})  # input gates need no trace
    with pytest.raises(ValueError, match="torch.export failed at"):
        l0sparse.prune(model, x)
    with pytest.raises(ValueError, match="torch.export failed at"):
        l0sparse.CostModel(model, x)
    assert model.training is training
    assert all(torch.equal(model.state_dict()[f"{name.rsplit('.', 1)[0]}.parametrizations.weight.original"], value)
               if name.endswith("weight") else torch.equal(model.state_dict()[name], value) for name, value in before.items())


def test_wrong_inputs_are_blamed_on_the_inputs_not_the_tracers():
    model = bert()
    with pytest.raises(ValueError, match="do not fit the model"):
        trace_channels(model, (torch.randint(0, VOCAB, (2, 64)),))  # longer than max_position_embeddings


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cost_model_counts_what_prune_leaves(family):
    model = gated(family, seed=2)
    x = input_ids()
    pruned = l0sparse.prune(model, x)
    cost_model = l0sparse.CostModel(model, x)
    costs = cost_model.costs(deterministic=True)
    assert float(costs["params"]) == l0sparse.count_params(pruned)
    assert float(costs["flops"]) == pytest.approx(l0sparse.count_flops(pruned, x))  # attention scores included
    dense = cost_model.costs(probabilities={id(g): torch.ones_like(g.log_alpha) for g in find_gates(model)})
    assert float(dense["flops"]) == pytest.approx(l0sparse.count_flops(model, x))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_pattern_prunes_exactly_through_torch_export(case, monkeypatch):
    """The patterns torch.fx follows, read from torch.export's graph instead: same outputs, plain, costs exact."""
    def no_fx(self, root, concrete_args=None):
        raise TypeError("torch.fx refused for this test")

    monkeypatch.setattr(l0sparse.core.graph._Tracer, "trace", no_fx)
    model, x = build(case)
    assert trace_channels(model, (x,)).tracer == "export"
    pruned = l0sparse.prune(model, x)
    with torch.no_grad():
        expected, got = model.eval()(x), pruned(x)
    assert float((expected - got).abs().max()) <= 1e-5 * max(float(expected.abs().max()), 1.0)
    assert_plain(pruned)
    assert l0sparse.count_params(pruned) < sum(p.numel() for p in model.parameters() if p.dim() > 0)
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert float(costs["params"]) == l0sparse.count_params(pruned)
    assert float(costs["flops"]) == pytest.approx(l0sparse.count_flops(pruned, x))


# ---- whole attention and feed-forward blocks ("block", "heads+block", "in+block") ----

def block_gated(family: str, rules: tuple[object, object], closed: set[str], seed: int = 0) -> nn.Module:
    """A random encoder with ``rules`` on its attention modules and feed-forward output projections (nothing
    else gated): the block
    gates whose owner is in ``closed`` closed (log α = -10), the other block gates open, about half of every
    head and unit gate closed."""
    build, attention, feed_forward, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every other module is skipped by rule
        l0sparse.sparsify(model, {attention: rules[0], feed_forward: rules[1], "*": "skip"}, example_inputs=input_ids())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in find_gates(model):
            if gate.granularity == "block":
                gate.log_alpha.fill_(-10.0 if gate.owner in closed else 10.0)
            else:
                gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    return model.eval()


def closed_blocks(family: str) -> tuple[str, str]:
    """Layer 0's attention block and layer 1's feed-forward block."""
    _, attention, feed_forward, _ = FAMILIES[family]
    return attention.replace("*", "0"), feed_forward.replace("*", "1")


def projection_of(model: nn.Module, family: str, owner: str) -> nn.Linear:
    return model.get_submodule(owner if owner.startswith(FAMILIES[family][2].split("*")[0]) and "attention" not in owner
                               else f"{owner}.{FAMILIES[family][3][3]}")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_closed_block_gives_the_module_without_its_heads_or_units_and_prune_removes_it(family):
    attention, feed_forward = closed_blocks(family)
    model = block_gated(family, ("block", "block"), {attention, feed_forward})
    assert sorted(g.owner for g in find_gates(model)) == sorted(FAMILIES[family][k].replace("*", str(i)) for k in (1, 2) for i in range(2))
    assert all(g.log_alpha.shape == (1,) for g in find_gates(model))
    # the oracle: the same random model with every head of the attention block and every unit of the
    # feed-forward block removed, i.e. their output projections reading nothing (their biases remain)
    torch.manual_seed(0)
    removed = FAMILIES[family][0]()
    with torch.no_grad():
        projection_of(removed, family, attention).weight.zero_()
        model_ffn = removed.get_submodule(feed_forward)
        model_ffn.weight.zero_()
    x = input_ids()
    with torch.no_grad():
        expected = model(x).last_hidden_state
        assert torch.equal(removed.eval()(x).last_hidden_state, expected)  # open blocks are z = 1: the same products
    pruned = l0sparse.prune(model, x)
    with torch.no_grad():
        got = pruned(x).last_hidden_state
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert_plain(pruned)
    q, _, _, out = FAMILIES[family][3]
    holder = pruned.get_submodule(attention)
    assert holder.get_submodule(q).weight.shape == (1, WIDTH) and holder.get_submodule(out).weight.shape == (WIDTH, 1)
    assert declared_head_count(holder) == 1
    ffn = pruned.get_submodule(feed_forward)
    assert ffn.weight.shape == (WIDTH, 0)  # every intermediate unit is gone, the output bias stays
    other = pruned.get_submodule(closed_blocks(family)[0].replace(".0.", ".1."))
    assert holder is not other and other.get_submodule(q).weight.shape == (WIDTH, WIDTH)  # the open block is whole
    full_attention = 4 * WIDTH * WIDTH + 3 * WIDTH  # q, k, v rows with biases, output projection columns
    full_ffn = 2 * WIDTH * FFN + FFN  # intermediate rows with biases, output projection columns
    narrow_head = 4 * WIDTH + 3
    assert l0sparse.count_params(pruned) == l0sparse.count_params(model) - len(find_gates(model)) - full_attention - full_ffn + narrow_head
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert float(costs["params"]) == l0sparse.count_params(pruned)
    assert float(costs["flops"]) == pytest.approx(l0sparse.count_flops(pruned, x))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_block_gates_with_head_and_unit_gates_prune_export_and_load_with_weights_only(family):
    attention, feed_forward = closed_blocks(family)
    model = block_gated(family, (("heads+block", HEADS), "in+block"), {attention, feed_forward}, seed=5)
    _, attentions, feed_forwards, (_, _, _, out) = FAMILIES[family]
    projections = [f"{attentions.replace('*', str(i))}.{out}" for i in range(2)] + [feed_forwards.replace("*", str(i)) for i in range(2)]
    kinds = [[mask.gate.granularity for mask in model.get_submodule(name).parametrizations.weight] for name in projections]
    assert kinds == [["heads", "block"]] * 2 + [["in", "block"]] * 2 and len(find_gates(model)) == 2 * (2 + 2)
    x = input_ids()
    pruned, plan = l0sparse.prune(model, x, return_plan=True)
    with torch.no_grad():
        expected, got = model(x).last_hidden_state, pruned(x).last_hidden_state
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert pruned.get_submodule(feed_forward).in_features == 0
    assert plan["head_layouts"][attention]["kept"] == []  # the closed block takes its open heads with it
    assert_exports_and_loads(pruned, plan, FAMILIES[family][0](), x, got)
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert float(costs["params"]) == l0sparse.count_params(pruned)
    assert float(costs["flops"]) == pytest.approx(l0sparse.count_flops(pruned, x))


@pytest.mark.filterwarnings("ignore:sparsify.*skipped by rule")
def test_expected_costs_and_penalty_of_block_gates_are_linear_in_their_open_probability():
    model = block_gated("bert", (("heads+block", HEADS), "in+block"), set())
    x = input_ids()
    cost_model = l0sparse.CostModel(model, x)
    attention_block, ffn_block = (next(g for g in find_gates(model) if g.granularity == "block" and g.owner == owner)
                                  for owner in ("encoder.layer.0.attention", "encoder.layer.1.output.dense"))
    tokens = x.shape[1]  # MACs per example (one sequence)
    attention_macs = 4 * tokens * WIDTH * WIDTH + 2 * tokens * tokens * WIDTH  # q, k, v, output projection; scores, values
    attention_params = 4 * WIDTH * WIDTH + 3 * WIDTH
    ffn_macs, ffn_params = 2 * tokens * WIDTH * FFN, 2 * WIDTH * FFN + FFN
    p_attention, p_ffn = 0.25, 0.5  # every other gate open
    probabilities = {id(g): torch.ones_like(g.log_alpha) for g in find_gates(model)}
    probabilities[id(attention_block)] = torch.full((1,), p_attention)
    probabilities[id(ffn_block)] = torch.full((1,), p_ffn)
    expected = cost_model.costs(probabilities=probabilities)
    dense_flops, dense_params = l0sparse.count_flops(model, x), l0sparse.count_params(model) - sum(g.log_alpha.numel() for g in find_gates(model))
    rel = 8 * torch.finfo(torch.float32).eps  # a few float32 sums of exact integers
    assert float(expected["flops"]) == pytest.approx(dense_flops - (1 - p_attention) * attention_macs - (1 - p_ffn) * ffn_macs, rel=rel)
    assert float(expected["params"]) == pytest.approx(dense_params - (1 - p_attention) * attention_params - (1 - p_ffn) * ffn_params, rel=rel)
    saved = cost_model.gate_costs("flops")  # closing a block alone saves the whole block
    assert float(saved[id(attention_block)]) == pytest.approx(attention_macs, rel=rel)
    assert float(saved[id(ffn_block)]) == pytest.approx(ffn_macs, rel=rel)
    # λ per weight: a block gate pays for every weight of the projection it multiplies, as a head gate does for its columns
    only = bert()
    l0sparse.sparsify(only, {"encoder.layer.0.output.dense": "block", "encoder.layer.1.output.dense": "block", "*": "skip"})
    paid = l0sparse.penalty(only, lam=1.0)
    assert float(paid) == pytest.approx(float(sum(g.prob_nonzero().sum() for g in find_gates(only))) * WIDTH * FFN, rel=rel)


@pytest.mark.filterwarnings("ignore:sparsify.*has weights but no gate")
def test_bad_block_rules_name_the_module_and_what_is_allowed():
    model = bert()
    with pytest.raises(ValueError, match=r"rules\['encoder.layer.\*.attention'\] = \('block', 4\).*\('heads\+block', number_of_heads\)"):
        l0sparse.sparsify(model, {"encoder.layer.*.attention": ("block", 4)})
    with pytest.raises(ValueError, match=r"'block' on 'embeddings.LayerNorm' \(LayerNorm\): it has no output projection. Allowed"):
        l0sparse.sparsify(model, {"embeddings.LayerNorm": "block"})
    with pytest.raises(ValueError, match=r"'in\+block' on 'encoder.layer.0.attention' \(BertAttention\): 'in\+block' needs an nn.Linear"):
        l0sparse.sparsify(model, {"encoder.layer.*.attention": "in+block"})
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention' \(BertAttention\).*divisible by 5"):
        l0sparse.sparsify(model, {"encoder.layer.*.attention": ("heads+block", 5)})
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    with pytest.raises(ValueError, match=r"'layers.0' \(TransformerEncoderLayer\): an encoder layer holds two blocks"):
        l0sparse.sparsify(encoder, {"layers.0": "block"})
    assert not list(gate_masks(model)) and not list(gate_masks(encoder))


class AttentionThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def test_a_closed_block_on_nn_multihead_attention_prunes_through_fx_to_one_zero_head():
    torch.manual_seed(0)
    model = AttentionThenLinear().eval()
    x = torch.randn(2, 5, 8)
    l0sparse.sparsify(model, {"attention": "heads+block", "head": "skip"}, example_inputs=x)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.fill_(-10.0 if gate.granularity == "block" else 10.0)
        expected = model(x)
        assert torch.allclose(expected, model.head.bias.expand_as(expected))  # nothing but the biases is left
    pruned = l0sparse.prune(model, x)
    with torch.no_grad():
        assert float((pruned(x) - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert pruned.attention.q_proj.out_features == 4  # one zero head of 8 / 2 rows: nn.MultiheadAttention's head width
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert (float(costs["params"]), float(costs["flops"])) == (l0sparse.count_params(pruned), l0sparse.count_flops(pruned, x))
