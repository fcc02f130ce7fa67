"""What `l0sparse prune` reports (issue #29): the widths as saved (rounded), FLOPs, parameters, the pruned model's test
accuracy and its latency beside the unpruned model's, printed and kept in pruned.json under "result"."""

import json
from pathlib import Path

import pytest
import torch

import l0sparse
from l0sparse.cli import main
from l0sparse.training.config import load_config
from l0sparse.core.report import ATTENTION_PRODUCTS
from l0sparse.training.runs import RunFolder
from l0sparse.training.train import run_training
from l0sparse.training.runs import accuracy

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """An MLP on the digits whose gates are part closed (lam large enough), pruned with round_to=8."""
    out = tmp_path_factory.mktemp("prune") / "run"
    config = load_config(RECIPES / "mlp-digits.toml", ["epochs=12", "hidden=[40, 30]", "round_to=8", "lam=2.0"])
    run_training(config, out, progress=False)
    return out


def test_prune_prints_and_keeps_the_widths_as_saved_the_flops_accuracy_and_latency(digits_run, capsys):
    assert main(["prune", str(digits_run), "--force"]) == 0
    captured = capsys.readouterr()
    result = json.loads((digits_run / "pruned.json").read_text())["result"]
    loaded = RunFolder(digits_run).load_pruned()
    layers = [module for module in loaded.modules() if isinstance(module, torch.nn.Linear)]

    before, saved = result["architecture_saved"].split(" -> ")
    _, open_gates = result["architecture_open_gates"].split(" -> ")
    saved, open_gates, before = ([int(n) for n in text.split("-")] for text in (saved, open_gates, before))
    assert saved == [layer.in_features for layer in layers]  # what pruned.pt holds
    assert all(o <= s <= b and (s % 8 == 0 or s == b) for o, s, b in zip(open_gates, saved, before))
    assert open_gates != before, "lam=2 closed no gate: the test shows nothing about rounding"

    _, _, data = RunFolder(digits_run).load()
    example = data.x_train[:2]
    assert result["flops"]["pruned"] == l0sparse.count_flops(loaded, example) < result["flops"]["unpruned"]
    assert result["params"]["pruned"] == sum(p.numel() for p in loaded.parameters())
    assert result["test_accuracy"] == accuracy(loaded, data.x_test, data.y_test)
    assert result["test_accuracy"] == result["test_accuracy_gated"]  # prune keeps the gated model's outputs
    assert result["round_to"] == {"value": 8, "from": "the run's config key round_to"}
    timing = result["latency"]
    assert timing["batch_shape"] == [64, 64] and timing["pruned_s"] > 0 and timing["unpruned_s"] > 0
    assert timing["speedup"] == pytest.approx(timing["unpruned_s"] / timing["pruned_s"])

    printed = captured.out
    assert f"kept, as saved:      {result['architecture_saved']}" in printed
    assert "rounded: every kept width up to a multiple of 8" in printed
    assert f"test accuracy of the pruned model: {100 * result['test_accuracy']:.2f}%" in printed
    assert "latency, batch 64 x 64" in printed and "speed-up" in printed
    assert "| width saved |" in json.loads((digits_run / "pruned.json").read_text())["summary"]
    assert captured.err == ""  # no terminal here: the steps are not announced (an error would be the one line)
    said = []
    RunFolder(digits_run).prune(force=True, say=said.append)
    steps = ["loading the data", "building the model", "pruning (widths rounded up to multiples of 8)", "test accuracy", "timing"]
    assert [step for step, line in zip(steps, said) if line.startswith(step)] == steps


def test_no_latency_skips_the_timing(digits_run, capsys):
    assert main(["prune", str(digits_run), "--force", "--no-latency", "--round-to", "1"]) == 0
    printed = capsys.readouterr()
    result = json.loads((digits_run / "pruned.json").read_text())["result"]
    assert result["latency"] is None and "latency" not in printed.out
    assert "rounded:" not in printed.out and result["round_to"] == {"value": 1, "from": "--round-to"}
    assert result["architecture_saved"] == result["architecture_open_gates"]  # nothing rounded


@pytest.fixture
def text_task(monkeypatch):
    """model 'minilm' and data 'wordnet' as test_hf_task's small random BERT and fake glosses (imported here: without
    transformers only the text tests skip)."""
    pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")
    import test_hf_task
    from l0sparse import hf
    from l0sparse.training.data import DATASETS

    monkeypatch.setitem(DATASETS, "wordnet", test_hf_task.fake_wordnet)
    monkeypatch.setattr(hf.task, "build_minilm", test_hf_task.tiny_classifier)  # the harness builds MiniLM through hf.task
    return test_hf_task


@pytest.mark.slow
def test_a_text_run_reports_encoder_flops_and_its_table_counts_attention_products(text_task, tmp_path, capsys):
    from l0sparse.core.prune import plain_copy

    config = text_task.config

    run_training(config(regularizer="l0", target=0.5, gate_lr=0.05, warmup=0.2, epochs=2, round_to=8), tmp_path / "l0", progress=False)
    assert main(["prune", str(tmp_path / "l0"), "--no-latency"]) == 0
    printed = capsys.readouterr().out
    spec = json.loads((tmp_path / "l0" / "pruned.json").read_text())
    _, model, data = RunFolder(tmp_path / "l0").load()
    example = data.x_train[:2]
    dense, loaded = plain_copy(model), RunFolder(tmp_path / "l0").load_pruned()
    classifier_macs = model.classifier.in_features * model.classifier.out_features
    flops = spec["result"]["flops"]
    assert flops["unpruned"] == l0sparse.count_flops(dense, example) - classifier_macs  # docs/hf.md's count
    assert flops["pruned"] == l0sparse.count_flops(loaded, example) - classifier_macs
    assert flops["counted"].startswith("encoder MACs") and "input 10 tokens" in printed

    # the table's total is count_flops's: attention's products have a row of their own
    table = l0sparse.summary(model, example, round_to=8)
    rows = {row["layer"]: row for row in table.rows}
    assert rows[ATTENTION_PRODUCTS]["flops"] > 0
    assert sum(row["flops"] for row in table.rows) == l0sparse.count_flops(dense, example)
    assert sum(row["flops_kept"] for row in table.rows) == l0sparse.count_flops(loaded, example)
    heads = [row for row in table.rows if row["layer"].endswith("(heads)")]
    assert heads and all(row["width_saved"] == row["gates_kept"] or row["gates_kept"] == 0 for row in heads)
