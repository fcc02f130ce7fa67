"""Hugging Face decoder language models gated by ``l0hf.decoder_rules`` (heads, key/value groups, gated-MLP units,
whole blocks), pruned with the KV cache on and keyword example inputs, to plain, smaller models that give the
gated model's logits and greedy tokens. Small random configs built from transformers' config classes: nothing is
downloaded."""

import io
import tempfile
import warnings

import pytest
import torch
from torch import nn

import l0sparse
import l0sparse.core.ops
import l0sparse.core.sites
import l0sparse.core.stream
import l0sparse.hf.shapes
from l0sparse import hf as l0hf
from l0sparse.core.costs import CostModel
from l0sparse.core.ops import grouped_heads_kept
from l0sparse.core.sites import find_gates

from test_hf_encoders import hf

pytestmark = pytest.mark.usefixtures("torch_export_loaded")  # conftest.py: torch.export's set-up, paid outside the tests

VOCAB, WIDTH, FFN, LENGTH = 64, 32, 48, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=2, max_position_embeddings=64)


def llama(**extra) -> nn.Module:  # grouped-query attention: 8 query heads of 4 in 2 key/value groups
    return hf().LlamaForCausalLM(hf().LlamaConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=4, **COMMON, **extra))


FAMILIES = {
    "llama-gqa": llama,
    "llama-gqa-tied": lambda: llama(tie_word_embeddings=True),
    "llama-mha": lambda: hf().LlamaForCausalLM(hf().LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **COMMON)),
    "mistral": lambda: hf().MistralForCausalLM(hf().MistralConfig(num_attention_heads=4, num_key_value_heads=2, **COMMON)),
    "qwen2": lambda: hf().Qwen2ForCausalLM(hf().Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON)),
    # per-head RMSNorms on the queries and keys
    "qwen3": lambda: hf().Qwen3ForCausalLM(hf().Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8, **COMMON)),
    # multi-query: one key/value head
    "gemma-mqa": lambda: hf().GemmaForCausalLM(hf().GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=8, **COMMON)),
    "opt": lambda: hf().OPTForCausalLM(hf().OPTConfig(vocab_size=VOCAB, hidden_size=WIDTH, ffn_dim=FFN, num_hidden_layers=2,
                                                      num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=WIDTH)),
    "gpt-neo": lambda: hf().GPTNeoForCausalLM(hf().GPTNeoConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_layers=2, num_heads=4,
                                                                intermediate_size=FFN, attention_types=[[["global", "local"], 1]],
                                                                max_position_embeddings=64, window_size=4, bos_token_id=1,
                                                                eos_token_id=2)),
    # fused query_key_value, rows interleaved per head; partial rotary (half of each head's 8 dimensions turn)
    "gpt-neox": lambda: gpt_neox(rotary_pct=0.5),
    # fused qkv_proj [q | k | v] (grouped-query) and gate_up_proj [gate | up]; the query width read from the shared config
    "phi3": lambda: phi3(),
    # every layer a transformers Conv1D (weight [in, out]); fused c_attn [q | k | v]; tied head
    "gpt2": lambda: gpt2(),
    # FalconLinear layers (a forward of their own); multi-query query_key_value [q (4 heads) | k | v], parallel attention
    "falcon": lambda: falcon(),
    # the new decoder architecture: query_key_value per key/value group [q of its 2 heads | k | v]
    "falcon-grouped": lambda: falcon(new_decoder_architecture=True, num_kv_heads=2),
}
#: families whose forward reads the query head count from the config every layer shares: prune keeps the same count in
#: every layer or refuses, so their gates close the same heads in every layer here
SHARED_HEAD_COUNT = {"phi3"}
VARIANTS = {"heads": {}, "groups": {"groups": True}, "blocks": {"blocks": True}}


def batch(length: int = LENGTH, padded: bool = True, seed: int = 0) -> dict:
    """Keyword inputs: two sequences, the first left-padded by three tokens when ``padded``."""
    ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def gated(family: str, seed: int = 0, **rule_options) -> nn.Module:
    """A random decoder of ``family`` gated by decoder_rules, about half of every gate closed (log α = ±10)."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and norms have weights but no gate
        l0sparse.sparsify(model, l0hf.decoder_rules(model, **rule_options), example_inputs=batch())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in find_gates(model):
            if family in SHARED_HEAD_COUNT:  # every layer draws the same: the same heads close in every layer
                generator.manual_seed(seed)
            gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    return model.eval()


def assert_same_logits(expected: nn.Module, got: nn.Module, inputs: dict) -> None:
    """Equal logits within 1e-4 of their scale: float32 sums of the same terms in another order, nothing more."""
    with torch.no_grad():
        a, b = expected(**inputs).logits, got(**inputs).logits
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_decoder_rules_name_heads_groups_units_and_blocks():
    model = llama()
    attention = {f"model.layers.{i}.self_attn" for i in range(2)}
    units = {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert l0hf.decoder_rules(model) == {**{a: ("heads", 8) for a in attention}, **{u: "in" for u in units}, nn.Linear: "skip"}
    assert l0hf.decoder_rules(model, groups=True) == {**{a: ("heads", 2) for a in attention}, **{u: "in" for u in units}, nn.Linear: "skip"}
    assert l0hf.decoder_rules(model, blocks=True, heads=False) == {**{u: "in+block" for u in units}, nn.Linear: "skip"}


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_exactly_with_the_cache_on_and_generates_the_same_tokens(family, variant):
    model = gated(family, **VARIANTS[variant])
    dense_params = l0sparse.count_params(model) - sum(g.log_alpha.numel() for g in find_gates(model))
    expected_macs = float(l0sparse.expected_flops(model, batch(), deterministic=True))
    pruned = l0sparse.prune(model, batch())
    assert model.config.use_cache is not False  # the user's config is left as it was
    assert l0sparse.count_params(pruned) < dense_params
    assert not find_gates(pruned)
    assert_same_logits(model, pruned, batch())
    assert_same_logits(model, pruned, batch(length=5, padded=False, seed=1))  # another length, no padding
    assert l0sparse.count_flops(pruned, batch()) == expected_macs  # the cost model counts what prune leaves
    prompt = batch(padded=False)["input_ids"][:1]
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(pruned.generate(prompt, max_new_tokens=6, do_sample=False), tokens)


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize("family", FAMILIES)
def test_the_pruned_decoder_exports_and_reloads_with_weights_only(family):
    assert_exports_and_reloads(family, gated(family))


def assert_exports_and_reloads(family: str, model: nn.Module, inputs: dict | None = None) -> None:
    """``prune`` of ``model``: torch.export gives its logits, and its state dict, reloaded with ``weights_only`` into
    ``rebuild`` of a fresh model of ``family`` (a decoder, or an encoder-decoder with ``inputs``), the same logits
    exactly (a head tied in the fresh model still tied)."""
    inputs = inputs or batch()
    pruned, plan = l0sparse.prune(model, inputs, return_plan=True)
    with torch.no_grad():
        got = pruned(**inputs).logits
    exported = torch.export.export(pruned, (), kwargs={**inputs, "use_cache": False})
    assert torch.allclose(exported.module()(**inputs, use_cache=False).logits, got, atol=1e-6)
    saved = io.BytesIO()
    torch.save(pruned.state_dict(), saved)
    saved.seek(0)
    torch.manual_seed(1)  # another init: every value must come from the file
    fresh = {**FAMILIES, **ENCODER_DECODERS}[family]()
    tied = fresh.lm_head.weight is fresh.get_input_embeddings().weight
    empty = l0sparse.rebuild(fresh, plan, inputs)
    empty.load_state_dict(torch.load(saved, weights_only=True))
    assert (empty.lm_head.weight is empty.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(empty.eval()(**inputs).logits, got)


@pytest.mark.parametrize(("kept", "expected"), [
    ([0, 1, 2, 3, 4, 5, 6, 7], ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1])),
    ([1, 2, 5], ([1, 2, 4, 5], [0, 1])),  # group 1 keeps a closed head so both groups keep two
    ([4, 6], ([4, 6], [1])),  # group 0 goes with its key and value rows
    ([], ([0], [0])),  # the forward needs one head
])
def test_grouped_heads_kept_gives_every_group_the_same_count(kept, expected):
    assert grouped_heads_kept(kept, heads=8, kv_heads=2) == expected


def test_closed_query_heads_of_one_group_remove_the_group_and_set_the_repeat():
    model = llama()
    l0sparse.sparsify(model, {"model.layers.*.self_attn": ("heads", 8), nn.Linear: "skip"})
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.tensor([10.0, -10.0, 10.0, -10.0, -10.0, -10.0, -10.0, -10.0]))
    pruned = l0sparse.prune(model.eval(), batch())
    attention = pruned.model.layers[0].self_attn
    assert attention.q_proj.out_features == 2 * 4 and attention.o_proj.in_features == 2 * 4
    assert attention.k_proj.out_features == attention.v_proj.out_features == 4  # group 1 is gone
    assert attention.num_key_value_groups == 2
    assert_same_logits(model, pruned, batch())


def test_heads_kept_to_fill_a_group_are_not_recorded_as_pruned():
    """Open heads 0, 1, 2 (group 0) and 5 (group 1): group 1 keeps two more to match group 0's three, so only heads 3
    and 7 leave, and config.pruned_heads says so."""
    model = llama()
    l0sparse.sparsify(model, {"model.layers.*.self_attn": ("heads", 8), nn.Linear: "skip"})
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.tensor([10.0, 10.0, 10.0, -10.0, -10.0, 10.0, -10.0, -10.0]))
    pruned = l0sparse.prune(model.eval(), batch())
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 6 * 4
    assert pruned.config.pruned_heads == {0: [3, 7], 1: [3, 7]}
    assert_same_logits(model, pruned, batch())


def test_expected_key_value_rows_are_kept_while_any_query_head_of_their_group_is():
    """Closed form: a query head's q rows and o columns cost P(h open); a key/value head's k and v rows cost
    1 − Π over its group's heads of (1 − P(h open)), the heads' gates being independent."""
    model = llama()
    l0sparse.sparsify(model, {"model.layers.*.self_attn": ("heads", 8), nn.Linear: "skip"})
    costs = CostModel(model.eval(), batch())
    gates = find_gates(model)
    probabilities = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.1, 0.3, 0.6, 0.05])
    everything = float(costs.costs(probabilities={id(g): torch.ones(8) for g in gates})["params"])
    expected = float(costs.costs(probabilities={id(g): probabilities for g in gates})["params"])
    head_dim, per_head_row = 4, WIDTH
    query = 2 * head_dim * per_head_row * (probabilities - 1).sum()  # q rows and o columns
    groups = 1 - (1 - probabilities.view(2, 4)).prod(1)
    key_value = 2 * head_dim * per_head_row * (groups - 1).sum()
    layers = 2
    closed_form = everything + layers * float(query + key_value)
    assert abs(expected - closed_form) <= 1e-6 * everything  # float32 sums


def test_a_head_rule_across_groups_and_fused_projections_are_refused_by_name():
    model = llama()
    with pytest.raises(ValueError, match=r"8 query heads in 2 key/value groups.*\('heads', 8\).*\('heads', 2\)"):
        l0sparse.sparsify(model, {"model.layers.*.self_attn": ("heads", 4), nn.Linear: "skip"})
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn' \(Phi3Attention\): the module has 4 query heads in 2 key/value groups"):
        l0sparse.sparsify(phi3(), {"model.layers.*.self_attn": ("heads", 8), nn.Linear: "skip"})  # fused: its layout's counts
    crossed = hf().GPT2LMHeadModel(hf().GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True))
    with pytest.raises(ValueError, match=r"'transformer.h.0.crossattention': GPT2Attention as cross-attention .* is not laid out"):
        l0hf.decoder_rules(crossed)
    with pytest.raises(TypeError, match="groups must be True or False"):
        l0hf.decoder_rules(model, groups="yes")


def test_keyword_example_inputs_for_a_model_of_the_users_own():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 3)

        def forward(self, x, scale=None):
            hidden = torch.relu(self.up(x))
            return self.down(hidden if scale is None else hidden * scale)

    torch.manual_seed(0)
    model = l0sparse.sparsify(Scaled(), {"down": "in", "up": "skip"})
    with torch.no_grad():
        find_gates(model)[0].log_alpha.copy_(torch.tensor([10.0, -10.0] * 5))
    inputs = {"x": torch.randn(4, 6), "scale": 2.0}  # a number: a tensor of channels would lock them
    pruned = l0sparse.prune(model.eval(), inputs)
    with torch.no_grad():
        assert torch.allclose(pruned(**inputs), model(**inputs), atol=1e-6)
    # per example: 6 inputs to the 5 open units, 5 units to 3 outputs
    assert l0sparse.count_flops(pruned, inputs) == float(l0sparse.expected_flops(model, inputs, deterministic=True)) == 6 * 5 + 5 * 3
    assert pruned.up.out_features == 5
    with pytest.raises(TypeError, match="example_inputs as a dict maps the forward's argument names"):
        l0sparse.prune(model, {0: inputs["x"]})


def open_exactly(model: nn.Module, heads: list[int], units: int) -> None:
    """Open the query heads ``heads`` and the first ``units`` units of every layer (log α = +10), close the rest (−10)."""
    with torch.no_grad():
        for layer in l0sparse.hf.shapes._shaped_layers(model):
            keep = torch.zeros(layer.gate.log_alpha.numel(), dtype=torch.bool)
            keep[heads if layer.kind == "heads" else slice(0, units)] = True
            layer.gate.log_alpha.copy_(torch.where(keep, 10.0, -10.0))


def train_on_penalty(model: nn.Module, controller, steps: int) -> None:
    """Train the gates of ``model`` on ``controller``'s penalty alone (Adam, lr 0.05), stepping the controller after each step."""
    optimizer = torch.optim.Adam([gate.log_alpha for gate in find_gates(model)], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        controller.penalty().backward()
        optimizer.step()
        controller.step()


@pytest.mark.slow
def test_shape_controller_lands_every_layer_on_the_shape():
    """Trained on its penalty alone, the expected counts of every layer settle on the shape: each rounds to the
    target (the shape is whole heads and units), in every layer and dimension."""
    torch.manual_seed(0)
    model = llama().eval()
    l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch(), droprate_init=0.02)
    shape = l0hf.DecoderShape(heads=4, kv_heads=1, intermediate_size=24)
    controller = l0hf.ShapeController(model, shape, warmup_steps=100, lr=0.05)
    train_on_penalty(model, controller, steps=800)
    targets = {"heads": 4, "kv_heads": 1, "units": 24}
    counts = controller.expected_counts()
    assert len(counts) == 4  # two attention modules, two feed-forward blocks
    for count, kept in zip(counts, controller.deterministic_counts()):
        for dimension, value in count.items():
            assert abs(float(value) - targets[dimension]) < 0.5, (dimension, float(value))
            assert float(kept[dimension]) == targets[dimension]  # landed: the test-time gates are the shape
    model.eval()
    assert_same_logits(model, l0hf.prune_to_shape(model, batch(), shape), batch())  # so the cut changes nothing


@pytest.mark.usefixtures("torch_export_loaded")
def test_prune_to_shape_writes_a_stock_config_that_plain_from_pretrained_loads(tmp_path):
    model = llama().eval()
    l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    open_exactly(model, heads=[5, 6, 7, 4], units=24)  # four heads of group 1
    before = [gate.log_alpha.clone() for gate in find_gates(model)]
    pruned = l0hf.prune_to_shape(model, batch(), l0hf.DecoderShape(heads=4, kv_heads=1, intermediate_size=24))
    assert all(torch.equal(a, gate.log_alpha) for a, gate in zip(before, find_gates(model)))  # the user's model as it was
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (4, 1, 4, 24)
    assert_same_logits(model, pruned, batch())  # the open set was the shape: nothing else changed
    pruned.save_pretrained(tmp_path)
    loaded = hf().AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no l0sparse involved
    assert type(loaded) is type(pruned) and l0sparse.count_params(loaded) == l0sparse.count_params(pruned)
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, pruned(**batch()).logits)
        prompt = batch(padded=False)["input_ids"][:1]
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False),
                           model.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.usefixtures("torch_export_loaded")
def test_prune_to_shape_keeps_the_largest_log_alpha_and_opens_a_closed_one_it_keeps():
    model = llama().eval()
    l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    open_exactly(model, heads=[0, 1, 2, 5], units=10)  # fewer units open than the shape keeps; heads spread over both groups
    pruned = l0hf.prune_to_shape(model, batch(), l0hf.DecoderShape(heads=4, intermediate_size=12))
    for layer in pruned.model.layers:
        assert layer.self_attn.q_proj.out_features == 16 and layer.self_attn.k_proj.out_features == 8  # 2 groups of 2
        assert layer.mlp.down_proj.in_features == layer.mlp.up_proj.out_features == 12
    assert pruned.config.num_key_value_heads == 2 and pruned.config.intermediate_size == 12


def test_bad_shapes_are_refused_by_name():
    model = llama().eval()
    l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    cases = [
        (l0hf.DecoderShape(heads=16), ValueError, r"larger than 'model.layers.0.self_attn' \(8 heads, 2 key/value heads\)"),
        (l0hf.DecoderShape(heads=3), ValueError, "3 heads cannot be shared equally by 2 key/value heads"),
        (l0hf.DecoderShape(intermediate_size=0), ValueError, "DecoderShape.intermediate_size must be a positive int"),
        (l0hf.DecoderShape(intermediate_size=49), ValueError, "more than the 48 units"),
        (l0hf.DecoderShape(), ValueError, "names nothing to prune"),
        ({"heads": 4}, TypeError, "shape must be an l0sparse.hf.DecoderShape"),
    ]
    for shape, error, message in cases:
        with pytest.raises(error, match=message):
            l0hf.ShapeController(model, shape)
        with pytest.raises(error, match=message):
            l0hf.prune_to_shape(model, batch(), shape)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        l0hf.ShapeController(model, l0hf.DecoderShape(heads=4), warmup_steps=-1)
    with pytest.raises(ValueError, match="anti_windup must be True or False"):
        l0hf.ShapeController(model, l0hf.DecoderShape(heads=4), anti_windup="yes")
    with pytest.raises(ValueError, match="landing must be True or False"):
        l0hf.ShapeController(model, l0hf.DecoderShape(heads=4), landing=1)
    grouped = llama().eval()
    l0sparse.sparsify(grouped, l0hf.decoder_rules(grouped, groups=True), example_inputs=batch())
    with pytest.raises(ValueError, match="one gate per key/value group of 4 query heads, so 1 groups keep 4 heads, not 2"):
        l0hf.ShapeController(grouped, l0hf.DecoderShape(heads=2, kv_heads=1))
    opt = FAMILIES["opt"]().eval()
    l0sparse.sparsify(opt, l0hf.decoder_rules(opt), example_inputs=batch())
    with pytest.raises(ValueError, match="OPTConfig has no head_dim"):
        l0hf.prune_to_shape(opt, batch(), l0hf.DecoderShape(heads=2))


class Windows(torch.utils.data.Dataset):
    """Random token windows as a causal language model's training examples (the labels are the inputs)."""

    def __init__(self, count: int = 64) -> None:
        self.ids = torch.randint(3, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
def test_the_trainer_callback_trains_steers_prunes_and_saves_with_the_real_trainer(tmp_path):
    transformers = hf()
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the 'hf' and 'dev' extras install it)")
    torch.manual_seed(0)
    model = llama()
    l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch(), droprate_init=0.02)
    shape = l0hf.DecoderShape(heads=4, kv_heads=1, intermediate_size=24)
    controller = l0hf.ShapeController(model, shape, warmup_steps=10, lr=0.05)
    callback = l0hf.L0Callback(controller, example_inputs=batch(), shape=shape, output_dir=tmp_path / "pruned")
    before = [gate.log_alpha.detach().clone() for gate in find_gates(model)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=20, per_device_train_batch_size=8,
                                          learning_rate=0.05, weight_decay=0.1, logging_steps=10, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[callback])
    trainer.train()
    assert int(controller.steps) == 20  # one controller step per optimizer step
    assert all(not torch.equal(a, gate.log_alpha) for a, gate in zip(before, find_gates(model)))  # the gates trained
    gates = {id(gate.log_alpha) for gate in find_gates(model)}
    for group in trainer.optimizer.param_groups:  # every log α in the no-decay group, none left in the decayed one
        assert sum(id(p) in gates for p in group["params"]) == (len(gates) if group["weight_decay"] == 0 else 0)
    logged = [entry for entry in trainer.state.log_history if "l0_expected_heads" in entry]
    assert len(logged) == 3 and all(0 < entry["l0_expected_units"] <= 48 for entry in logged)  # steps 10, 20 and the summary
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads, loaded.config.intermediate_size) == (4, 1, 24)
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, callback.pruned_.eval()(**batch()).logits)


def test_the_trainer_callback_refuses_fp16_and_a_model_without_gates():
    transformers = hf()
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the 'hf' and 'dev' extras install it)")
    with pytest.raises(TypeError, match="regularizer must have a penalty"):
        l0hf.L0Callback(object())
    with pytest.raises(ValueError, match="output_dir needs example_inputs"):
        l0hf.L0Callback(lambda: torch.zeros(()), output_dir="somewhere")
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    callback = l0hf.L0Callback(lambda: torch.zeros(()))
    with pytest.raises(ValueError, match="no l0sparse gates"):
        callback.on_train_begin(args, None, None, model=llama(), optimizer=None)
    args.fp16 = True
    with pytest.raises(ValueError, match="fp16=True scales the loss's gradients"):
        callback.on_train_begin(args, None, None, model=llama(), optimizer=None)


def bart() -> nn.Module:
    return hf().BartForConditionalGeneration(hf().BartConfig(vocab_size=VOCAB, d_model=WIDTH, encoder_layers=1, decoder_layers=1,
                                                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=FFN,
                                                             decoder_ffn_dim=FFN, max_position_embeddings=64))


def t5() -> nn.Module:
    return hf().T5ForConditionalGeneration(hf().T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=FFN, num_layers=1, num_decoder_layers=1,
                                                         num_heads=4, decoder_start_token_id=0))


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize(("build", "options"), [(bart, {}), (bart, {"blocks": True}), (t5, {"heads": False}), (t5, {"heads": False, "blocks": True})],
                         ids=["bart-heads", "bart-blocks", "t5-units", "t5-units-blocks"])
def test_encoder_decoders_prune_exactly_and_generate_the_same_tokens(build, options):
    """BART: self-attention, cross-attention (its keys and values read the encoder) and feed-forward blocks; T5's heads
    are refused (its relative-position bias is one column per head, shared by the layers), its units are not."""
    torch.manual_seed(0)
    model = build().eval()
    inputs = {**batch(), "decoder_input_ids": batch()["input_ids"][:, :5]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, l0hf.decoder_rules(model, **options), example_inputs=inputs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    model.eval()
    expected_macs = float(l0sparse.expected_flops(model, inputs, deterministic=True))
    pruned = l0sparse.prune(model, inputs)
    assert l0sparse.count_params(pruned) < l0sparse.count_params(model) - sum(g.log_alpha.numel() for g in find_gates(model))
    assert_same_logits(model, pruned, inputs)
    assert l0sparse.count_flops(pruned, inputs) == expected_macs
    prompt = batch(padded=False)["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(pruned.generate(prompt, max_new_tokens=5, do_sample=False), model.generate(prompt, max_new_tokens=5, do_sample=False))
    if build is t5:
        with pytest.raises(ValueError, match="relative_attention_bias.*one column per head.*heads=False"):
            l0hf.decoder_rules(build())


def mbart() -> nn.Module:  # pre-norm layers, a norm after the embeddings and at the end of each stack
    return hf().MBartForConditionalGeneration(hf().MBartConfig(vocab_size=VOCAB, d_model=WIDTH, encoder_layers=1, decoder_layers=1,
                                                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=FFN,
                                                               decoder_ffn_dim=FFN, max_position_embeddings=64))


def t5_unscaled() -> nn.Module:  # T5 v1.1: gated-GELU units, no d_model ** -0.5 before the head
    return hf().T5ForConditionalGeneration(hf().T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=FFN, num_layers=1, num_decoder_layers=1,
                                                         num_heads=4, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                                                         tie_word_embeddings=False))


#: BART is post-norm (a LayerNorm after each residual add) with a norm after the embeddings; mBART pre-norm; T5 pre-norm
#: with RMSNorms (no mean, no bias), its head's input scaled by d_model ** -0.5; T5 v1.1 with gated-GELU units
ENCODER_DECODERS = {"bart": bart, "mbart": mbart, "t5": t5, "t5-v1.1": t5_unscaled}


def seq2seq_batch(length: int = LENGTH, padded: bool = True, seed: int = 0) -> dict:
    """:func:`batch` for the encoder, and decoder inputs of a shorter length."""
    decoder = batch(length=length - 3, padded=False, seed=seed + 7)["input_ids"]
    return {**batch(length, padded, seed), "decoder_input_ids": decoder}


def gated_encoder_decoder_with_hidden(family: str, seed: int = 0) -> nn.Module:
    """A random encoder-decoder gated by decoder_rules (T5: units only) and ONE hidden gate over both streams, about half
    of every gate closed."""
    torch.manual_seed(seed)
    model = ENCODER_DECODERS[family]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, l0hf.decoder_rules(model, heads=not family.startswith("t5")), example_inputs=seq2seq_batch())
    l0hf.gate_decoder_hidden(model, seq2seq_batch())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_the_hidden_size_of_an_encoder_decoder_prunes_exactly(family):
    """One gate over the encoder's and the decoder's streams (they share the token embedding): both lose the same
    dimensions, cross-attention's keys and values the columns that read the encoder, the head those of the decoder."""
    model = gated_encoder_decoder_with_hidden(family)
    inputs = seq2seq_batch()
    kept = int(l0sparse.core.stream.hidden_gate(model).is_open().sum())
    costs = CostModel(model, inputs).costs(deterministic=True)
    pruned, plan = l0sparse.prune(model, inputs, return_plan=True)
    shared = pruned.get_input_embeddings()
    assert shared.embedding_dim == kept < WIDTH and pruned.lm_head.in_features == kept and pruned.lm_head.weight is shared.weight
    assert all(stack.embed_tokens.weight is shared.weight for stack in (pruned.get_encoder(), pruned.get_decoder()))  # one table
    assert all(pruned.get_submodule(name).embedding_dim == kept for name in plan["hidden"]["tables"])
    assert all(pruned.get_submodule(name).weight.shape == (kept,) for name in plan["hidden"]["norms"])
    cross = [m for name, m in pruned.named_modules() if name.endswith(("encoder_attn.k_proj", "EncDecAttention.k"))]
    assert cross and all(m.in_features == kept for m in cross)
    assert_same_logits(model, pruned, inputs)
    assert_same_logits(model, pruned, seq2seq_batch(length=6, padded=False, seed=1))
    assert l0sparse.count_flops(pruned, inputs) == float(costs["flops"])
    assert l0sparse.count_params(pruned) == float(costs["params"])
    prompt = batch(padded=False)["input_ids"][:1]
    with torch.no_grad():  # with the cache; no early end: six tokens and their logits
        greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        expected, got = model.generate(prompt, **greedy), pruned.generate(prompt, **greedy)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()) for a, b in zip(expected.logits, got.logits))


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_a_hidden_pruned_encoder_decoder_exports_and_reloads_with_weights_only(family):
    assert_exports_and_reloads(family, gated_encoder_decoder_with_hidden(family), seq2seq_batch())  # shared, embed_tokens and head still one


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_the_hidden_gate_of_an_encoder_decoder_pays_for_its_shared_table_once_and_trains(family):
    model = gated_encoder_decoder_with_hidden(family)
    gate = l0sparse.core.stream.hidden_gate(model)
    paid = [site.name for charge in l0sparse.core.sites.charges(model) if charge.gate is gate for site in charge.paid]
    shared = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
    assert paid.count(shared) == 1 and not any(name.endswith("embed_tokens") for name in paid)  # tied to shared: the same weight
    with torch.no_grad():
        gate.log_alpha.zero_()
    model.train()
    inputs = seq2seq_batch()
    loss = model(**inputs, labels=inputs["decoder_input_ids"]).loss + l0sparse.penalty(model, lam=0.1, N=100)
    loss.backward()
    assert gate.log_alpha.grad is not None and bool(gate.log_alpha.grad.ne(0).any())


def test_the_hidden_size_of_t5_in_a_shape_and_a_stock_config():
    """T5 v1.1 (no scale before the head): stream 32 → 24 and units 48 → 24 load with plain from_pretrained (d_model,
    d_ff); T5 scaling the head's input by d_model ** -0.5 is refused by name (a stock config would load another scale)."""
    model = gated_encoder_decoder_with_hidden("t5-v1.1")
    inputs = seq2seq_batch()
    pruned = l0hf.prune_to_shape(model, inputs, l0hf.DecoderShape(hidden_size=24, intermediate_size=24))
    assert (pruned.config.d_model, pruned.config.d_ff, pruned.get_input_embeddings().embedding_dim) == (24, 24, 24)
    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        loaded = hf().AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, pruned(**inputs).logits)
    scaled = gated_encoder_decoder_with_hidden("t5")
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration scales the language-model head's input by d_model \*\* -0.5"):
        l0hf.prune_to_shape(scaled, inputs, l0hf.DecoderShape(hidden_size=24))


def test_prune_warns_by_name_where_closed_columns_stay_as_zeros():
    """An 'in' rule on an output projection closes columns whose q rows nothing removes (their space is locked by the
    reshape into heads): prune stays exact and says so, naming the layer; decoder_rules' own gates leave no such zeros."""
    model = llama().eval()
    l0sparse.sparsify(model, {"model.layers.0.self_attn.o_proj": "in", nn.Linear: "skip"})
    with torch.no_grad():
        find_gates(model)[0].log_alpha.copy_(torch.tensor([10.0, -10.0] * 16))
    with pytest.warns(UserWarning, match=r"closed input columns stay as zeros in 'model.layers.0.self_attn.o_proj' \(16 of 32\)"):
        pruned = l0sparse.prune(model, batch())
    assert_same_logits(model, pruned, batch())
    conv1d = gpt2().eval()  # a Conv1D's input columns are its weight's rows: read through its rule, the same warning
    l0sparse.sparsify(conv1d, {"transformer.h.0.attn.c_proj": "in", nn.Linear: "skip"})
    with torch.no_grad():
        find_gates(conv1d)[0].log_alpha.copy_(torch.tensor([10.0, -10.0] * 16))
    with pytest.warns(UserWarning, match=r"closed input columns stay as zeros in 'transformer.h.0.attn.c_proj' \(16 of 32\)"):
        pruned = l0sparse.prune(conv1d, batch())
    assert_same_logits(conv1d, pruned, batch())
    shaped = llama().eval()
    l0sparse.sparsify(shaped, l0hf.decoder_rules(shaped), example_inputs=batch())
    open_exactly(shaped, heads=[0, 1, 4, 5], units=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l0sparse.prune(shaped, batch())


#: fused projections read the stream (q/k/v, gate/up) through their columns: GPT-NeoX (LayerNorms with biases, parallel
#: residual, untied head), Phi-3 (RMSNorms), GPT-2 (Conv1D: the stream read through weight rows, written through weight
#: columns; learned positions; tied head), Falcon (FalconLinear, parallel attention; per group in the new architecture)
FUSED_HIDDEN_FAMILIES = ["gpt-neox", "phi3", "gpt2", "falcon", "falcon-grouped"]
HIDDEN_FAMILIES = ["llama-gqa", "llama-gqa-tied", "mistral", "qwen2", "qwen3",
                   "gemma-mqa",  # RMSNorms scaling by 1 + weight
                   "opt", "gpt-neo",  # LayerNorms, learned position embeddings, heads tied to the token embedding
                   *FUSED_HIDDEN_FAMILIES]


def gated_with_hidden(family: str, seed: int = 0) -> nn.Module:
    """:func:`gated` with a hidden-size gate too, about half of its dimensions closed."""
    model = gated(family, seed)
    l0hf.gate_decoder_hidden(model, batch())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        gate = l0sparse.core.stream.hidden_gate(model)
        gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    return model.eval()


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize("family", HIDDEN_FAMILIES)
def test_the_hidden_size_of_a_pre_norm_stream_prunes_exactly(family):
    model = gated_with_hidden(family)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    kept = int(l0sparse.core.stream.hidden_gate(model).is_open().sum())
    costs = CostModel(model, batch()).costs(deterministic=True)
    pruned, plan = l0sparse.prune(model, batch(), return_plan=True)
    embedding = pruned.get_input_embeddings()
    assert embedding.embedding_dim == kept < WIDTH and pruned.lm_head.in_features == kept
    assert all(pruned.get_submodule(name).embedding_dim == kept for name in plan["hidden"]["tables"])  # position embeddings too
    assert all(pruned.get_submodule(name).weight.shape == (kept,) for name in plan["hidden"]["norms"])  # every norm, the final one too
    assert (pruned.lm_head.weight is embedding.weight) == tied  # a tied head stays tied
    assert_same_logits(model, pruned, batch())
    assert_same_logits(model, pruned, batch(length=5, padded=False, seed=1))
    assert l0sparse.count_flops(pruned, batch()) == float(costs["flops"])
    assert l0sparse.count_params(pruned) == float(costs["params"])
    prompt = batch(padded=False)["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(pruned.generate(prompt, max_new_tokens=6, do_sample=False), model.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize("family", ["gemma-mqa", "opt", "gpt-neo", *FUSED_HIDDEN_FAMILIES])
def test_a_hidden_pruned_decoder_exports_and_reloads_with_weights_only(family):
    assert_exports_and_reloads(family, gated_with_hidden(family))  # a tied head (Gemma, OPT, GPT-Neo, GPT-2) still tied after the reload


@pytest.mark.usefixtures("torch_export_loaded")
def test_a_hidden_pruned_decoder_reloads_through_rebuild_and_the_gate_trains():
    model = gated_with_hidden("llama-gqa-tied")
    pruned, plan = l0sparse.prune(model, batch(), return_plan=True)
    saved = io.BytesIO()
    torch.save(pruned.state_dict(), saved)
    saved.seek(0)
    empty = l0sparse.rebuild(FAMILIES["llama-gqa-tied"](), plan, batch())
    empty.load_state_dict(torch.load(saved, weights_only=True))
    with torch.no_grad():
        assert torch.equal(empty.eval()(**batch()).logits, pruned(**batch()).logits)
    gate = l0sparse.core.stream.hidden_gate(model)
    model.train()
    loss = model(**batch(), labels=batch()["input_ids"]).loss + l0sparse.penalty(model, lam=0.1, N=100)
    loss.backward()
    assert gate.log_alpha.grad is not None and bool(gate.log_alpha.grad.ne(0).any())


@pytest.mark.parametrize("family", ["gemma-mqa", "opt", "gpt-neo", "gpt-neox", "gpt2"])
def test_a_hidden_gate_acting_in_its_norms_alone_is_charged_and_trains(family):
    """Gemma's and the LayerNorm decoders' norms read the gate themselves (no parametrization carries it): the penalty
    still charges it for the embedding columns and writer rows it removes, and the task loss reaches it."""
    model = gated_with_hidden(family)
    gate = l0sparse.core.stream.hidden_gate(model)
    with torch.no_grad():
        gate.log_alpha.zero_()  # sampled gates away from the clamps: the task loss has a gradient to give
    model.train()
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    assert gate.log_alpha.grad is not None and bool(gate.log_alpha.grad.ne(0).any())
    gate.log_alpha.grad = None
    l0sparse.penalty(model, lam=0.1, N=100).backward()
    assert gate.log_alpha.grad is not None and bool(gate.log_alpha.grad.gt(0).all())
    assert id(gate) in CostModel(model.eval(), batch()).gate_costs()


def test_the_hidden_gate_of_gpt2_pays_for_the_columns_of_its_conv1d_writers():
    """A Conv1D stores its weight [in, out]: the stream dimension d is written by column d of each c_proj (and its bias
    entry d), and the penalty's weight-decay term charges the hidden gate for those, with the embedding columns."""
    torch.manual_seed(0)
    model = gpt2().eval()
    gate = l0hf.gate_decoder_hidden(model, batch())  # the only gate: the penalty is the hidden gate's alone
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3.0, 3.0, WIDTH))
    squares = model.transformer.wte.weight.pow(2).sum(0) + model.transformer.wpe.weight.pow(2).sum(0)
    for block in model.transformer.h:
        for writer in (block.attn.c_proj, block.mlp.c_proj):  # both square or not, read by the same rule
            squares = squares + writer.weight.pow(2).sum(0) + writer.bias.pow(2)
    expected = 0.5 * (gate.prob_nonzero() * squares).sum()
    got = l0sparse.Penalty(model, lam=0.0, weight_decay=1.0)()
    assert torch.allclose(got, expected.to(got.dtype), rtol=1e-5)


@pytest.mark.parametrize(("build", "heads", "head_dim"), [(lambda: llama(tie_word_embeddings=True), 4, 4), (lambda: phi3(), 2, 8)],
                         ids=["llama-tied", "phi3"])
def test_the_hidden_size_in_a_shape_and_a_stock_config(build, heads, head_dim):
    """Llama (tied) and Phi-3 (fused qkv_proj and gate_up_proj read the stream; its config gets head_dim written out, which
    its attention and rotary embedding read where given): the stream 32 → 24 with heads, key/value heads and units."""
    torch.manual_seed(0)
    model = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    l0hf.gate_decoder_hidden(model, batch())
    shape = l0hf.DecoderShape(heads=heads, kv_heads=1, intermediate_size=24, hidden_size=24)
    pruned = l0hf.prune_to_shape(model, batch(), shape)
    assert (pruned.config.hidden_size, pruned.config.head_dim, pruned.config.num_attention_heads) == (24, head_dim, heads)
    assert pruned.get_input_embeddings().embedding_dim == pruned.lm_head.in_features == 24
    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        loaded = hf().AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, pruned(**batch()).logits)
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == (model.lm_head.weight is model.get_input_embeddings().weight)


class DoubledNorm(nn.Module):
    """A norm with a weight and an epsilon that computes neither an RMSNorm's x̂ · w nor Gemma's x̂ · (1 + w)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), 1e-6

    def forward(self, x):
        return 2 * x * self.weight


def opt(**extra) -> nn.Module:
    config = dict(vocab_size=VOCAB, hidden_size=WIDTH, ffn_dim=FFN, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return hf().OPTForCausalLM(hf().OPTConfig(**{**config, "word_embed_proj_dim": WIDTH, **extra}))


def test_streams_the_hidden_gate_cannot_make_exact_are_refused_by_name():
    odd = llama().eval()
    odd.model.layers[1].post_attention_layernorm = DoubledNorm(WIDTH)
    with pytest.raises(ValueError, match=r"'model.layers.1.post_attention_layernorm' \(DoubledNorm\) computes neither .* \(1 \+ weight\)"):
        l0hf.gate_decoder_hidden(odd, batch())
    post_norm = opt(do_layer_norm_before=False).eval()
    with pytest.raises(ValueError, match=r"'model.decoder.layers.0.self_attn.[kvq]_proj' reads the residual stream of OPTForCausalLM "
                                         r"where no norm stands before it \(a post-norm stream with no norm after its embeddings"):
        l0hf.gate_decoder_hidden(post_norm, batch())
    assert not any(isinstance(m, l0sparse.core.stream.OPEN_NORMS) for m in post_norm.modules())  # refused before any change
    marian = hf().MarianMTModel(hf().MarianConfig(vocab_size=VOCAB, d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                                  decoder_attention_heads=4, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, pad_token_id=1,
                                                  decoder_start_token_id=0, max_position_embeddings=64)).eval()
    with pytest.raises(ValueError, match=r"'model.encoder.layers.0.self_attn.[kvq]_proj' reads the residual stream of MarianMTModel where "
                                         r"no norm stands before it"):  # post-norm as BART, with no norm after its embeddings
        l0hf.gate_decoder_hidden(marian, seq2seq_batch())
    with pytest.raises(ValueError, match=r"token embedding of OPTForCausalLM is 16 wide but 'model.decoder.layers.0.self_attn.out_proj' "
                                         r"writes a stream of 32, joined by 'model.decoder.project_\w+' .*not supported"):
        l0hf.gate_decoder_hidden(opt(word_embed_proj_dim=16).eval(), batch())
    with pytest.raises(ValueError, match=r"no attention module .* \('transformer.h.0.self_attention', BloomAttention, fuses its q/k/v "
                                         r"projections\); its stream cannot be gated"):
        l0hf.gate_decoder_hidden(bloom().eval(), batch())
    with pytest.raises(ValueError, match=r"gate_decoder_hidden: 'transformer.h.0.self_attention': FalconAttention with ALiBi .*"
                                         r"the hidden gate finds the stream's writers through that layout"):
        l0hf.gate_decoder_hidden(falcon(alibi=True).eval(), batch())
    cross = hf().GPT2LMHeadModel(hf().GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, add_cross_attention=True)).eval()
    with pytest.raises(ValueError, match=r"gate_decoder_hidden: 'transformer.h.0.crossattention': GPT2Attention as cross-attention"):
        l0hf.gate_decoder_hidden(cross, batch())
    for build in (gpt_neox, gpt2, falcon):  # configs whose head width is hidden_size / heads: a narrower stream is no stock config
        fused = build().eval()
        l0hf.gate_decoder_hidden(fused, batch())
        with pytest.raises(ValueError, match=r"(GPTNeoXConfig|GPT2Config) has no head_dim|FalconConfig computes head_dim from hidden_size"):
            l0hf.prune_to_shape(fused, batch(), l0hf.DecoderShape(hidden_size=24))
    model = llama().eval()
    l0hf.gate_decoder_hidden(model, batch())
    with pytest.raises(ValueError, match="already has a hidden gate"):
        l0hf.gate_decoder_hidden(model, batch())
    with pytest.raises(ValueError, match="no hidden gate: attach one with l0sparse.hf.gate_decoder_hidden"):
        l0hf.ShapeController(llama(), l0hf.DecoderShape(hidden_size=8))
    gemma = FAMILIES["gemma-mqa"]().eval()  # its embedding is scaled by sqrt(hidden_size), read from the config at load
    l0sparse.sparsify(gemma, l0hf.decoder_rules(gemma), example_inputs=batch())
    l0hf.gate_decoder_hidden(gemma, batch())
    with pytest.raises(ValueError, match=r"'model.embed_tokens' .*scales by the square root of hidden_size"):
        l0hf.prune_to_shape(gemma, batch(), l0hf.DecoderShape(hidden_size=24))


def phi3() -> nn.Module:  # 4 query heads of 8 in 2 key/value groups
    return hf().Phi3ForCausalLM(hf().Phi3Config(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **COMMON))


def test_a_heads_rule_on_phi3_lands_on_its_output_projection_and_prune_slices_the_fused_rows():
    """Phi-3 registers o_proj before its fused qkv_proj: a hand-written head rule's gates go on o_proj's columns (not on
    qkv_proj's input columns, residual-stream features), and prune removes each closed head's query rows of qkv_proj and
    the key and value rows of a group none of whose heads is open, setting the module's and the config's head counts."""
    torch.manual_seed(0)
    model = phi3().eval()
    l0sparse.sparsify(model, {"model.layers.*.self_attn": ("heads", 4), nn.Linear: "skip"})
    gated_modules = {site.name for site in l0sparse.gate_sites(model)}
    assert gated_modules == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))  # group 0 keeps both its heads, group 1 goes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing closed stays
        pruned = l0sparse.prune(model, batch())
    for layer in pruned.model.layers:
        attention = layer.self_attn
        assert (attention.qkv_proj.out_features, attention.o_proj.in_features) == ((2 + 1 + 1) * 8, 2 * 8)
        assert (attention.num_key_value_heads, attention.num_key_value_groups) == (1, 2)
    assert pruned.config.num_attention_heads == 2 and model.config.num_attention_heads == 4  # the user's config is left as it was
    assert_same_logits(model, pruned, batch())


def test_phi3_heads_are_refused_by_name_where_layers_keep_different_counts():
    """Phi-3's forward takes its queries as the first config.num_attention_heads · head_dim rows of qkv_proj, one config
    for every layer: prune cannot leave layers with different query head counts, and says so before slicing anything."""
    model = phi3().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings and norms have weights but no gate
        l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.parametrizations.weight[0].gate.log_alpha.copy_(torch.tensor([10.0, -10.0, -10.0, -10.0]))
    with pytest.raises(ValueError, match=r"read config.num_attention_heads .* keep different counts: 1 in 'model.layers.0.self_attn'; "
                                         r"4 in 'model.layers.1.self_attn'.*prune_to_shape"):
        l0sparse.prune(model, batch())


def test_phi3_prunes_to_a_shape_that_plain_transformers_loads():
    """A shape gives every layer the same heads, so Phi-3's shared config can say them: prune_to_shape writes
    num_attention_heads, num_key_value_heads, head_dim (Phi3Config has none; its attention reads one where given) and
    intermediate_size (gate_up_proj keeps two rows per unit), and from_pretrained gives the same logits."""
    torch.manual_seed(0)
    model = phi3().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    pruned = l0hf.prune_to_shape(model, batch(), l0hf.DecoderShape(heads=2, kv_heads=1, intermediate_size=24))
    attention, mlp = pruned.model.layers[1].self_attn, pruned.model.layers[1].mlp
    assert (attention.qkv_proj.out_features, mlp.gate_up_proj.out_features, mlp.down_proj.in_features) == ((2 + 2) * 8, 48, 24)
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 1, 8, 24)
    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        loaded = hf().AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, pruned(**batch()).logits)


@pytest.mark.parametrize("family", ["gpt-neox", "gpt2"])
def test_units_of_gpt_neox_and_gpt2_prune_to_a_shape_that_plain_transformers_loads(family):
    """Their configs have no head_dim, so a shape's heads are refused (as OPT's); its units are written to the config
    (intermediate_size, GPT-2's n_inner) and the Conv1D layers load at their new widths."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    with pytest.raises(ValueError, match="has no head_dim"):
        l0hf.prune_to_shape(model, batch(), l0hf.DecoderShape(heads=2))
    pruned = l0hf.prune_to_shape(model, batch(), l0hf.DecoderShape(intermediate_size=24))
    with tempfile.TemporaryDirectory() as folder:
        pruned.save_pretrained(folder)
        loaded = hf().AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, pruned(**batch()).logits)
    assert l0sparse.count_params(loaded) < l0sparse.count_params(model) - sum(g.log_alpha.numel() for g in find_gates(model))


def falcon(**extra) -> nn.Module:
    return hf().FalconForCausalLM(hf().FalconConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                                    ffn_hidden_size=FFN, **extra))


def gpt2() -> nn.Module:
    return hf().GPT2LMHeadModel(hf().GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=64, n_inner=FFN,
                                                bos_token_id=1, eos_token_id=2))


def gpt_neox(**extra) -> nn.Module:
    return hf().GPTNeoXForCausalLM(hf().GPTNeoXConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=FFN, **extra))


@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize("family", ["gpt-neox", "phi3", "gpt2"])
def test_closed_heads_and_units_leave_fused_projections_with_their_rows(family):
    """Each layer's fused q/k/v projection keeps the rows of its kept heads only (GPT-NeoX and GPT-2: 3 · 8 per head;
    Phi-3: 8 per query head and 2 · 8 per key/value head kept), Phi-3's gate_up_proj two rows per kept unit, and GPT-2's
    Conv1D layers (weights [in, out]) their kept heads' and units' rows and columns, its split_size the queries' width."""
    model = gated(family)
    pruned = l0sparse.prune(model, batch())
    for name, before in model.named_modules():
        if type(before).__name__ in ("GPT2Attention", "GPT2MLP"):
            assert_gpt2_layer_pruned(before, pruned.get_submodule(name))
        after = pruned.get_submodule(name) if type(before).__name__ in ("GPTNeoXAttention", "Phi3Attention", "Phi3MLP") else None
        if type(before).__name__ in ("GPTNeoXAttention", "Phi3Attention"):
            projection = before.dense if family == "gpt-neox" else before.o_proj
            is_open = projection.parametrizations.weight[0].gate.is_open()
            heads = int(after.dense.in_features if family == "gpt-neox" else after.o_proj.in_features) // 8
            if family == "gpt-neox":
                assert heads == int(is_open.sum()) and after.query_key_value.out_features == 3 * 8 * heads
            else:
                query_heads, groups = grouped_heads_kept(torch.nonzero(is_open).flatten().tolist(), 4, 2)
                assert heads == len(query_heads) < 4 and after.qkv_proj.out_features == 8 * (heads + 2 * len(groups))
        if type(before).__name__ == "Phi3MLP":
            units = int(before.down_proj.parametrizations.weight[0].gate.is_open().sum())
            assert after.down_proj.in_features == units < FFN and after.gate_up_proj.out_features == 2 * units


def assert_gpt2_layer_pruned(before: nn.Module, after: nn.Module) -> None:
    """A GPT-2 attention module or MLP of ``gated("gpt2")`` after prune: as many heads or units as its gate leaves open."""
    if hasattr(before, "c_attn"):
        heads = int(before.c_proj.parametrizations.weight[0].gate.is_open().sum())
        assert 0 < heads < 4 and after.num_heads == heads and after.split_size == 8 * heads
        assert tuple(after.c_attn.weight.shape) == (WIDTH, 3 * 8 * heads) and tuple(after.c_proj.weight.shape) == (8 * heads, WIDTH)
    else:
        units = int(before.c_proj.parametrizations.weight[0].gate.is_open().sum())
        assert tuple(after.c_fc.weight.shape) == (WIDTH, units) and after.c_fc.bias.shape == (units,) and after.c_proj.nx == units < FFN


def test_fused_layouts_are_read_from_the_families_own_modules():
    """GPT-NeoX: head h owns rows [3hd, 3(h+1)d) of query_key_value, its q, k and v (the forward views them as (heads, 3d)
    and chunks each in three); partial rotary turns part of each head. Phi-3: [q | k | v] and [gate | up]."""
    neox = FAMILIES["gpt-neox"]()
    attention = neox.gpt_neox.layers[0].attention
    assert attention.rotary_ndims == 4 < attention.head_size == 8
    layout = l0sparse.core.ops.fused_head_layout("a", attention)
    assert layout["fused"]["a.query_key_value"][:4] == [["q", 0], ["kv", 0], ["kv", 0], ["q", 1]] and layout["projection"] == "a.dense"
    assert l0hf.decoder_rules(neox, groups=True)["gpt_neox.layers.0.attention"] == ("heads", 4)  # multi-head: a group is a head
    model = phi3()
    layout = l0sparse.core.ops.fused_head_layout("a", model.model.layers[0].self_attn)
    assert layout["fused"]["a.qkv_proj"] == [["q", 0], ["q", 1], ["q", 2], ["q", 3], ["kv", 0], ["kv", 1], ["kv", 0], ["kv", 1]]
    assert l0sparse.core.ops.fused_unit_layouts(model)["model.layers.1.mlp.down_proj"] == {"producer": "model.layers.1.mlp.gate_up_proj",
                                                                                          "segments": 2}
    assert l0hf.decoder_rules(model, groups=True) == {**{f"model.layers.{i}.self_attn": ("heads", 2) for i in range(2)},
                                                       **{f"model.layers.{i}.mlp.down_proj": "in" for i in range(2)}, nn.Linear: "skip"}


def bloom() -> nn.Module:
    return hf().BloomForCausalLM(hf().BloomConfig(vocab_size=VOCAB, hidden_size=WIDTH, n_layer=2, n_head=4))


@pytest.mark.slow
@pytest.mark.usefixtures("torch_export_loaded")
@pytest.mark.parametrize("build", [gpt_neox, bloom], ids=["gpt-neox", "bloom"])
def test_fused_attention_families_prune_their_units_exactly(build):
    """GPT-NeoX and BLOOM fuse q, k and v into one query_key_value Linear (BLOOM's heads refused by name: its ALiBi
    slopes), and their feed-forward units are gated and removed with decoder_rules(model, heads=False)."""
    torch.manual_seed(0)
    model = build().eval()
    if build is bloom:
        with pytest.raises(ValueError, match=r"'transformer.h.0.self_attention' \(BloomAttention\) is not supported: its ALiBi .*"
                                             r"heads=False\) gates the feed-forward units only"):
            l0hf.decoder_rules(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, l0hf.decoder_rules(model, heads=False), example_inputs=batch())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    model.eval()
    expected_macs = float(l0sparse.expected_flops(model, batch(), deterministic=True))
    pruned = l0sparse.prune(model, batch())
    assert l0sparse.count_params(pruned) < l0sparse.count_params(model) - sum(g.log_alpha.numel() for g in find_gates(model))
    assert_same_logits(model, pruned, batch())
    assert l0sparse.count_flops(pruned, batch()) == expected_macs
    prompt = batch(padded=False)["input_ids"][:1]
    with torch.no_grad():
        assert torch.equal(pruned.generate(prompt, max_new_tokens=5, do_sample=False), model.generate(prompt, max_new_tokens=5, do_sample=False))


def test_falcon_with_biases_keeps_its_closed_units_as_zeros_and_says_so():
    """torch.export shows a FalconLinear's bias as an add after its matmul, which locks the units' channels: its heads
    go, its closed units stay as zero columns, and prune names the layers (exact all the same)."""
    model = falcon(bias=True, multi_query=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, l0hf.decoder_rules(model), example_inputs=batch())
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.tensor([10.0, -10.0]).repeat(gate.log_alpha.numel() // 2))
    with pytest.warns(UserWarning, match=r"closed input columns stay as zeros in 'transformer.h.0.mlp.dense_4h_to_h' \(24 of 48\)"):
        pruned = l0sparse.prune(model, batch())
    assert pruned.transformer.h[0].self_attention.query_key_value.out_features == 2 * 3 * 8  # heads 0 and 2 of 4
    assert_same_logits(model, pruned, batch())


class OwnLinear(nn.Linear):
    """An nn.Linear with a forward of its own and no rule: tracing sees a matmul, not this layer."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_families_l0sparse_cannot_follow_are_refused_by_name():
    model = llama()
    model.model.layers[0].mlp.down_proj = OwnLinear(FFN, WIDTH)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj' holds a OwnLinear, an nn.Linear with a forward of its own"):
        l0hf.decoder_rules(model, heads=False)
    alibi = falcon(alibi=True)  # ALiBi slopes per head index, as BLOOM's: heads refused, units gated
    with pytest.raises(ValueError, match=r"'transformer.h.0.self_attention': FalconAttention with ALiBi .* wrong slopes.*heads=False"):
        l0hf.decoder_rules(alibi)
    assert set(l0hf.decoder_rules(alibi, heads=False)) == {f"transformer.h.{i}.mlp.dense_4h_to_h" for i in range(2)} | {nn.Linear}

