"""Hugging Face encoders of several families gated by ``l0hf.encoder_rules`` (found by structure, not by
name), pruned to plain, smaller models; and the Hugging Face bookkeeping prune leaves (``config.pruned_heads``).
Small random configs built from transformers' config classes: nothing is downloaded."""

import json
import warnings

import pytest
import torch
from torch import nn

import l0sparse
from l0sparse import hf as l0hf
from l0sparse.core.sites import find_gates
from l0sparse.core.sparsify import declared_head_count, gate_masks

from models import HEADS, VOCAB, WIDTH, assert_plain, input_ids
from test_hf_encoders import FAMILIES, FFN, assert_exports_and_loads, hf, prune_checked

pytestmark = pytest.mark.usefixtures("torch_export_loaded")  # conftest.py: torch.export's set-up, paid outside the tests

SIZES = dict(num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB)


def xlm_roberta() -> nn.Module:
    return hf().XLMRobertaModel(hf().XLMRobertaConfig(hidden_size=WIDTH, max_position_embeddings=40, **SIZES)).eval()


def deberta_v2() -> nn.Module:  # relative positions projected by the same key/query Linears as the tokens
    return hf().DebertaV2Model(hf().DebertaV2Config(hidden_size=WIDTH, max_position_embeddings=32, **SIZES)).eval()


def albert() -> nn.Module:  # one layer's weights shared by both layers: one gate set for both
    # GELU here; its default "gelu_new" (pow in torch.export's graph) is tested in test_elementwise_ops.py
    return hf().AlbertModel(hf().AlbertConfig(hidden_size=WIDTH, embedding_size=16, max_position_embeddings=32, hidden_act="gelu",
                                              **SIZES)).eval()


def xlm() -> nn.Module:  # attention modules and feed-forward blocks in two lists: attentions.i, ffns.i
    return hf().XLMModel(hf().XLMConfig(emb_dim=WIDTH, n_layers=2, n_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=32)).eval()


def mpnet() -> nn.Module:
    return hf().MPNetModel(hf().MPNetConfig(hidden_size=WIDTH, max_position_embeddings=40, **SIZES)).eval()


BUILDERS = {family: spec[0] for family, spec in FAMILIES.items()} | {
    "xlm-roberta": xlm_roberta, "deberta-v2": deberta_v2, "albert": albert, "xlm": xlm}


def gated(family: str, seed: int = 0, model: nn.Module | None = None, heads: bool = True) -> nn.Module:
    """``model`` (default: a random one of ``family``) gated by encoder_rules, about half of every gate closed (log α = ±10)."""
    torch.manual_seed(seed)
    model = BUILDERS[family]() if model is None else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and LayerNorms have weights but no gate
        l0sparse.sparsify(model, l0hf.encoder_rules(model, heads=heads), example_inputs=input_ids())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    return model.eval()


def kept_heads(model: nn.Module) -> dict[str, list[int]]:
    """Per head-gated attention module of a gated model, the heads whose gate is open."""
    return {mask.gate.owner: torch.nonzero(mask.gate.is_open()).flatten().tolist()
            for _, _, _, mask in gate_masks(model) if mask.gate.granularity == "heads"}


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_rules_find_what_the_hand_written_rules_name(family):
    _, attention, feed_forward, _ = FAMILIES[family]
    model = BUILDERS[family]()
    rules = l0hf.encoder_rules(model)
    assert rules == {**{attention.replace("*", str(i)): ("heads", HEADS) for i in range(2)},
                     **{feed_forward.replace("*", str(i)): "in" for i in range(2)}, nn.Linear: "skip"}


@pytest.mark.slow
@pytest.mark.parametrize("family", BUILDERS)
def test_every_family_prunes_by_encoder_rules_to_a_smaller_model_that_exports_and_loads(family):
    model = gated(family)
    x = input_ids()
    pruned, plan, got = prune_checked(model, x)
    assert_plain(pruned)
    kept = kept_heads(model)
    assert kept and all(len(heads) < HEADS for heads in kept.values())  # the seed closes heads in every layer
    for owner, heads in kept.items():  # physically smaller q, k, v and output projection: the module's four Linears
        q, k, v, out = [m for m in pruned.get_submodule(owner).modules() if isinstance(m, nn.Linear)]
        width = len(heads) * (WIDTH // HEADS) if heads else 1  # all closed: one zero head, one row wide
        assert [m.weight.shape for m in (q, k, v, out)] == [(width, WIDTH)] * 3 + [(WIDTH, width)]
        assert declared_head_count(pruned.get_submodule(owner)) == max(len(heads), 1)
    units = [name for name, rule in l0hf.encoder_rules(BUILDERS[family]()).items() if rule == "in"]
    assert units and all(pruned.get_submodule(name).in_features < FFN for name in units)
    assert_exports_and_loads(pruned, json.loads(json.dumps(plan)), BUILDERS[family](), x, got)


def test_encoder_rules_name_what_they_looked_for_and_a_bad_head_count():
    with pytest.raises(ValueError, match=r"encoder_rules found no attention module in Sequential: .*query/key/value"):
        l0hf.encoder_rules(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    model = BUILDERS["bert"]()
    model.encoder.layer[1].attention.self.num_attention_heads = 5
    with pytest.raises(ValueError, match=r"'encoder.layer.1.attention' \(BertAttention\) has 5 heads, which do not divide its width 32"):
        l0hf.encoder_rules(model)


@pytest.mark.parametrize("model, heads, message", [
    (None, True, "model must be an nn.Module .*got NoneType"),
    ("bert", True, "model must be an nn.Module .*got str"),
    ("bert-model", "no", "heads must be True .* or False .*got 'no'"),  # a non-empty string would read as True
    ("bert-model", 0, "heads must be True .* or False .*got 0"),
    ("bert-model", None, "heads must be True .* or False .*got None"),
], ids=["None", "a name", "heads 'no'", "heads 0", "heads None"])
def test_encoder_rules_refuse_a_wrong_type_by_name(model, heads, message):
    model = BUILDERS["bert"]() if model == "bert-model" else model
    with pytest.raises(TypeError, match=message):
        l0hf.encoder_rules(model, heads=heads)


def test_a_per_head_table_every_layer_reads_refuses_heads_and_heads_false_gates_the_units():
    model = mpnet()  # MPNet's relative-position bias: one column per head, shared by the layers
    with pytest.raises(ValueError, match=r"'encoder.relative_attention_bias' in MPNetModel .* one column per head.*heads=False"):
        l0hf.encoder_rules(model)
    rules = l0hf.encoder_rules(model, heads=False)
    assert rules == {"encoder.layer.0.output.dense": "in", "encoder.layer.1.output.dense": "in", nn.Linear: "skip"}
    model = gated("mpnet", model=model, heads=False)
    pruned = l0sparse.prune(model, input_ids())
    assert all(layer.intermediate.dense.out_features < FFN for layer in pruned.encoder.layer)


# ---- Hugging Face's bookkeeping: config.pruned_heads ----

@pytest.mark.parametrize("family", ["bert", "distilbert", "xlm"])
def test_prune_records_the_original_indices_of_removed_heads_in_config_pruned_heads(family):
    model = gated(family, seed=1)
    pruned = l0sparse.prune(model, input_ids())
    removed = {int(owner.split(".")[-2 if family != "xlm" else -1]): [h for h in range(HEADS) if h not in heads]
               for owner, heads in kept_heads(model).items()}
    assert pruned.config.pruned_heads == {layer: heads for layer, heads in removed.items() if heads}
    assert pruned.config.num_attention_heads == HEADS  # the config keeps the original counts; each module holds its own
    assert getattr(model.config, "pruned_heads", {}) == {}  # the gated model is not changed


def test_a_second_prune_merges_original_head_indices_and_a_classifier_s_encoder_gets_them():
    classifier = l0hf.SentenceClassifier(BUILDERS["bert"](), num_classes=3)
    x = input_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(classifier, l0hf.encoder_rules(classifier), example_inputs=x)
    for layer in classifier.encoder.encoder.layer:  # the set transformers < 5 keeps on each attention module
        layer.attention.pruned_heads = set()
    first = [[1, 3], [0, 1, 2, 3]]  # open heads per layer
    with torch.no_grad():
        for layer, heads in enumerate(first):
            gate = next(g for g in find_gates(classifier) if g.owner == f"encoder.encoder.layer.{layer}.attention")
            gate.log_alpha.copy_(torch.tensor([10.0 if h in heads else -10.0 for h in range(HEADS)]))
    once = l0sparse.prune(classifier.eval(), x)
    assert once.encoder.config.pruned_heads == {0: [0, 2]}
    assert [layer.attention.pruned_heads for layer in once.encoder.encoder.layer] == [{0, 2}, set()]
    # train again on the pruned model: layer 0 now has 2 heads (originally 1 and 3), layer 1 has 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(once, l0hf.encoder_rules(once), example_inputs=x)
    with torch.no_grad():
        for layer, closed in ((0, [1]), (1, [2])):  # positions in today's module: original head 3 in layer 0, head 2 in layer 1
            gate = next(g for g in find_gates(once) if g.owner == f"encoder.encoder.layer.{layer}.attention")
            gate.log_alpha.copy_(torch.tensor([-10.0 if h in closed else 10.0 for h in range(gate.log_alpha.numel())]))
    twice = l0sparse.prune(once.eval(), x)
    assert twice.encoder.config.pruned_heads == {0: [0, 2, 3], 1: [2]}
    assert [layer.attention.self.num_attention_heads for layer in twice.encoder.encoder.layer] == [1, 3]
    assert [layer.attention.pruned_heads for layer in twice.encoder.encoder.layer] == [{0, 2, 3}, {2}]


def test_save_pretrained_keeps_pruned_heads_but_from_pretrained_cannot_rebuild_and_rebuild_can(tmp_path):
    model = gated("bert", seed=1)
    x = input_ids()
    pruned, plan = l0sparse.prune(model, x, return_plan=True)
    with torch.no_grad():
        expected = pruned(x).last_hidden_state
    pruned.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pruned_heads"] == {str(k): v for k, v in pruned.config.pruned_heads.items()}
    hf().logging.set_verbosity_error()
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the config's sizes are the original ones
        hf().BertModel.from_pretrained(tmp_path)
    # the supported way: a fresh model of the saved config, l0sparse.rebuild with the plan, the saved weights
    safetensors = pytest.importorskip("safetensors.torch")
    empty = l0sparse.rebuild(hf().AutoModel.from_config(hf().AutoConfig.from_pretrained(tmp_path)), plan, x)
    empty.load_state_dict(safetensors.load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(empty.eval()(x).last_hidden_state, expected)
    assert empty.config.pruned_heads == pruned.config.pruned_heads
