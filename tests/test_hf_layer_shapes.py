"""Whole decoder layers in a target shape (``DecoderShape(layers=n)``, issue #25): the block gates of
``decoder_rules(model, blocks=True)`` steered to n kept layers by ``ShapeController``, and ``prune_to_shape`` dropping
the others from the model, so that plain ``from_pretrained`` loads it with fewer ``num_hidden_layers``."""

import warnings

import pytest
import torch

import l0sparse
import l0sparse.hf.shapes
from l0sparse import hf as l0hf
from l0sparse.core.sites import find_gates

from test_hf_decoders import COMMON, FFN, VOCAB, WIDTH, assert_same_logits, batch, gated, train_on_penalty
from test_hf_encoders import hf

pytestmark = pytest.mark.usefixtures("torch_export_loaded")  # conftest.py: torch.export's set-up, paid outside the tests

LAYERS = 4


def gated_qwen2() -> torch.nn.Module:
    """Four layers, the last two with sliding-window attention (``config.layer_types``), gated with block gates."""
    torch.manual_seed(0)
    config = hf().Qwen2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True, max_window_layers=2,
                              sliding_window=4, **{**COMMON, "num_hidden_layers": LAYERS})
    model = hf().Qwen2ForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and norms have weights but no gate
        l0sparse.sparsify(model, l0hf.decoder_rules(model, blocks=True), example_inputs=batch())
    return model


def keep_layers(model: torch.nn.Module, kept: list[int]) -> None:
    """Open both block gates of the layers ``kept`` and close the others' (log α ±10); every other gate open."""
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.fill_(10.0)
        blocks = next(layer for layer in l0sparse.hf.shapes._shaped_layers(model) if layer.kind == "layers")
        for index, pair in enumerate(blocks.gate.pairs):
            for gate in pair:
                gate.log_alpha.fill_(10.0 if index in kept else -10.0)


def test_prune_to_shape_drops_the_closed_layers_and_plain_from_pretrained_loads_the_rest(tmp_path):
    model = gated_qwen2()
    keep_layers(model, [0, 3])  # one full-attention layer and one sliding-window layer
    types = list(model.config.layer_types)
    pruned = l0hf.prune_to_shape(model, batch(), l0hf.DecoderShape(layers=2))
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 2
    assert pruned.config.layer_types == [types[0], types[3]]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]  # the KV cache's index, renumbered
    assert model.config.num_hidden_layers == LAYERS and len(model.model.layers) == LAYERS  # the user's model as it was
    assert_same_logits(model, pruned, batch())  # a closed layer was the identity (Qwen2's blocks end without a bias)
    assert_same_logits(model, pruned, batch(length=11, padded=False, seed=1))
    pruned.save_pretrained(tmp_path)
    loaded = hf().AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no l0sparse involved
    assert loaded.config.num_hidden_layers == 2 and l0sparse.count_params(loaded) == l0sparse.count_params(pruned)
    prompt = batch(padded=False)["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, pruned(**batch()).logits)
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False)  # with the KV cache, every layer's entry
        assert torch.equal(pruned.generate(prompt, max_new_tokens=6, do_sample=False), expected)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.slow
def test_shape_controller_lands_layers_heads_and_units_together():
    """On its penalty alone the controller brings the expected kept layers to the shape and lands the test-time gates
    on it (both blocks of the chosen layers open, both of the others closed); the cut then changes nothing."""
    model = gated_qwen2()
    shape = l0hf.DecoderShape(heads=2, kv_heads=1, intermediate_size=24, layers=2)
    controller = l0hf.ShapeController(model, shape, warmup_steps=50, lr=0.05)
    train_on_penalty(model, controller, steps=300)
    layers = controller.deterministic_counts()[-1]
    assert float(layers["layers"]) == 2 and abs(float(controller.expected_counts()[-1]["layers"].detach()) - 2) < 0.5
    blocks = next(layer for layer in l0sparse.hf.shapes._shaped_layers(model) if layer.kind == "layers")
    opened = [[bool(gate.is_open()) for gate in pair] for pair in blocks.gate.pairs]
    assert sorted(opened) == [[False, False], [False, False], [True, True], [True, True]]  # whole layers, not blocks
    model.eval()
    pruned = l0hf.prune_to_shape(model, batch(), shape)
    assert len(pruned.model.layers) == 2 and pruned.config.num_attention_heads == 2
    assert_same_logits(model, pruned, batch())


def test_layers_in_a_shape_are_refused_by_name_where_they_cannot_be_dropped():
    plain = hf().Qwen2ForCausalLM(hf().Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(plain, l0hf.decoder_rules(plain), example_inputs=batch())
    with pytest.raises(ValueError, match=r"no block gates .*decoder_rules\(model, blocks=True\)"):
        l0hf.ShapeController(plain, l0hf.DecoderShape(layers=1))
    with pytest.raises(ValueError, match=r"DecoderShape.layers=5 is more than the 4 layers of 'model.layers'"):
        l0hf.prune_to_shape(gated_qwen2(), batch(), l0hf.DecoderShape(layers=5))
    with pytest.raises(ValueError, match="DecoderShape.layers must be a positive int"):
        l0hf.prune_to_shape(gated_qwen2(), batch(), l0hf.DecoderShape(layers=0))
    # OPT's closed blocks still add their output projections' biases: a layer of only a bias has no stock config
    opt = hf().OPTForCausalLM(hf().OPTConfig(vocab_size=VOCAB, hidden_size=WIDTH, ffn_dim=FFN, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=WIDTH)).eval()
    with torch.no_grad():
        for name, parameter in opt.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(opt, l0hf.decoder_rules(opt, blocks=True), example_inputs=batch())
    keep_layers(opt, [1])
    with pytest.raises(ValueError, match=r"the closed layers \['model.decoder.layers.0'\] still change the output"):
        l0hf.prune_to_shape(opt, batch(), l0hf.DecoderShape(layers=1))


@pytest.mark.parametrize("family", ["llama-gqa-tied", "gemma-mqa", "gpt-neox", "phi3", "gpt2", "falcon"])
def test_every_family_with_block_gates_drops_a_layer_to_a_stock_config(family, tmp_path):
    """The layers are found from the block gates' owners, fused families included; the family's closed layer adds no
    bias (random initialisation leaves output biases at zero where a family has them), so it drops exactly."""
    model = gated(family, blocks=True)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.fill_(10.0)
    keep_layers(model, [1])
    pruned = l0hf.prune_to_shape(model, batch(), l0hf.DecoderShape(layers=1))
    assert pruned.config.num_hidden_layers == 1
    assert_same_logits(model, pruned, batch())
    pruned.save_pretrained(tmp_path)
    loaded = hf().AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = batch(padded=False)["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, pruned(**batch()).logits)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False),
                           model.generate(prompt, max_new_tokens=6, do_sample=False))
