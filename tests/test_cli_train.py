import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import l0sparse
from l0sparse.cli import main
from l0sparse.core.prune import plain_copy
from l0sparse.training.config import load_config
from l0sparse.core.sites import find_gates
from l0sparse.training.train import run_training
from l0sparse.training.runs import CHECKPOINT, load_pruned, load_run, prune_run

from configs import RECIPES, quick_config


def interrupt_after(epoch):
    """An on_epoch_end callback that stops the run like Ctrl-C after ``epoch``."""

    def callback(record):
        if record["epoch"] == epoch:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("override, key", [("epochs=0", "epochs"), ("lam=-1", "lam"), ("target=1.5", "target"),
                                           ("data='cifar'", "data"), ("model='vgg'", "model"), ("hidden=[0]", "hidden"),
                                           ("colour='red'", "colour")])
def test_bad_config_fails_before_training_naming_the_key(override, key, tmp_path):
    with pytest.raises(ValueError, match=key):
        load_config(RECIPES / "mlp-digits.toml", [override])
    assert main(["train", str(RECIPES / "mlp-digits.toml"), "--set", override, "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


PAPER_SETTINGS = {"droprate_init": [0.2, 0.5], "clamp_log_alpha": True, "init": "paper", "per_example_noise": False,
                  "ema": 0.9, "weight_decay": 5.0}


@pytest.mark.parametrize("settings", [{}, PAPER_SETTINGS], ids=["defaults", "paper-settings"])
def test_resume_continues_the_exact_run(tmp_path, settings):
    config = quick_config(**settings)
    straight = run_training(config, tmp_path / "straight", progress=False)

    with pytest.raises(KeyboardInterrupt):
        run_training(config, tmp_path / "split", progress=False, on_epoch_end=interrupt_after(2))
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = run_training(config, tmp_path / "split", resume=True, progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(straight)
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if settings:
        assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_paper_settings_reach_the_model_and_the_ema_model_is_the_one_pruned(tmp_path):
    import math

    config = quick_config(**PAPER_SETTINGS, epochs=2)
    history = run_training(config, tmp_path / "run", progress=False)
    assert {"test_accuracy", "test_accuracy_without_ema"} <= set(history[-1])
    config, model, data = load_run(tmp_path / "run")
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    averaged_log_alpha = state["ema"]["module.layers.0.gate.log_alpha"]
    assert torch.equal(model.layers[0].gate.log_alpha, averaged_log_alpha)  # load_run gives the moving average
    assert not torch.equal(state["model"]["layers.0.gate.log_alpha"], averaged_log_alpha)
    # the paper's clamp held through training
    for gate in find_gates(model):
        assert float(gate.log_alpha.min()) >= math.log(1e-2) - 1e-6 and float(gate.log_alpha.max()) <= math.log(1e2) + 1e-6
    pruned, _ = prune_run(tmp_path / "run")
    x = data.x_test[:50]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


def test_run_directory_is_not_overwritten_without_force(tmp_path):
    config = quick_config(epochs=1)
    run_training(config, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        run_training(config, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    run_training(config, tmp_path / "run", force=True, progress=False)


@pytest.mark.slow
def test_target_run_prune_and_report(tmp_path, capsys):
    config = quick_config(target=0.5, epochs=6, warmup=0.5)
    history = run_training(config, tmp_path / "run", progress=False)
    assert {"flops_kept", "expected_l0", "lambda_1", "test_accuracy"} <= set(history[-1])
    pruned, table = prune_run(tmp_path / "run")
    assert "total" in table
    _, model, data = load_run(tmp_path / "run")
    loaded = load_pruned(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.x_test), model(data.x_test))
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    for name in ("training.png", "gates.png", "pareto.png", "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| run |" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(FileExistsError):
        prune_run(tmp_path / "run")
    assert main(["prune", str(tmp_path / "run"), "--force", "--round-to", "3"]) == 0
    rounded = load_pruned(tmp_path / "run")
    linears = [m for m in rounded.modules() if isinstance(m, torch.nn.Linear)]
    widths = [(m.in_features, full) for m, full in zip(linears, (data.x_test.shape[1], 16))]  # the config: hidden=[16]
    assert len(widths) == 2 and all(w % 3 == 0 or w == full for w, full in widths), widths
    with torch.no_grad():
        torch.testing.assert_close(rounded(data.x_test), model(data.x_test))


@pytest.mark.slow
def test_a_delayed_target_run_keeps_every_unit_during_the_delay_then_lands(tmp_path):
    """config key delay: the controller holds the target at the whole model for that part of the run."""
    history = run_training(quick_config(target=0.5, epochs=4, delay=0.5, warmup=0.25), tmp_path / "run", progress=False)
    assert [round(row["flops_kept"], 12) for row in history[:2]] == [1.0, 1.0]
    _, model, data = load_run(tmp_path / "run")
    example = data.x_test[:2]
    # the landing stops within the controller's tolerance (0.005) or, when no set of gates gets that close, within one gate's cost
    dense = l0sparse.count_flops(plain_copy(model), example)
    largest_gate = max(float(c.max()) for c in l0sparse.CostModel(model, example).gate_costs("flops").values()) / dense
    assert abs(history[-1]["flops_kept"] - 0.5) <= max(0.005, largest_gate)


@pytest.mark.slow
def test_landing_at_the_target_keeps_every_unit_through_the_warmup_when_the_gates_do_not_move(tmp_path):
    """config key landing = "target" reaches the controller: with gates too slow to move (gate_lr 1e-9) the
    schedule's landing would have shrunk the model by the end of the first epoch; this one waits for the target."""
    sizes = {}
    for landing in ("schedule", "target"):
        config = quick_config(target=0.5, epochs=4, warmup=0.5, gate_lr=1e-9, landing=landing)
        history = run_training(config, tmp_path / landing, progress=False)
        sizes[landing] = [row["flops_kept"] for row in history]
    assert sizes["target"][0] == 1.0 and sizes["schedule"][0] < 0.9
    _, model, data = load_run(tmp_path / "target")
    example = data.x_test[:2]
    # landed at the target: within the tolerance (0.005) or, when no set of gates gets that close, one gate's cost
    dense = l0sparse.count_flops(plain_copy(model), example)
    largest_gate = max(float(c.max()) for c in l0sparse.CostModel(model, example).gate_costs("flops").values()) / dense
    assert abs(sizes["target"][-1] - 0.5) <= max(0.005, largest_gate)


@pytest.mark.slow
def test_ceiling_run_keeps_lambda_and_caps_the_size_after_the_warmup(tmp_path):
    """target_mode = "ceiling": λ is charged from the first step (a larger λ closes more gates during the
    warm-up), the controller is idle until the warm-up ends, and the run ends within the budget."""
    histories = {}
    for lam in (0.0, 50.0):
        config = quick_config(target=0.5, target_mode="ceiling", warmup=0.5, lam=lam, epochs=6)
        histories[lam] = run_training(config, tmp_path / f"run-{lam}", progress=False)
    for history in histories.values():
        assert [r["target_now"] for r in history[:2]] == [1.0, 1.0] and history[0]["lambda_1"] == 0.0
        assert history[-1]["flops_kept"] <= 0.5 + 0.005  # the controller's default tolerance
    assert histories[50.0][1]["expected_l0"] < histories[0.0][1]["expected_l0"]
    with pytest.raises(ValueError, match="target_mode"):
        quick_config(target_mode="ceiling")  # no target to cap at
    with pytest.raises(ValueError, match="target_mode"):
        quick_config(target=0.5, target_mode="below")


@pytest.mark.slow
def test_sigterm_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "l0sparse", "train", str(RECIPES / "mlp-digits.toml"), "--set", "epochs=500",
               "--out", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + 120
    while not (out / CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    state = torch.load(out / CHECKPOINT, weights_only=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # the metrics line of an epoch is written just before its checkpoint: at most one line ahead
    assert 1 <= state["epoch"] <= len(lines) <= state["epoch"] + 1 < 500
    assert not list(out.glob("*.tmp"))


def test_magnitude_baseline_prunes_to_the_budget_and_fine_tunes(tmp_path):
    config = quick_config(regularizer="magnitude", target=0.3, epochs=2)
    history = run_training(config, tmp_path / "run", progress=False)
    assert len(history) == 4  # 2 dense epochs, then 2 of fine-tuning
    assert history[1]["flops_kept"] == 1.0 and history[2]["flops_kept"] <= 0.3
    _, model, _ = load_run(tmp_path / "run")
    from l0sparse.training.baselines import hidden_layers

    masked = hidden_layers(model)[0]
    rows_alive = masked.weight.flatten(1).ne(0).any(1)
    assert 0 < int(rows_alive.sum()) < masked.weight.shape[0]


def test_magnitude_resume_across_the_pruning_step(tmp_path):
    config = quick_config(regularizer="magnitude", target=0.3, epochs=2)
    straight = run_training(config, tmp_path / "straight", progress=False)

    with pytest.raises(KeyboardInterrupt):
        run_training(config, tmp_path / "split", progress=False, on_epoch_end=interrupt_after(3))
    resumed = run_training(config, tmp_path / "split", resume=True, progress=False)
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in straight]


@pytest.mark.parametrize("regularizer", ["l1", "group_l1", "l2"])
def test_lk_regularizers_train_and_report_sparsity(regularizer, tmp_path):
    # L2 is not thresholded, so a threshold would never be read (refused since issue #27)
    config = quick_config(regularizer=regularizer, lam=5.0, epochs=3, **({} if regularizer == "l2" else {"threshold": 1e-2}))
    history = run_training(config, tmp_path / "run", progress=False)
    assert 0 < history[-1]["weights_kept"] <= 1 and 0 < history[-1]["units_kept"] <= 1
    _, model, _ = load_run(tmp_path / "run")
    from l0sparse.core.norms import sparsity, threshold_

    before = [p.clone() for p in model.parameters()]
    if regularizer != "l2":  # L2 is not thresholded: it shrinks without zeroing
        threshold_(model, regularizer, 1e-2)  # already thresholded when loaded: nothing changes
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sparsity(model)["weights_kept"] == pytest.approx(history[-1]["weights_kept"])


