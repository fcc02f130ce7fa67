"""The strong importance baseline of issue #26: every gate scored by the loss gradient of its mask (the first-order
Taylor term |Σ W ∂L/∂W|), all gates ranked in one pool by score per MAC, bisected to the FLOPs target. On the small
random BERT of tests/test_hf_task.py; nothing is trained here except in the one run at the end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import l0sparse
from l0sparse.training.baselines import FIXED_OPEN, cost_ranked_prune_, taylor_importance
from l0sparse.training.config import config_from_dict, load_config, read_config_json
from l0sparse.core.costs import CostModel
from l0sparse.training.regularizers import ImportancePruning
from l0sparse.core.sites import find_gates, gate_masks

pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")
from test_hf_task import CLASSES, HEADS, config, gated_classifier, teacher_dir, tiny_classifier, tiny_task, token_ids  # noqa: E402, F401

EPS64 = torch.finfo(torch.float64).eps


def batches(count: int = 2, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(token_ids(size, seed=10 + i), (torch.arange(size) + i) % CLASSES) for i in range(count)]


def hidden_gated_classifier():
    from l0sparse.hf.hidden import gate_hidden

    model = gated_classifier()
    gate_hidden(model, token_ids(2))
    return model


# --- the score -------------------------------------------------------------------------------------------------

def test_the_taylor_score_is_the_weights_times_their_gradient_summed_per_gate_then_per_batch():
    """Σ_batches |Σ_j W_j ∂L/∂W_j| over each gate's weights, from the weights' own gradients (float64).

    The two computations multiply the same numbers (the backward to the gated weights is the same graph) and differ
    only in the order of one sum of n products per gate and batch: recursive summation is off by at most
    γ_n Σ|terms|, γ_n = n·ε/(1 − n·ε) (Higham, Accuracy and Stability, §4.2), for each of the two orders."""
    model = gated_classifier().double()
    data = batches()
    scores = taylor_importance(model, data, F.cross_entropy)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.fill_(FIXED_OPEN)
    model.eval()
    expected = {id(gate): torch.zeros(gate.shape, dtype=torch.float64) for gate in find_gates(model)}
    bound = {key: torch.zeros_like(value) for key, value in expected.items()}
    for inputs, targets in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        for _, module, tensor, mask in gate_masks(model):  # each of these gates multiplies one tensor
            weight = getattr(module.parametrizations, tensor).original
            terms = weight.detach() * weight.grad
            n = terms.numel() // mask.gate.log_alpha.numel()
            gamma = n * EPS64 / (1 - n * EPS64)
            expected[id(mask.gate)] += mask.per_gate(terms).abs()
            bound[id(mask.gate)] += 2 * gamma * mask.per_gate(terms.abs())
    for gate in find_gates(model):
        assert gate.granularity in ("heads", "in")
        assert bool(((scores[id(gate)] - expected[id(gate)]).abs() <= bound[id(gate)]).all())
        assert bool((scores[id(gate)] > 0).all())  # a random model: no gate is exactly irrelevant


def test_the_taylor_score_is_the_derivative_of_the_loss_in_the_gate_by_central_differences():
    """Every gate, hidden dimensions (which also scale LayerNorm outputs) included, against (L(1+h) − L(1−h)) / 2h with
    z = 1 ± h on that gate alone (float64). With h = ε^(1/3) the rounding error of the two losses, ≲ k·ε·|L| / h, and
    the truncation error, h²·|L'''| / 6, are both of order ε^(2/3)·scale; k (ulps of rounding in one loss) and |L'''|
    are taken as at most 100 each, so the tolerance is 100·ε^(2/3)·max(1, |L|)."""
    model = hidden_gated_classifier().double()
    inputs, targets = batches(1)[0]
    scores = taylor_importance(model, [(inputs, targets)], F.cross_entropy)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.fill_(FIXED_OPEN)
    model.eval()
    h = EPS64 ** (1 / 3)
    checked = set()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(inputs), targets))
        tolerance = 100 * EPS64 ** (2 / 3) * max(1.0, abs(loss))
        for gate in find_gates(model):
            for index in range(0, gate.log_alpha.numel(), 3):  # every third gate of each tensor
                derivative = (loss_with_gate_at(model, gate, index, 1 + h, inputs, targets)
                              - loss_with_gate_at(model, gate, index, 1 - h, inputs, targets)) / (2 * h)
                assert abs(float(scores[id(gate)][index]) - abs(derivative)) <= tolerance, (gate.owner, index)
            checked.add(gate.granularity)
    assert checked == {"heads", "in", "hidden"}


def loss_with_gate_at(model, gate, index: int, z: float, inputs, targets) -> float:
    """The loss with gate ``index`` of ``gate`` at ``z`` (its output scaled; every other gate as it is)."""
    scale = torch.ones(gate.shape, dtype=torch.float64)
    scale[index] = z
    handle = gate.register_forward_hook(lambda module, args, output: output * scale)
    try:
        return float(F.cross_entropy(model(inputs), targets))
    finally:
        handle.remove()


def test_scoring_leaves_the_gates_the_mode_and_the_gradients_as_they_were():
    model = gated_classifier()
    before = [g.log_alpha.detach().clone() for g in find_gates(model)]
    model.train()
    taylor_importance(model, batches(1), F.cross_entropy)
    assert model.training and all(torch.equal(g.log_alpha, b) for g, b in zip(find_gates(model), before))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(IndexError):  # a loss that fails half-way (a class past the last): still nothing changed
        taylor_importance(model, [(token_ids(4), torch.arange(4) + 100)], F.cross_entropy)
    assert model.training and all(torch.equal(g.log_alpha, b) for g, b in zip(find_gates(model), before))
    assert all(not g._forward_hooks for g in find_gates(model))  # the probes are gone


# --- the ranking -----------------------------------------------------------------------------------------------

def per_mac(model, example, scores) -> dict[int, torch.Tensor]:
    """score ÷ the MACs each gate's unit costs, computed here from CostModel.gate_costs."""
    with torch.enable_grad():
        costs = CostModel(model, example).gate_costs("flops")
    return {key: scores[key].double() / costs[key].double() for key in scores}


def deterministic_flops(model, example) -> float:
    return float(CostModel(model, example).costs(deterministic=True)["flops"])


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.9])
def test_the_joint_ranking_keeps_the_longest_head_of_the_ranking_that_fits_the_target(target):
    model = gated_classifier()
    x = token_ids(2)
    dense = deterministic_flops(model, x)
    generator = torch.Generator().manual_seed(int(100 * target))
    scores = {id(g): torch.rand(g.shape, generator=generator, dtype=torch.float64) for g in find_gates(model)}
    ratio = per_mac(model, x, scores)
    kept = cost_ranked_prune_(model, target, x, scores)
    assert kept == pytest.approx(deterministic_flops(model, x) / dense, rel=1e-9) and kept <= target
    gates = find_gates(model)
    pooled = torch.cat([ratio[id(g)] for g in gates])
    is_open = torch.cat([g.is_open() for g in gates])
    best = torch.zeros_like(is_open)  # each tensor's best gate, kept whatever the budget
    offset = 0
    for gate in gates:
        best[offset + int(ratio[id(gate)].argmax())] = True
        offset += gate.log_alpha.numel()
    order = pooled.argsort(descending=True, stable=True)
    ranked_open = is_open[order] | best[order]
    count = int(ranked_open.logical_not().nonzero()[0]) if not bool(ranked_open.all()) else len(order)
    assert bool(is_open[order[:count]].all()) and not bool((is_open & ~best)[order[count:]].any())  # a prefix, and the best
    # the next gate of the ranking would not fit
    following = order[count]
    start = 0
    for gate in gates:
        if start <= following < start + gate.log_alpha.numel():
            with torch.no_grad():
                gate.log_alpha.view(-1)[following - start] = FIXED_OPEN
        start += gate.log_alpha.numel()
    assert deterministic_flops(model, x) > target * dense
    model.train()
    for gate in gates:
        assert not gate.log_alpha.requires_grad and torch.equal(gate(), gate.deterministic())  # fixed: exactly 0 or 1


def test_the_split_between_heads_and_units_follows_the_score_per_mac_not_the_score():
    """A head costs 10.5 units here. Heads scored 5 and units 1 (heads ahead by score, behind per MAC): only heads go.
    Heads scored 50 and units 1 (ahead both ways): only units go. Issue #12's baseline would close both kinds."""
    x = token_ids(2)
    for head_score, closed_kind in ((5.0, "heads"), (50.0, "in")):
        model = gated_classifier()
        dense = deterministic_flops(model, x)
        generator = torch.Generator().manual_seed(3)
        scores = {id(g): (head_score if g.granularity == "heads" else 1.0) * (1 + 1e-3 * torch.rand(g.shape, generator=generator))
                  for g in find_gates(model)}
        with torch.enable_grad():
            costs = CostModel(model, x).gate_costs("flops")
        head_cost = float(costs[id(find_gates(model)[0])][0])
        unit_cost = float(costs[id(find_gates(model)[1])][0])
        assert head_cost == pytest.approx(10.5 * unit_cost)
        kept = cost_ranked_prune_(model, 1 - 3 * head_cost / dense, x, scores)  # room for three heads, or 31.5 units
        assert kept <= 1 - 3 * head_cost / dense
        for gate in find_gates(model):
            closed = int((~gate.is_open()).sum())
            assert (closed > 0) == (gate.granularity == closed_kind), (head_score, gate.owner, closed)


def test_every_gate_tensor_keeps_its_best_gate_however_small_the_target():
    model = gated_classifier()
    x = token_ids(2)
    dense = deterministic_flops(model, x)
    gates = find_gates(model)
    scores = {id(g): torch.arange(g.log_alpha.numel(), dtype=torch.float64).flip(0) * 1e-6 for g in gates}
    scores[id(gates[0])] = torch.zeros(gates[0].shape, dtype=torch.float64)  # layer 0's heads: worth nothing
    with pytest.raises(ValueError, match=r"target = 0.01: the smallest model"):
        cost_ranked_prune_(model, 0.01, x, scores)
    assert all(bool(g.is_open().all()) for g in gates)  # a refused target leaves every gate open
    kept = cost_ranked_prune_(model, 0.5, x, scores)
    assert kept <= 0.5
    for gate in gates:
        assert int(gate.is_open().sum()) >= 1
    assert bool(gates[0].is_open()[0]) and int(gates[0].is_open().sum()) == 1  # ties: the first of equals
    assert deterministic_flops(model, x) / dense == pytest.approx(kept)


# --- bad arguments ---------------------------------------------------------------------------------------------

def test_bad_arguments_are_refused_naming_the_argument():
    model = gated_classifier()
    x = token_ids(2)
    gates = find_gates(model)
    good = {id(g): torch.ones(g.shape) for g in gates}
    for target in (0, 1.5, -0.1, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match=r"^target must be a fraction in \(0, 1\]"):
            cost_ranked_prune_(model, target, x, good)
    with pytest.raises(ValueError, match="^scores must be a dict"):
        cost_ranked_prune_(model, 0.5, x, [1.0])
    with pytest.raises(ValueError, match="^scores has no entry for the gates of 'encoder.encoder.layer.0.attention'.*taylor_importance"):
        cost_ranked_prune_(model, 0.5, x, {})
    for bad, why in ((torch.ones(3), r"tensor of their shape \(4,\), got \(3,\)"), (1.0, "got float"),
                     (torch.full((HEADS,), math.nan), "finite and >= 0"), (-torch.ones(HEADS), "finite and >= 0")):
        with pytest.raises(ValueError, match=rf"^scores for the gates of 'encoder.encoder.layer.0.attention' must be .*{why}"):
            cost_ranked_prune_(model, 0.5, x, {**good, id(gates[0]): bad})
    assert all(bool(g.is_open().all()) and g.log_alpha.requires_grad for g in gates)  # nothing was changed
    with pytest.raises(ValueError, match="^taylor_importance: model has no gates"):
        taylor_importance(tiny_classifier(), batches(1), F.cross_entropy)
    with pytest.raises(ValueError, match="^model has no gates to prune"):
        cost_ranked_prune_(tiny_classifier(), 0.5, x, {})
    with pytest.raises(ValueError, match="^taylor_importance: batches is empty"):
        taylor_importance(model, [], F.cross_entropy)
    with pytest.raises(ValueError, match="^method must be one of"):
        ImportancePruning(model, 0.5, x, None, lambda: [], F.cross_entropy, method="magnitude")


def test_a_gate_the_loss_does_not_reach_is_named():
    model = gated_classifier()
    heads, units = find_gates(model)[:2]  # layer 0's
    with pytest.raises(ValueError, match=f"does not depend on the gates of '{units.owner}'"):
        # a loss of layer 0's gated output projection alone: its heads reach it, no unit does
        taylor_importance(model, batches(1), lambda logits, targets: model.get_submodule(heads.owner).output.dense.weight.sum())


# --- the config key and the run ----------------------------------------------------------------------------------

def minilm(**keys):
    base = {"model": "minilm", "data": "wordnet", "regularizer": "importance", "target": 0.5, "teacher": "runs/t"}
    return config_from_dict({**base, **keys})


def test_the_importance_key_chooses_the_baseline_and_old_run_folders_keep_theirs(tmp_path):
    assert minilm().importance == "taylor"
    assert minilm(importance="heads-magnitude-units").importance == "heads-magnitude-units"
    with pytest.raises(ValueError, match="config key 'importance' = 'magnitude': must be one of"):
        minilm(importance="magnitude")
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "mlp"\ndata = "digits"\nregularizer = "l0"\nimportance = "heads-magnitude-units"\n')
    with pytest.raises(ValueError, match="config key 'importance' = 'heads-magnitude-units' would never be read"):
        load_config(recipe)
    # a config.json from before issue #26 has no key: it ran the heads-magnitude-units baseline, and reads so
    old = {key: value for key, value in minilm().to_dict().items() if key != "importance"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert read_config_json(tmp_path / "config.json").importance == "heads-magnitude-units"
    (tmp_path / "config.json").write_text(json.dumps(minilm().to_dict()))
    assert read_config_json(tmp_path / "config.json").importance == "taylor"


def test_the_shipped_taylor_recipes_and_the_old_baseline_s_recipes_say_which_they_are():
    from pathlib import Path

    recipes = Path(__file__).parent.parent / "recipes"
    for percent in (5, 10, 25, 50):
        config = load_config(recipes / f"minilm-wordnet-taylor-flops{percent}.toml")
        assert (config.regularizer, config.importance, config.target) == ("importance", "taylor", percent / 100)
        l0 = load_config(recipes / f"minilm-wordnet-l0-flops{percent}.toml") if percent in (25, 50) else None
        if l0 is not None:  # the same budget and distillation as L0's
            for key in ("epochs", "batch_size", "lr", "train_examples", "test_examples", "teacher", "distill_weight",
                        "temperature", "round_to", "seed"):
                assert getattr(config, key) == getattr(l0, key), key
    for percent in (25, 50):
        assert load_config(recipes / f"minilm-wordnet-importance-flops{percent}.toml").importance == "heads-magnitude-units"


@pytest.mark.slow
def test_a_taylor_run_prunes_to_its_target_and_keeps_at_least_one_gate_per_layer(teacher_dir, tmp_path):  # noqa: F811 (the fixture)
    from l0sparse.training.train import run_training
    from l0sparse.training.runs import load_run, prune_run

    history = run_training(config(regularizer="importance", teacher=teacher_dir, target=0.3), tmp_path / "taylor", progress=False)
    assert history[-1]["flops_kept"] <= 0.3
    run_config, model, _ = load_run(tmp_path / "taylor")
    assert run_config.importance == "taylor"
    assert all(int(g.is_open().sum()) >= 1 for g in find_gates(model))
    pruned, _ = prune_run(tmp_path / "taylor", latency=False)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_an_l0_run_can_start_from_the_taylor_choice(teacher_dir, tmp_path, capsys):  # noqa: F811 (the fixture)
    """gate_start = "taylor": the gates begin at the strong baseline's choice (kept ones at droprate_init's log α,
    the others at its negative), train again, and the controller holds the target."""
    from l0sparse.training.baselines import taylor_importance, taylor_start_
    from l0sparse.training.runs import load_run
    from l0sparse.training.train import run_training

    history = run_training(config(regularizer="l0", teacher=teacher_dir, target=0.3, warmup=0.0, gate_start="taylor"),
                           tmp_path / "start", progress=True)
    assert "the gates start from the importance baseline's choice" in capsys.readouterr().err
    run_config, model, _ = load_run(tmp_path / "start")
    assert run_config.gate_start == "taylor" and all(g.log_alpha.requires_grad for g in find_gates(model))
    assert len(history) >= 1
    # the start itself: the selection's FLOPs, the two log α values, every gate trainable
    fresh = load_run(tmp_path / "start")[1]
    for gate in find_gates(fresh):
        with torch.no_grad():
            gate.log_alpha.fill_(2.0)
    x = torch.randint(1, 50, (4, 8))
    scores = taylor_importance(fresh, [(x, torch.zeros(4, dtype=torch.long))], torch.nn.functional.cross_entropy)
    kept = taylor_start_(fresh, 0.3, x, scores)
    assert kept <= 0.3
    for gate in find_gates(fresh):
        start = math.log(1 - gate.droprate_init) - math.log(gate.droprate_init)
        assert set(gate.log_alpha.detach().unique().tolist()) <= {start, -start} and gate.log_alpha.requires_grad


@pytest.mark.slow
def test_structure_from_keeps_another_run_s_open_gates_and_trains_them_as_the_baseline(teacher_dir, tmp_path, capsys):  # noqa: F811
    """structure_from: the importance baseline keeps exactly the gates an L0 run left open, fixed for good, and trains
    like the baseline; a run of another model is refused, naming a gate."""
    from l0sparse.training.baselines import keep_open_as_
    from l0sparse.training.runs import load_run
    from l0sparse.training.train import run_training

    run_training(config(regularizer="l0", teacher=teacher_dir, target=0.3, warmup=0.5), tmp_path / "l0", progress=False)
    run_training(config(regularizer="importance", teacher=teacher_dir, target=0.3, structure_from=str(tmp_path / "l0")),
                 tmp_path / "kept", progress=True)
    assert f"the structure of {tmp_path / 'l0'} (its open gates) keeps" in capsys.readouterr().err
    l0_gates, kept_gates = (find_gates(load_run(tmp_path / name)[1]) for name in ("l0", "kept"))
    assert [g.is_open().tolist() for g in kept_gates] == [g.is_open().tolist() for g in l0_gates]
    assert all(set(g.log_alpha.detach().unique().tolist()) <= {FIXED_OPEN, -FIXED_OPEN} for g in kept_gates)  # fixed for good
    with pytest.raises(ValueError, match=r"keep_open_as_: the other model has 1 gates, this one \d+"):
        keep_open_as_(load_run(tmp_path / "l0")[1], l0sparse.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"0": "in"}))
    with pytest.raises(ValueError, match=r"config key 'structure_from' = 'runs/x': .* needs regularizer = 'importance'"):
        config(regularizer="l0", structure_from="runs/x")


def test_gate_start_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match=r"config key 'gate_start' = 'taylor': .* needs regularizer = 'l0' with a FLOPs target"):
        config(regularizer="importance", teacher="runs/x", target=0.3, gate_start="taylor")
    with pytest.raises(ValueError, match=r"config key 'gate_start' = 'sideways': must be one of \('open', 'taylor'\)"):
        config(gate_start="sideways")


# --- magnitude pruning -------------------------------------------------------------------------------------------

def test_magnitude_baseline_counts_flops_as_a_physically_smaller_network():
    """The baseline's FLOPs for given widths equal count_flops of a plain network built with those widths."""
    from l0sparse.training.baselines import _flops_for_widths, _layer_macs
    from l0sparse.core.models import mlp

    dense, x = mlp((20, 16, 12, 4)), torch.randn(2, 20)
    assert _flops_for_widths(_layer_macs(dense, x), [16, 12], [10, 5]) == l0sparse.count_flops(mlp((20, 10, 5, 4)), x)
