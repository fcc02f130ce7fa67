"""The hidden-size gate (issue #12, item 2; l0sparse.hf.hidden): one gate over the residual stream of a BERT-like
encoder, LayerNorm statistics over the open dimensions while gated, and an exact prune to k dimensions.
Small random configs from transformers' config classes: nothing is downloaded."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import l0sparse
import l0sparse.hf
from l0sparse.core.stream import OpenLayerNorm, hidden_gate
from l0sparse.hf import gate_hidden
from l0sparse.core.sites import find_gates

from models import FFN, HEADS, VOCAB, WIDTH, assert_plain, input_ids

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")

CLASSES = 3
pytestmark = pytest.mark.usefixtures("torch_export_loaded")  # conftest.py: torch.export's set-up, paid outside the tests


def bert_config(**changes):
    settings = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FFN,
                    vocab_size=VOCAB, max_position_embeddings=32)
    return transformers.BertConfig(**{**settings, **changes})


def encoder(pooler: bool = True) -> nn.Module:
    return transformers.BertModel(bert_config(), add_pooling_layer=pooler).eval()


def classifier() -> nn.Module:
    return l0sparse.hf.SentenceClassifier(encoder(pooler=False), CLASSES).eval()


def set_gates(model: nn.Module, seed: int = 0) -> None:
    """About half of every gate closed (log α = -10), the rest open with fractional test-time values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in find_gates(model):
            closed = torch.rand(gate.shape, generator=generator) < 0.5
            fractional = torch.rand(gate.shape, generator=generator) * 3 - 1.5  # test-time z in about (0.12, 0.88)
            gate.log_alpha.copy_(torch.where(closed, -10.0, fractional))


def gated(build=classifier, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and LayerNorms have weights but no gate of sparsify's
        l0sparse.sparsify(model, l0sparse.hf.encoder_rules(model), example_inputs=input_ids())
    gate_hidden(model, input_ids())
    set_gates(model, seed)
    return model.eval()


def relative(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_prune_keeps_the_outputs_on_the_kept_dimensions(seed):
    model = gated(encoder, seed)
    gate = hidden_gate(model)
    kept = torch.nonzero(gate.is_open()).flatten()
    assert 0 < len(kept) < WIDTH and bool(((gate.deterministic() > 0) & (gate.deterministic() < 1)).any())  # fractional z
    x = input_ids(seed)
    pruned = l0sparse.prune(model, x)
    assert_plain(pruned)
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    assert got.last_hidden_state.shape == (2, 8, len(kept))  # the last hidden state is k-dimensional
    assert float(expected.last_hidden_state[..., gate.deterministic() == 0].abs().max()) == 0.0
    assert relative(expected.last_hidden_state[..., kept], got.last_hidden_state) <= 1e-4
    assert relative(expected.pooler_output, got.pooler_output) <= 1e-4  # the pooler reads the stream: its columns sliced
    assert pruned.pooler.dense.in_features == len(kept) and pruned.pooler.dense.out_features == WIDTH
    for layer in pruned.encoder.layer:
        assert layer.attention.output.LayerNorm.normalized_shape == (len(kept),)
        assert layer.intermediate.dense.in_features == layer.attention.self.query.in_features == len(kept)
        assert layer.output.dense.out_features == layer.attention.output.dense.out_features == len(kept)
    assert pruned.embeddings.word_embeddings.weight.shape == (VOCAB, len(kept))


def test_classifier_logits_are_equal_and_parameters_fall_by_the_closed_dimensions():
    model = gated(classifier)
    x = input_ids()
    gate = hidden_gate(model)
    k = int(gate.is_open().sum())
    pruned = l0sparse.prune(model, x)
    with torch.no_grad():
        assert relative(model(x), pruned(x)) <= 1e-4
    # the same model with every hidden dimension open: heads and feed-forward units pruned alike
    everything = copy.deepcopy(model)
    with torch.no_grad():
        hidden_gate(everything).log_alpha.fill_(10.0)
    full = l0sparse.prune(everything, x)
    encoder = pruned.encoder
    per_dimension = sum(table.num_embeddings for table in (encoder.embeddings.word_embeddings, encoder.embeddings.position_embeddings,
                                                           encoder.embeddings.token_type_embeddings))
    per_dimension += 2 + CLASSES  # the embeddings' LayerNorm, the classifier's column
    for layer in encoder.encoder.layer:
        attention = layer.attention
        per_dimension += sum(attention.self.get_submodule(n).out_features for n in ("query", "key", "value"))  # columns
        per_dimension += attention.output.dense.in_features + 1 + 2  # a row and its bias, LayerNorm's γ and β
        per_dimension += layer.intermediate.dense.out_features + layer.output.dense.in_features + 1 + 2
    assert l0sparse.count_params(full) - l0sparse.count_params(pruned) == (WIDTH - k) * per_dimension
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert float(costs["params"]) == l0sparse.count_params(pruned)
    assert float(costs["flops"]) == l0sparse.count_flops(pruned, x)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["roberta", "electra", "distilbert", "bert-for-classification"])
def test_other_families(family):
    build = {
        "roberta": lambda: transformers.RobertaModel(transformers.RobertaConfig(**{**bert_config().to_dict(), "max_position_embeddings": 40})),
        "electra": lambda: transformers.ElectraModel(transformers.ElectraConfig(  # embeddings projected onto the stream
            embedding_size=16, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FFN,
            vocab_size=VOCAB, max_position_embeddings=32)),
        "distilbert": lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
            dim=WIDTH, n_layers=2, n_heads=HEADS, hidden_dim=FFN, vocab_size=VOCAB, max_position_embeddings=32)),
        "bert-for-classification": lambda: transformers.BertForSequenceClassification(bert_config(num_labels=CLASSES)),
    }[family]
    model = gated(lambda: build().eval())
    x = input_ids()
    kept = torch.nonzero(hidden_gate(model).is_open()).flatten()
    pruned = l0sparse.prune(model, x)
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    if family == "bert-for-classification":  # its classifier reads the pooler's output, not the stream: not sliced
        assert relative(expected.logits, got.logits) <= 1e-4
        assert pruned.classifier.in_features == WIDTH and pruned.bert.pooler.dense.in_features == len(kept)
    else:
        assert relative(expected.last_hidden_state[..., kept], got.last_hidden_state) <= 1e-4
    costs = l0sparse.CostModel(model, x).costs(deterministic=True)
    assert float(costs["params"]) == l0sparse.count_params(pruned)
    assert float(costs["flops"]) == l0sparse.count_flops(pruned, x)


def test_pruned_model_exports_and_round_trips_its_state_dict():
    model = gated(classifier)
    x = input_ids()
    pruned, plan = l0sparse.prune(model, x, return_plan=True)
    assert plan["hidden"]["kept"] == torch.nonzero(hidden_gate(model).is_open()).flatten().tolist()
    exported = torch.export.export(pruned, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), pruned(x))
    buffer = io.BytesIO()
    torch.save(pruned.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(5)
    empty = l0sparse.rebuild(classifier(), plan, x)  # a fresh, ungated model of the same architecture
    empty.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), pruned(x))


def test_the_gate_trains_and_the_penalty_charges_it():
    model = gated(classifier)
    gate = hidden_gate(model)
    assert gate.granularity == "hidden" and gate.owner == "encoder.hidden"
    model.train()
    loss = model(input_ids()).square().sum()
    loss.backward()
    assert gate.log_alpha.grad is not None and float(gate.log_alpha.grad.abs().sum()) > 0
    penalty = l0sparse.Penalty(model, lam={"encoder.hidden": 1.0, "*": 0.0})
    gate.log_alpha.grad = None
    penalty().backward()
    assert float(gate.log_alpha.grad.abs().sum()) > 0


def tiny() -> nn.Module:
    """Width 8, one layer of 2 heads, 6 feed-forward units: small enough to count by hand."""
    config = transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6,
                                     vocab_size=10, max_position_embeddings=12, type_vocab_size=2)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def test_penalty_and_cost_model_by_hand():
    model = tiny()
    x = torch.randint(1, 10, (1, 5), generator=torch.Generator().manual_seed(0))
    gate = gate_hidden(model, x)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-10.0, 10.0, 0.5, -10.0, 10.0, 2.0, -10.0, 10.0]))
    # λ per weight that a dimension removes in the layers that make the stream: 10 + 12 + 2 embedding entries,
    # the attention output row (8 weights and a bias), the feed-forward output row (6 and a bias)
    p = gate.prob_nonzero().detach()
    assert float(l0sparse.penalty(model, lam=1.0)) == pytest.approx(float(p.sum()) * (10 + 12 + 2 + 9 + 7), rel=1e-6)
    assert float(l0sparse.penalty(model, lam={"hidden": 2.0}, N=4)) == pytest.approx(float(p.sum()) * 40 * 2 / 4, rel=1e-6)
    # MACs per example at length T = 5: q, k, v and the output projection (4·T·8 per dimension), the feed-forward
    # Linears (2·T·6 per dimension), attention itself (2·T·T·8, no dimension of the stream)
    T, k = 5, 5  # five open dimensions
    per_dimension = 4 * T * 8 + 2 * T * 6
    cost_model = l0sparse.CostModel(model, x)
    costs = cost_model.costs(deterministic=True)
    assert float(costs["flops"]) == k * per_dimension + 2 * T * T * 8
    # parameters: 24 embedding entries, 3 LayerNorms (γ, β), 3 q/k/v columns and the output row and bias (8 each + 1),
    # a feed-forward column (6) and row (6 + 1) per dimension; the biases of q, k, v (24) and of the first Linear (6)
    assert float(costs["params"]) == k * (24 + 6 + 3 * 8 + 9 + 6 + 7) + 24 + 6
    expected = cost_model.costs()
    assert float(expected["flops"]) == pytest.approx(float(p.sum()) * per_dimension + 2 * T * T * 8, rel=1e-6)
    saved = cost_model.gate_costs("flops")[id(gate)]
    assert torch.allclose(saved, torch.full((8,), float(per_dimension)))
    pruned = l0sparse.prune(model, x)
    assert l0sparse.count_flops(pruned, x) == costs["flops"] and l0sparse.count_params(pruned) == costs["params"]
    with torch.no_grad():
        kept = torch.nonzero(gate.is_open()).flatten()
        assert relative(model(x).last_hidden_state[..., kept], pruned(x).last_hidden_state) <= 1e-4


def test_open_layer_norm_matches_layer_norm_over_the_open_dimensions():
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    gate = l0sparse.Gate(6)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([10.0, -10.0, 0.3, -10.0, 10.0, -0.5]))
    gate.eval()
    open_norm = OpenLayerNorm(norm, gate)
    x = torch.randn(4, 6)
    z = gate.deterministic()
    kept = torch.nonzero(z > 0).flatten()
    reference = nn.functional.layer_norm(x[:, kept], (len(kept),), norm.weight[kept], norm.bias[kept], norm.eps) * z[kept]
    got = open_norm(x)
    assert torch.allclose(got[:, kept], reference, atol=1e-6)
    assert float(got[:, z == 0].abs().max()) == 0.0
    assert torch.allclose(open_norm.plain(kept.tolist())(x[:, kept]), reference, atol=1e-6)


def test_bad_input_is_refused_and_leaves_the_model_unchanged():
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="attention.self.query"):
        gate_hidden(plain, torch.randn(2, 4))
    model = classifier().train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="example_inputs do not fit"):  # float ids: the probe forward fails inside the model
        gate_hidden(model, torch.randn(2, 8))
    assert model.training and hidden_gate(model) is None and not find_gates(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    gate_hidden(model, input_ids())
    with pytest.raises(ValueError, match="already has a hidden gate"):
        gate_hidden(model, input_ids())


def model_state(model: nn.Module) -> tuple:
    """What a failed call must leave as it was: values, module types and modes, parametrizations, hooks."""
    return (model.training, {key: value.clone() for key, value in model.state_dict().items()},
            [(name, type(m).__name__, m.training, parametrize.is_parametrized(m), bool(m._forward_hooks or m._forward_pre_hooks))
             for name, m in model.named_modules()])


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[2] == after[2] and before[1].keys() == after[1].keys()
    assert all(value.is_meta or torch.equal(value, after[1][key]) for key, value in before[1].items())


def sparsified(build=classifier) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and LayerNorms have weights but no gate of sparsify's
        l0sparse.sparsify(model, l0sparse.hf.encoder_rules(model), example_inputs=input_ids())
    return model.train()


def on_meta() -> nn.Module:
    with torch.device("meta"):
        return sparsified()


BAD_INPUTS = [  # (description, model builder, example_inputs, error, message)
    ("no model", lambda: None, input_ids(), TypeError, "model must be an nn.Module.*got NoneType"),
    ("a model name", lambda: "bert", input_ids(), TypeError, "model must be an nn.Module.*got str"),
    ("not BERT-like", lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), torch.randn(2, 4), ValueError, "attention.self.query"),
    ("no example inputs", sparsified, None, TypeError, "example_inputs must be a batch .*got NoneType"),
    ("a dict naming no argument", lambda: sparsified(encoder), {"ids": input_ids()}, ValueError,
     r"example_inputs do not fit BertModel's forward .*exactly one of input_ids"),
    ("float token ids", sparsified, torch.randn(2, 8), ValueError, r"example_inputs do not fit SentenceClassifier's forward \(got \(2, 8\) float32"),
    ("one sequence, no batch", sparsified, input_ids()[0], ValueError, r"example_inputs do not fit .*got \(8,\) int64"),
    ("ids beyond the vocabulary", sparsified, input_ids() + VOCAB, ValueError, "example_inputs do not fit .*IndexError"),
    ("an empty batch", sparsified, input_ids()[:0], ValueError, r"example_inputs\[0\] has an empty batch"),
    ("a model on the meta device", on_meta, input_ids(), ValueError, "'encoder.embeddings.word_embeddings.weight' is on the meta device"),
    ("a bad gate setting", sparsified, input_ids(), ValueError, "droprate_init must be in the open interval"),
]


@pytest.mark.parametrize("description, build, example, error, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_gate_hidden_refuses_bad_input_by_name_and_changes_nothing(description, build, example, error, message):
    model = build()
    before = model_state(model) if isinstance(model, nn.Module) else None
    settings = {"droprate_init": 2.0} if description == "a bad gate setting" else {}
    with pytest.raises(error, match=message):
        gate_hidden(model, example, **settings)
    if before is not None:
        assert_same_state(before, model_state(model))


def test_a_second_gate_hidden_and_sparsify_after_it_are_refused_and_change_nothing():
    model = sparsified()
    gate_hidden(model, input_ids())
    before = model_state(model)
    with pytest.raises(ValueError, match="already has a hidden gate; attach it once"):
        gate_hidden(model, input_ids())
    with pytest.raises(ValueError, match="already has l0sparse gates .*sparsify a model once"):
        l0sparse.sparsify(model, l0sparse.hf.encoder_rules(model), example_inputs=input_ids())
    assert_same_state(before, model_state(model))
    alone = classifier().train()  # gate_hidden without sparsify gates the hidden size only; sparsify must come first
    gate_hidden(alone, input_ids())
    before = model_state(alone)
    with pytest.raises(ValueError, match="the hidden gate of l0sparse.hf.gate_hidden: call sparsify first, then gate_hidden"):
        l0sparse.sparsify(alone, l0sparse.hf.encoder_rules(alone), example_inputs=input_ids())
    assert_same_state(before, model_state(alone))


def test_prune_on_float_ids_names_the_embedding_not_the_pruned_width():
    """The message was '...query' expects 13 features': the first Linear of the copy prune had narrowed to k."""
    model = gated(classifier).train()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"got shape \(2, 8\), dtype float32; the first layer 'encoder.embeddings.word_embeddings' "
                                         "is an nn.Embedding: it takes integer ids"):
        l0sparse.prune(model, torch.randn(2, 8))
    assert_same_state(before, model_state(model))


def test_a_fully_closed_hidden_gate_prunes_to_one_zero_dimension():
    model = gated(classifier)
    with torch.no_grad():
        hidden_gate(model).log_alpha.fill_(-10.0)
    x = input_ids()
    pruned = l0sparse.prune(model, x)  # checks the logits: the classifier's bias alone
    assert pruned.encoder.embeddings.word_embeddings.embedding_dim == 1
    assert float(pruned.encoder.embeddings.word_embeddings.weight.abs().max()) == 0.0
    with torch.no_grad():
        assert torch.allclose(pruned(x), pruned.classifier.bias.expand(len(x), -1))


def test_round_to_rounds_the_units_but_not_the_kept_hidden_dimensions():
    """A closed dimension kept to round k up would enter the LayerNorms' statistics: k stays as the gate says."""
    model = gated(classifier)
    pruned, plan = l0sparse.prune(model, input_ids(), return_plan=True, round_to=8)
    kept = len(plan["hidden"]["kept"])
    assert kept % 8 and kept == int(hidden_gate(model).is_open().sum()) == pruned.encoder.embeddings.word_embeddings.embedding_dim
    assert all(layer.intermediate.dense.out_features % 8 == 0 or layer.intermediate.dense.out_features == FFN
               for layer in pruned.encoder.encoder.layer)


def test_report_counts_the_hidden_gate_in_dimensions():
    from l0sparse.core.report import gate_units

    model = gated(classifier)
    x = input_ids()
    gate = hidden_gate(model)
    units = {owner: what for owner, what, _ in gate_units(model)}
    assert units["encoder.hidden"] == "dimensions" and units["encoder.encoder.layer.0.attention"] == "heads"
    table = l0sparse.summary(model, x)
    rows = {row["layer"]: row for row in table.rows}
    row = rows["encoder.hidden (dimensions)"]
    assert (row["gates_kept"], row["gates_total"]) == (int(gate.is_open().sum()), WIDTH) and row["counted_in_layers"]
    assert table.rows[0] is row  # before the layers it gates
    heads = rows["encoder.encoder.layer.0.attention (heads)"]
    assert heads["gates_total"] == HEADS
    names = [r["layer"] for r in table.rows]
    assert names.index("encoder.encoder.layer.0.attention (heads)") + 1 == names.index("encoder.encoder.layer.0.attention.self.query")
    gate_rows = [r for r in table.rows if r.get("counted_in_layers")]
    assert len(gate_rows) == 3 and all(r["params"] == r["flops"] == r["params_kept"] == r["flops_kept"] == 0 for r in gate_rows)
    assert "encoder.hidden (dimensions)" in str(table) and "| encoder.hidden (dimensions) |" in table.to_markdown()
    before, after = l0sparse.architecture(model).split(" -> ")
    assert before.split("-")[0] == str(WIDTH) and after.split("-")[0] == str(int(gate.is_open().sum()))


def test_config_hidden_size_keeps_the_original_width_and_the_saved_config_rebuilds():
    """config.hidden_size is what a fresh model is built at (and, over num_attention_heads, the head width): the
    plan slices that model to k dimensions, so the config must keep W. A config saying k would build a model
    the plan cannot slice, or none at all when k is no multiple of the head count."""
    model = gated(encoder)
    x = input_ids()
    pruned, plan = l0sparse.prune(model, x, return_plan=True)
    k = len(plan["hidden"]["kept"])
    assert pruned.config.hidden_size == WIDTH and pruned.embeddings.word_embeddings.embedding_dim == k < WIDTH
    saved = pruned.config.to_dict()
    fresh = transformers.BertModel(transformers.BertConfig.from_dict(saved))
    rebuilt = l0sparse.rebuild(fresh, plan, x)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x).last_hidden_state, pruned(x).last_hidden_state)
    if k % HEADS:
        with pytest.raises(ValueError):
            transformers.BertModel(transformers.BertConfig.from_dict({**saved, "hidden_size": k}))
