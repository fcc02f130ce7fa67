"""The Hugging Face task of issue #12 (parts 4-5): WordNet glosses, the sentence classifier, distillation, the
importance baseline, and the command's runs. The real all-MiniLM-L6-v2 and WordNet are only in the benchmark
(benchmarks/hf_minilm.py): here a small random BERT and synthetic data stand in for them; nothing is downloaded."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l0sparse
from l0sparse import hf
import l0sparse.hf.task  # noqa: F401  (hf.task is patched: the harness builds MiniLM through it)
from l0sparse.training.baselines import FIXED_OPEN, gate_importance, importance_prune_
from l0sparse.training.config import config_from_dict
from l0sparse.core.costs import CostModel
from l0sparse.core.sites import find_gates
from l0sparse.training.data import DATASETS, Split
from l0sparse.core.control import TargetController
from l0sparse.training.train import distillation_loss, load_teacher, run_training
from l0sparse.training.build import model_for
from l0sparse.training.runs import load_pruned, load_run, prune_run

from models import promised_band

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")

VOCAB, WIDTH, HEADS, FFN, LAYERS, CLASSES, LENGTH = 60, 16, 4, 32, 2, 5, 10
EPS64 = torch.finfo(torch.float64).eps


def tiny_classifier(num_classes: int = CLASSES) -> hf.SentenceClassifier:
    config = transformers.BertConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                                     vocab_size=VOCAB, max_position_embeddings=LENGTH + 2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return hf.SentenceClassifier(transformers.BertModel(config, add_pooling_layer=False), num_classes)


def token_ids(count: int, seed: int = 0) -> torch.Tensor:
    """Random ids (never the padding id 0) with random lengths in [2, LENGTH - 2], padded with 0 at the end."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (count, LENGTH), generator=generator)
    lengths = torch.randint(2, LENGTH - 1, (count,), generator=generator)
    ids[torch.arange(LENGTH) >= lengths[:, None]] = 0
    return ids


def fake_wordnet() -> Split:
    """Token ids whose class is the first token's id modulo CLASSES: learnable, and shaped like load_wordnet's Split."""
    x_train, x_test = token_ids(96, seed=1), token_ids(32, seed=2)
    return Split(x_train, x_train[:, 0] % CLASSES, x_test, x_test[:, 0] % CLASSES, pad_id=0, class_count=CLASSES)


def gated_classifier(seed: int = 0) -> hf.SentenceClassifier:
    torch.manual_seed(seed)
    model = tiny_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings, q/k/v, the classifier: no gate of their own, as the rules say
        l0sparse.sparsify(model, hf.encoder_rules(model), example_inputs=token_ids(2))
    return model


# --- the classifier, its gates, padding ----------------------------------------------------------------------

def test_trimmed_padding_and_length_sorted_batches_give_the_same_logits():
    torch.manual_seed(0)
    model = tiny_classifier().double().eval()
    x = token_ids(12)
    with torch.no_grad():
        full = model(x)
        assert hf.trim_padding(x, 0).shape[1] < LENGTH  # the test has padding to remove
        trimmed = model(hf.trim_padding(x, 0))
    tolerance = 64 * EPS64 * float(full.abs().max())
    assert float((full - trimmed).abs().max()) <= tolerance
    assert float((hf.predict_logits(model, x, 0, batch_size=5) - full).abs().max()) <= tolerance


def test_encoder_rules_gate_every_layer_s_heads_and_units_and_prune_keeps_the_logits():
    model = gated_classifier()
    shapes = sorted((gate.owner, tuple(gate.log_alpha.shape)) for gate in find_gates(model))
    assert shapes == sorted([(f"encoder.encoder.layer.{i}.attention", (HEADS,)) for i in range(LAYERS)]
                            + [(f"encoder.encoder.layer.{i}.output.dense", (FFN,)) for i in range(LAYERS)])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in find_gates(model):
            gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -10.0, 10.0))
    model.eval()
    x = token_ids(6)
    pruned = l0sparse.prune(model, x)
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert l0sparse.count_params(pruned) < l0sparse.count_params(l0sparse.prune(gated_classifier(), x))


def test_encoder_rules_refuse_a_model_without_bert_attention():
    with pytest.raises(ValueError, match="encoder_rules"):
        hf.encoder_rules(nn.Sequential(nn.Linear(3, 3)))


# --- distillation ----------------------------------------------------------------------------------------------

def test_distillation_loss_mixes_the_soft_and_the_hard_term():
    generator = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(8, CLASSES, generator=generator, dtype=torch.float64), torch.randn(8, CLASSES, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, CLASSES, (8,), generator=generator)
    cross_entropy = F.cross_entropy(logits, targets)
    assert torch.equal(distillation_loss(logits, targets, teacher, 0.0, 2.0), cross_entropy)
    assert abs(float(distillation_loss(logits, targets, logits, 1.0, 3.0))) <= 8 * EPS64  # KL of a distribution to itself
    temperature = 2.0  # the soft term by hand: T² · mean over examples of Σ p_teacher (log p_teacher − log p_student)
    p_teacher = F.softmax(teacher / temperature, -1)
    by_hand = temperature ** 2 * (p_teacher * (p_teacher.log() - F.log_softmax(logits / temperature, -1))).sum(-1).mean()
    mixed = distillation_loss(logits, targets, teacher, 0.25, temperature)
    assert abs(float(mixed - (0.25 * by_hand + 0.75 * cross_entropy))) <= 64 * EPS64 * float(by_hand + cross_entropy)


# --- the importance baseline -----------------------------------------------------------------------------------

def test_layer_distillation_is_the_masked_mean_squared_difference_of_every_layer_s_hidden_states():
    torch.manual_seed(0)
    teacher, student = tiny_classifier().eval(), gated_classifier(seed=1).eval()  # eval: the same gates in both forwards
    ids = token_ids(8, seed=3)
    term = hf.LayerDistillation(student, teacher, pad_id=0)
    assert term.layers == [f"encoder.encoder.layer.{i}" for i in range(LAYERS)]
    student(ids)
    value = term(ids)
    # the same number from transformers' own hidden states (output_hidden_states), layers 1..L, real tokens only
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = student.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        theirs = teacher.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
    real = mask.bool()
    expected = sum(((s - t)[real] ** 2).mean() for s, t in zip(ours, theirs)) / LAYERS
    assert abs(value.item() - expected.item()) <= 1e3 * torch.finfo(torch.float32).eps * expected.item()
    value.backward()  # it trains the student's weights and gates, and leaves the teacher alone
    assert student.encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    same = hf.LayerDistillation(teacher, copy.deepcopy(teacher), pad_id=0)
    teacher(ids)
    assert float(same(ids)) == 0.0
    with pytest.raises(RuntimeError, match="after the student's forward"):
        same(ids)  # the student's states are used once
    term.remove()
    student(ids)
    with pytest.raises(RuntimeError, match="after the student's forward"):
        term(ids)  # no hooks: nothing kept


def test_head_scores_are_the_loss_gradient_of_a_head_mask():
    """Independently: scale each head's slice of the output projection's input by ξ (a hook) and differentiate."""
    model = gated_classifier().double()
    x, y = token_ids(8, seed=4), torch.arange(8) % CLASSES
    scores = gate_importance(model, [(x, y)], F.cross_entropy)
    head_gates = [g for g in find_gates(model) if g.granularity == "heads"]
    with torch.no_grad():  # the scores are those of the model with every gate open
        for gate in find_gates(model):
            gate.log_alpha.fill_(FIXED_OPEN)
    masks, handles = [], []
    for layer in range(LAYERS):
        xi = torch.ones(HEADS, dtype=torch.float64, requires_grad=True)
        masks.append(xi)
        projection = model.get_submodule(f"encoder.encoder.layer.{layer}.attention.output.dense")
        handles.append(projection.register_forward_pre_hook(
            lambda module, args, xi=xi: (args[0] * xi.repeat_interleave(WIDTH // HEADS),)))
    model.eval()
    F.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    for gate, xi in zip(head_gates, masks):
        expected = xi.grad.abs() / xi.grad.abs().norm()
        assert float((scores[id(gate)].double() - expected).abs().max()) <= 1e3 * EPS64


def test_importance_prune_keeps_the_best_gates_within_the_flops_budget_and_freezes_them():
    model = gated_classifier()
    x = token_ids(2)
    generator = torch.Generator().manual_seed(5)
    scores = {id(g): torch.rand(g.log_alpha.shape, generator=generator) for g in find_gates(model)}
    dense = float(CostModel(model, x).costs(deterministic=True)["flops"])
    kept = importance_prune_(model, 0.5, x, scores)
    assert kept <= 0.5
    assert float(CostModel(model, x).costs(deterministic=True)["flops"]) / dense == pytest.approx(kept, rel=1e-6)
    for kind in ("heads", "in"):
        members = [g for g in find_gates(model) if g.granularity == kind]
        open_scores = torch.cat([scores[id(g)][g.log_alpha > 0] for g in members])
        shut_scores = torch.cat([scores[id(g)][g.log_alpha < 0] for g in members])
        assert len(shut_scores) > 0 and float(open_scores.min()) >= float(shut_scores.max())
    model.train()
    for gate in find_gates(model):
        assert not gate.log_alpha.requires_grad
        assert torch.equal(gate(), gate.deterministic())  # fixed gates sample exactly 0 or 1 in training


# --- the command: teacher, L0 with distillation to a target, the baseline, prune -----------------------------

@pytest.fixture
def tiny_task(monkeypatch):
    """model 'minilm' and data 'wordnet' replaced by the small random BERT and the fake glosses."""
    monkeypatch.setitem(DATASETS, "wordnet", fake_wordnet)
    monkeypatch.setattr(hf.task, "build_minilm", lambda num_classes: tiny_classifier(num_classes))


def config(**keys):
    base = {"model": "minilm", "data": "wordnet", "epochs": 1, "batch_size": 16, "lr": 1e-3, "seed": 0}
    return config_from_dict({**base, **keys})


@pytest.mark.slow
def test_teacher_l0_and_importance_runs_prune_to_plain_smaller_models(tiny_task, tmp_path):
    run_training(config(regularizer="none", epochs=2), tmp_path / "teacher", progress=False)
    teacher_dir = str(tmp_path / "teacher")
    student = model_for(config(regularizer="l0", teacher=teacher_dir), fake_wordnet(),
                        initial=load_teacher(config(regularizer="l0", teacher=teacher_dir)))
    teacher_state = load_run(teacher_dir)[1].state_dict()
    raw_student = {key.replace(".parametrizations.weight.original", ".weight"): value for key, value in student.state_dict().items()}
    assert all(torch.equal(raw_student[key], value) for key, value in teacher_state.items())  # starts from the teacher

    history = run_training(config(regularizer="l0", teacher=teacher_dir, target=0.5, gate_lr=0.05, warmup=0.2, epochs=3),
                           tmp_path / "l0", progress=False)
    # within what the controller promises (its tolerance plus one unit: 0.076 here), not the ±0.1 allowed before #27
    _, l0_model, _ = load_run(tmp_path / "l0")
    example = fake_wordnet().x_test[:2]
    assert abs(history[-1]["flops_kept"] - 0.5) <= promised_band(TargetController(l0_model, 0.5, "flops", example_inputs=example), l0_model, example)
    baseline = run_training(config(regularizer="importance", teacher=teacher_dir, target=0.5), tmp_path / "importance",
                            progress=False)
    assert baseline[-1]["flops_kept"] <= 0.5
    for run in ("l0", "importance"):
        pruned, _ = prune_run(tmp_path / run)
        loaded = load_pruned(tmp_path / run)
        x = fake_wordnet().x_test
        _, gated_model, _ = load_run(tmp_path / run)
        with torch.no_grad():
            expected = gated_model(x)
            assert float((loaded(x) - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
        assert l0sparse.count_params(loaded) < l0sparse.count_params(load_run(teacher_dir)[1])


@pytest.fixture
def teacher_dir(tiny_task, tmp_path):
    run_training(config(regularizer="none", epochs=2), tmp_path / "teacher", progress=False)
    return str(tmp_path / "teacher")


def interrupt_after(epochs: int):
    def stop(record):
        if record["epoch"] == epochs:
            raise KeyboardInterrupt

    return stop


@pytest.mark.slow
@pytest.mark.parametrize("keys", [{"regularizer": "importance", "target": 0.5}, {"regularizer": "l0", "target": 0.5, "gate_lr": 0.05},
                                  {"regularizer": "l0", "target": 0.5, "gate_lr": 0.05, "distill_hidden": 1.0}],
                         ids=["importance", "l0", "l0-hidden-states"])
def test_a_distilled_run_resumes_exactly_even_if_the_teacher_changed(teacher_dir, tmp_path, keys):
    settings = config(teacher=teacher_dir, epochs=3, **keys)
    straight = run_training(settings, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_training(settings, tmp_path / "split", progress=False, on_epoch_end=interrupt_after(1))
    run_training(config(regularizer="none", epochs=2, seed=7), teacher_dir, force=True, progress=False)  # another teacher now
    resumed = run_training(settings, tmp_path / "split", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(straight)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_the_hidden_state_term_enters_the_loss_with_its_weight(teacher_dir, tmp_path, monkeypatch):
    import l0sparse.training.train as train_module

    terms = []  # (value, batch size) of every step's term
    measured = hf.LayerDistillation.__call__

    def spy(self, input_ids):
        value = measured(self, input_ids)
        terms.append((value.item(), len(input_ids)))
        return value

    def moved_from_the_teacher(*args, **keys):  # else the student starts at the teacher's states, where the term is 0
        student = model_for(*args, **keys)
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        return student

    monkeypatch.setattr(hf.LayerDistillation, "__call__", spy)
    monkeypatch.setattr(train_module, "model_for", moved_from_the_teacher)
    # the logits' part set to zero: what is left of the loss is distill_hidden times the term
    monkeypatch.setattr(train_module, "distillation_loss", lambda logits, *rest: logits.sum() * 0)
    weight = 2.5
    history = run_training(config(regularizer="none", teacher=teacher_dir, distill_hidden=weight), tmp_path / "run", progress=False)
    assert len(terms) == -(-len(fake_wordnet().x_train) // 16) and all(value > 0 for value, _ in terms)
    expected = weight * sum(value * size for value, size in terms) / sum(size for _, size in terms)
    assert abs(history[0]["train_loss"] - expected) <= 8 * torch.finfo(torch.float32).eps * expected


@pytest.mark.slow
def test_a_hidden_state_run_that_stops_before_its_checkpoint_leaves_nothing_and_one_that_lost_its_teacher_is_named(
        teacher_dir, tmp_path, monkeypatch):
    settings = config(regularizer="l0", teacher=teacher_dir, target=0.5, gate_lr=0.05, epochs=2, distill_hidden=1.0)
    with pytest.raises(KeyboardInterrupt):
        run_training(settings, tmp_path / "split", progress=False, on_epoch_end=interrupt_after(1))
    assert (tmp_path / "split" / "teacher.pt").exists()
    (tmp_path / "split" / "teacher.pt").unlink()
    with pytest.raises(FileNotFoundError, match="teacher.pt"):
        run_training(settings, tmp_path / "split", resume=True, progress=False)

    def stop(self, input_ids):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf.LayerDistillation, "__call__", stop)
    with pytest.raises(KeyboardInterrupt):
        run_training(settings, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()  # its config, the teacher's logits and weights: all gone


def test_layer_distillation_refuses_what_it_cannot_match():
    with pytest.raises(ValueError, match="no attention module"):
        hf.encoder_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    teacher = tiny_classifier()
    deeper = tiny_classifier()
    deeper.encoder.encoder.layer.append(copy.deepcopy(deeper.encoder.encoder.layer[0]))
    with pytest.raises(ValueError, match="layer i is matched with layer i"):
        hf.LayerDistillation(deeper, teacher, pad_id=0)
    with pytest.raises(TypeError, match="pad_id"):
        hf.LayerDistillation(teacher, copy.deepcopy(teacher), pad_id=None)


def test_importance_scoring_leaves_the_gates_and_the_mode_as_they_were():
    model = gated_classifier()
    before = [g.log_alpha.detach().clone() for g in find_gates(model)]
    model.train()
    gate_importance(model, [(token_ids(4), torch.arange(4) % CLASSES)], F.cross_entropy)
    assert model.training and all(torch.equal(g.log_alpha, b) for g, b in zip(find_gates(model), before))
    with pytest.raises(IndexError):  # a loss that fails half-way (a class past the last): still nothing changed
        gate_importance(model, [(token_ids(4), torch.arange(4) + 100)], F.cross_entropy)
    assert model.training and all(torch.equal(g.log_alpha, b) for g, b in zip(find_gates(model), before))
    with pytest.raises(ValueError, match="batches is empty"):
        gate_importance(model, [], F.cross_entropy)


def test_tied_scores_still_meet_the_budget_and_an_unreachable_target_is_refused():
    model = gated_classifier()
    x = token_ids(2)
    tied = {id(g): torch.ones(g.log_alpha.shape) for g in find_gates(model)}
    assert importance_prune_(model, 0.5, x, tied) <= 0.5
    other = gated_classifier()
    with pytest.raises(ValueError, match="smallest model"):
        importance_prune_(other, 0.01, x, {id(g): torch.ones(g.log_alpha.shape) for g in find_gates(other)})


@pytest.mark.slow
def test_a_pruned_spec_with_a_foreign_dtype_is_named(teacher_dir, tmp_path):
    import json

    run_training(config(regularizer="importance", teacher=teacher_dir, target=0.5), tmp_path / "run", progress=False)
    prune_run(tmp_path / "run")
    spec_path = tmp_path / "run" / "pruned.json"
    spec = json.loads(spec_path.read_text())
    assert spec["example_dtype"] == "int64"
    spec["example_dtype"] = "nn"
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="example_dtype"):
        load_pruned(tmp_path / "run")


@pytest.mark.parametrize("keys, key", [
    ({"regularizer": "importance", "model": "mlp", "data": "digits", "target": 0.5}, "regularizer"),
    ({"regularizer": "importance", "teacher": "runs/t"}, "regularizer"),  # no target
    ({"regularizer": "importance", "target": 0.5}, "teacher"),  # nothing to rank the heads of, or to distil from
    ({"regularizer": "importance", "target": 0.5, "teacher": "runs/t", "clamp_log_alpha": True}, "clamp_log_alpha"),
    ({"regularizer": "magnitude", "target": 0.5}, "regularizer"),
    ({"regularizer": "l0", "temperature": 3.0}, "temperature"),
    ({"data": "digits"}, "data"),
    ({"model": "mlp"}, "data"),
    ({"regularizer": "l0", "gates": "weights"}, "minilm"),
    ({"distill_weight": 1.5}, "distill_weight"),
    ({"temperature": 0}, "temperature"),
    ({"train_examples": 0}, "train_examples"),
    ({"model": "mlp", "data": "digits", "teacher": "runs/x"}, "teacher"),
    ({"regularizer": "l0", "hidden_gate": "yes"}, "hidden_gate"),
    ({"regularizer": "l0", "hidden_gate": 1}, "hidden_gate"),
    ({"regularizer": "none", "hidden_gate": True}, "hidden_gate"),  # nothing to train the gate
    ({"model": "mlp", "data": "digits", "hidden_gate": True}, "hidden_gate"),
    ({"regularizer": "l0", "distill_hidden": 1.0}, "distill_hidden"),  # no teacher
    ({"regularizer": "l0", "teacher": "runs/t", "distill_hidden": -1.0}, "distill_hidden"),
    ({"regularizer": "l0", "teacher": "runs/t", "distill_hidden": "much"}, "distill_hidden"),
    ({"regularizer": "l0", "teacher": "runs/t", "distill_hidden": 1.0, "hidden_gate": True}, "distill_hidden"),
])
def test_bad_text_config_names_the_key(keys, key):
    with pytest.raises(ValueError, match=key):
        config(**keys)


@pytest.mark.slow
def test_a_teacher_that_is_missing_or_not_dense_is_refused(tiny_task, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher"):
        run_training(config(regularizer="l0", teacher=str(tmp_path / "nothing")), tmp_path / "student", progress=False)
    run_training(config(regularizer="l0"), tmp_path / "gated", progress=False)
    with pytest.raises(ValueError, match="config key 'teacher'"):
        run_training(config(regularizer="l0", teacher=str(tmp_path / "gated")), tmp_path / "student", progress=False)
    assert not (tmp_path / "student").exists()  # nothing half-written


# --- the hidden-size gate from the command line (hidden_gate = true) ------------------------------------------

@pytest.mark.slow
def test_hidden_gate_from_the_recipe_trains_prunes_and_reports(teacher_dir, tmp_path, capsys):
    from pathlib import Path

    from l0sparse.cli import main
    from l0sparse.core.stream import hidden_gate

    recipe = Path(__file__).parents[1] / "recipes" / "minilm-wordnet-l0-flops50.toml"
    run = tmp_path / "hidden"
    overrides = ["hidden_gate=true", f"teacher='{teacher_dir}'", "epochs=2", "batch_size=16", "lr=1e-3", "gate_lr=0.05",
                 "warmup=0.2", "round_to=1"]
    assert main(["train", str(recipe), "--out", str(run), "--no-progress", *[a for o in overrides for a in ("--set", o)]]) == 0
    config, gated_model, data = load_run(run)
    assert config.hidden_gate and (gate := hidden_gate(gated_model)) is not None and gate.log_alpha.numel() == WIDTH
    k = int(gate.is_open().sum())
    assert main(["prune", str(run)]) == 0
    assert "encoder.hidden (dimensions)" in capsys.readouterr().out
    loaded = load_pruned(run)
    assert loaded.encoder.embeddings.word_embeddings.embedding_dim == loaded.classifier.in_features == k
    with torch.no_grad():
        expected = gated_model(data.x_test)
        assert float((loaded(data.x_test) - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert f"| {run.name} |" in (tmp_path / "report" / "report.md").read_text() and (tmp_path / "report" / "gates.png").stat().st_size


@pytest.mark.slow
def test_importance_ranks_hidden_dimensions_on_their_own(teacher_dir, tmp_path):
    """importance = "heads-magnitude-units" (issue #12's baseline); issue #26's "taylor" is in tests/test_baselines.py."""
    from l0sparse.hf.hidden import gate_hidden

    model = gated_classifier()
    x = token_ids(2)
    gate = gate_hidden(model, x)
    scores = gate_importance(model, [(token_ids(8), torch.arange(8) % CLASSES)], F.cross_entropy)
    # a hidden dimension scores the L2 norm of everything it multiplies: embedding columns and the writers' rows
    weights = [model.encoder.embeddings.get_submodule(n).parametrizations.weight.original
               for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    writers = [m for m in gate.stream.writers]
    squares = sum(w.detach().square().sum(0) for w in weights)
    squares = squares + sum(m.parametrizations.weight.original.detach().square().sum(1) + m.parametrizations.bias.original.detach().square()
                            for m in writers)
    assert torch.allclose(scores[id(gate)], squares.sqrt() / squares.sqrt().norm(), rtol=1e-5)
    kept = importance_prune_(model, 0.5, x, scores)
    assert kept <= 0.5 and 0 < int(gate.is_open().sum()) < WIDTH
    for kind in ("heads", "hidden", "in"):  # each kind ranked on its own: every open gate above every shut one
        members = [g for g in find_gates(model) if g.granularity == kind]
        open_scores = torch.cat([scores[id(g)][g.log_alpha > 0] for g in members])
        shut_scores = torch.cat([scores[id(g)][g.log_alpha < 0] for g in members])
        assert len(shut_scores) > 0 and float(open_scores.min()) >= float(shut_scores.max())
    history = run_training(config(regularizer="importance", importance="heads-magnitude-units", teacher=teacher_dir, target=0.5,
                                  hidden_gate=True), tmp_path / "importance", progress=False)
    assert history[-1]["flops_kept"] <= 0.5
    pruned, _ = prune_run(tmp_path / "importance")
    assert pruned.encoder.embeddings.word_embeddings.embedding_dim < WIDTH
