"""l0sparse.core.prune: pruned models equal the gated ones and are plain, smaller, scriptable and exportable; the plan,
rebuild and round_to."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import l0sparse
from l0sparse.core.prune import plain_copy

from models import CASES, assert_plain, assert_prunes_exactly, assert_same_outputs, build, mlp, randomise


@pytest.mark.parametrize("case", list(CASES))
def test_prune_matches_gated_eval_outputs_and_is_plain(case):
    model, x = build(case)
    pruned = l0sparse.prune(model, x)
    assert_same_outputs(model, pruned, x)
    assert_plain(pruned)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters() if p.dim() > 0)


def test_pruned_residual_model_is_smaller_everywhere():
    model, x = build("resnet")
    pruned = l0sparse.prune(model, x)
    closed = int((~model.block.conv1.parametrizations.weight[0].gate.is_open()).sum())
    assert closed > 0
    width = 8 - closed
    assert pruned.stem.out_channels == pruned.block.conv2.out_channels == pruned.bn.num_features == width
    assert pruned.block.conv1.in_channels == pruned.depthwise.groups == width


def _kept_heads(attention) -> int:
    return int(attention.out_proj.parametrizations.weight[0].gate.is_open().sum())


def test_transformer_heads_and_feed_forward_are_removed():
    model, x = build("attention")
    pruned = l0sparse.prune(model, x)
    head_dim = 16 // 4
    ffn_gate = model.encoder.linear2.parametrizations.weight[0].gate
    assert pruned.encoder.linear1.out_features == int(ffn_gate.is_open().sum()) < 32
    for gated, rebuilt in ((model.attention, pruned.attention), (model.encoder.self_attn, pruned.encoder.self_attn)):
        kept = _kept_heads(gated)
        assert 0 < kept < 4  # randomise closed some heads and left some open
        for projection in ("q_proj", "k_proj", "v_proj"):
            assert rebuilt[projection].out_features == kept * head_dim
        assert rebuilt["out_proj"].in_features == kept * head_dim
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in pruned.modules())


@pytest.mark.parametrize("case", ["attention-prenorm", "attention-seq-first"])
def test_masked_attention_keeps_its_heads_and_the_rest_loses_theirs(case):
    model, x = build(case)
    pruned = l0sparse.prune(model, x)
    assert isinstance(pruned.masked, nn.MultiheadAttention) and pruned.masked.num_heads == 4  # a mask: left whole
    assert pruned.attention["q_proj"].out_features == _kept_heads(model.attention) * 4 < 16
    assert pruned.encoder["self_attn"]["q_proj"].out_features == _kept_heads(model.encoder.self_attn) * 4 < 16
    assert_same_outputs(model, pruned, x)


def test_input_gates_select_inputs():
    model, x = build("mlp")
    pruned = l0sparse.prune(model, x)
    kept = int(model[0].parametrizations.weight[0].gate.is_open().sum())
    assert pruned.get_submodule("0").in_features == kept < 20
    assert "index_select" in pruned.code


def test_pruned_model_scripts_when_forward_annotations_are_strings():
    # l0sparse.core.models uses `from __future__ import annotations`: its forward's annotations are strings
    from l0sparse.core.models import LeNet5

    torch.manual_seed(0)
    model, x = LeNet5().eval(), torch.randn(2, 1, 28, 28)
    l0sparse.sparsify(model, example_inputs=x)
    randomise(model)
    model.eval()
    pruned = l0sparse.prune(model, x)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(pruned)(x), pruned(x))


def test_plan_is_a_dataclass_saved_in_the_format_of_earlier_plans():
    """prune's plan is a PrunePlan; what return_plan gives (and pruned.json files hold) is its to_json() dict, with the
    keys plans have always had, and rebuild takes either."""
    from l0sparse.core.prune import PrunePlan, Selection

    model, x = build("mlp")
    pruned, saved = l0sparse.prune(model, x, return_plan=True)
    assert sorted(saved) == ["columns", "followers", "heads", "inline", "rows", "selections"]
    plan = PrunePlan.from_json(json.loads(json.dumps(saved)))
    assert plan.to_json() == saved and plan.tracer == "fx"
    assert all(isinstance(selection, Selection) for selection in plan.selections) and plan.selections
    for form in (plan, saved):
        fresh = l0sparse.rebuild(CASES["mlp"][0](), form, x)
        fresh.load_state_dict(pruned.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh(x), pruned(x))


@pytest.mark.parametrize("case", ["resnet", "attention"])
def test_pruned_model_scripts_exports_and_round_trips(tmp_path, case):
    model, x = build(case)
    pruned, plan = l0sparse.prune(model, x, return_plan=True)
    with torch.no_grad():
        reference = pruned(x)
        assert torch.allclose(torch.jit.script(pruned)(x), reference, atol=1e-6)
        exported = torch.export.export(pruned, (x,))
        assert torch.allclose(exported.module()(x), reference, atol=1e-6)
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    fresh = l0sparse.rebuild(CASES[case][0](), json.loads((tmp_path / "plan.json").read_text()), x)
    fresh.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), reference)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resnet", "attention"])
def test_onnx_export(tmp_path, case):
    onnx = pytest.importorskip("onnx", reason="ONNX export is checked only where the onnx package is installed")
    model, x = build(case)
    pruned = l0sparse.prune(model, x)
    torch.onnx.export(pruned, (x,), str(tmp_path / "pruned.onnx"))
    exported = onnx.load(str(tmp_path / "pruned.onnx"))
    onnx.checker.check_model(exported)
    last = pruned.fc if case == "resnet" else pruned.attention["q_proj"]  # attention: the kept heads' projection
    weights = [t for t in exported.graph.initializer if tuple(t.dims) in (tuple(last.weight.shape), tuple(last.weight.shape[::-1]))]
    assert weights, "a pruned weight is in the ONNX graph with its pruned shape"


def test_prune_without_gates_warns_and_copies():
    model = mlp()
    with pytest.warns(UserWarning, match="no l0sparse gates"):
        copied = l0sparse.prune(model, torch.randn(2, 20))
    assert copied is not model and torch.equal(copied[0].weight, model[0].weight)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=2, max_size=5), granularity=st.sampled_from(["in", "out", "weight"]),
       seed=st.integers(0, 2**16))
def test_random_mlps_prune_exactly(sizes, granularity, seed):
    torch.manual_seed(seed)
    model = mlp(sizes)
    x = torch.randn(5, sizes[0])
    last = str(2 * (len(sizes) - 2))
    rules = {nn.Linear: granularity, last: "in"}  # the output layer's own outputs cannot be removed
    l0sparse.sparsify(model, rules=rules, example_inputs=x)
    randomise(model, generator=torch.Generator().manual_seed(seed))
    assert_prunes_exactly(model, x)


class RandomCNN(nn.Module):
    def __init__(self, widths, kernel, residual, batch_norm):
        super().__init__()
        self.stem = nn.Conv2d(2, widths[0], kernel, padding=kernel // 2)
        self.convs = nn.ModuleList(nn.Conv2d(w, w2, kernel, padding=kernel // 2) for w, w2 in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(w) if batch_norm else nn.Identity() for w in widths[1:])
        self.residual = residual
        self.head = nn.Linear(widths[-1] * 9, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for conv, norm in zip(self.convs, self.norms):
            y = torch.relu(norm(conv(x)))
            x = x + y if self.residual else y  # residual models have equal widths
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 3), 1))


@settings(max_examples=20, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=4), kernel=st.sampled_from([1, 3]), residual=st.booleans(),
       batch_norm=st.booleans(), seed=st.integers(0, 2**16))
def test_random_cnns_prune_exactly(widths, kernel, residual, batch_norm, seed):
    torch.manual_seed(seed)
    if residual:
        widths = [widths[0]] * len(widths)
    model = RandomCNN(widths, kernel, residual, batch_norm)
    x = torch.randn(3, 2, 7, 7)
    l0sparse.sparsify(model, example_inputs=x)
    randomise(model, generator=torch.Generator().manual_seed(seed))
    assert_prunes_exactly(model, x)


def _widths(module: nn.Module) -> list[int]:
    if isinstance(module, nn.Linear):
        return [module.in_features, module.out_features]
    if isinstance(module, nn.modules.conv._ConvNd):
        return [module.in_channels, module.out_channels]
    return []


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("round_to", [3, 4])
def test_round_to_keeps_outputs_and_rounds_every_width(case, round_to):
    model, x = build(case)
    heads = [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    # head counts are not rounded: the projections inside attention modules keep whole heads
    original = {name: _widths(module) for name, module in plain_copy(model).named_modules()
                if not any(name.startswith(prefix + ".") for prefix in heads)}
    pruned, plan = l0sparse.prune(model, x, return_plan=True, round_to=round_to)
    assert_same_outputs(model, pruned, x)
    checked = 0
    for name, module in pruned.named_modules():
        for width, full in zip(_widths(module), original.get(name, [])):
            assert width % round_to == 0 or width == full, (name, width, full)
            checked += 1
    assert checked > 0
    unrounded = l0sparse.prune(model, x)
    assert l0sparse.count_params(pruned) <= l0sparse.count_params(plain_copy(model))
    uneven = [(name, width) for name, module in unrounded.named_modules()
              for width, full in zip(_widths(module), original.get(name, [])) if width % round_to and width != full]
    if uneven:  # rounding had something to do: it kept more
        assert l0sparse.count_params(pruned) > l0sparse.count_params(unrounded)
    else:
        assert l0sparse.count_params(pruned) == l0sparse.count_params(unrounded)
    fresh = l0sparse.rebuild(CASES[case][0](), plan, x)
    fresh.load_state_dict(pruned.state_dict())
    assert_same_outputs(model, fresh.eval(), x)


@pytest.mark.parametrize("round_to", [0, -8, 2.0, True])
def test_round_to_must_be_a_positive_int(round_to):
    model, x = build("mlp")
    with pytest.raises(ValueError, match="round_to must be a positive int"):
        l0sparse.prune(model, x, round_to=round_to)
