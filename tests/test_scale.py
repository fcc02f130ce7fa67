"""torch.compile and DistributedDataParallel with gated models."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import l0sparse
from models import TinyResNet

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.slow
def test_gate_path_compiles_without_graph_breaks():
    torch.manual_seed(0)
    mlp = l0sparse.L0MLP((20, 16, 4))
    resnet = TinyResNet()
    x_mlp, x_resnet = torch.randn(8, 20), torch.randn(2, 3, 8, 8)
    l0sparse.sparsify(resnet, example_inputs=x_resnet)
    for model, x in ((mlp, x_mlp), (resnet, x_resnet)):
        for mode in (model.train, model.eval):
            mode()
            explanation = torch._dynamo.explain(model)(x)
            assert explanation.graph_break_count == 0, explanation.break_reasons
        prepared = l0sparse.Penalty(model, 0.1, N=10)  # the penalty is one autograd.Function: it traces too
        explanation = torch._dynamo.explain(lambda: prepared())()  # noqa: B023 (called at once, in this iteration)
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_compiled_and_eager_agree():
    torch.manual_seed(0)
    model = l0sparse.L0MLP((20, 16, 4)).eval()
    x = torch.randn(8, 20)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # PyTorch's float32 tolerances
    # the penalty (no noise) and its gradient agree too
    eager_penalty = l0sparse.penalty(model, 0.1)
    eager_penalty.backward()
    eager_grads = [layer.gate.log_alpha.grad.clone() for layer in model.l0_layers()]
    model.zero_grad()
    compiled_penalty = torch.compile(lambda: l0sparse.penalty(model, 0.1))()
    compiled_penalty.backward()
    torch.testing.assert_close(compiled_penalty, eager_penalty)
    for layer, grad in zip(model.l0_layers(), eager_grads):
        torch.testing.assert_close(layer.gate.log_alpha.grad, grad)


@pytest.mark.slow
def test_ddp_keeps_gates_identical_across_ranks(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert completed.returncode == 0, f"torchrun exited with {completed.returncode}: {completed.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # DDP averages the gradients, so every rank applies the same update to log α ...
    assert ranks[0]["log_alpha"] == ranks[1]["log_alpha"], f"ranks disagree: {ranks}\n{completed.stderr[-2000:]}"
    # ... while each rank draws its own gate noise (documented: like a larger batch with independent noise)
    assert ranks[0]["first_sample"] != ranks[1]["first_sample"]
    torch.manual_seed(0)
    initial = l0sparse.L0MLP((12, 8, 3)).l0_layers()[0].gate.log_alpha.tolist()
    assert ranks[0]["log_alpha"][0] != initial  # training moved them


@pytest.mark.slow
def test_l0sparse_train_runs_under_torchrun(tmp_path):
    """`l0sparse train` launched by torchrun on 2 CPU processes: each rank takes half of every epoch,
    the gates stay identical on both ranks, rank 0 writes a run that loads and resumes (docs/scale.md)."""
    from l0sparse.training.data import load_digits_split
    from l0sparse.training.runs import load_run

    out = tmp_path / "run"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "l0sparse", "train",
              str(RECIPES / "mlp-digits.toml"), "--out", str(out), "--no-progress"]
    # with a target, so that the controller's multipliers are compared across ranks too
    completed = subprocess.run(launch + ["--set", "epochs=2", "--set", "target=0.5"], capture_output=True, text=True, timeout=300,
                               env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n_train = len(load_digits_split().y_train)
    batch_size = json.loads((out / "config.json").read_text())["batch_size"]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert record["world_size"] == 2 and record["gates_identical_on_ranks"] is True
        assert record["multipliers_identical_on_ranks"] is True and record["lambda_1"] != 0  # the controller moved
        assert record["examples"] == 2 * (n_train // 2)  # both halves, the odd example left out
        assert record["steps"] == math.ceil((n_train // 2) / batch_size)  # each rank steps through its half
    _, model, data = load_run(out)
    assert l0sparse.training.runs.accuracy(model, data.x_test, data.y_test) > 0.5  # learned something in 2 epochs
    resumed = subprocess.run(launch[:-3] + ["--out", str(out), "--resume", "--set", "epochs=3", "--no-progress"],
                             capture_output=True, text=True, timeout=300, env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not list(out.glob("*.tmp"))


def _close_most_gates(model, generator):
    """Half the gates firmly closed (log α = -12: P(z ≠ 0) ≈ 1e-4), the rest spread over [-3, 3]."""
    with torch.no_grad():
        for gate in l0sparse.find_gates(model):
            values = torch.empty(gate.shape, dtype=gate.log_alpha.dtype).uniform_(-3, 3, generator=generator)
            closed = torch.rand(gate.shape, generator=generator) < 0.5
            gate.log_alpha.copy_(torch.where(closed, torch.full_like(values, -12.0), values))


@pytest.mark.parametrize("per_example_noise", [True, False], ids=["per-example", "shared"])
@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_conditional_computation_is_exact(name, per_example_noise):
    """The conditional forward equals the plain one, outputs and every gradient, in training and eval,
    with the same seed: it draws the same gates and skips only exact zeros."""
    torch.manual_seed(0)
    build = {"mlp": lambda **kw: l0sparse.L0MLP((784, 60, 30, 10), **kw), "lenet5": lambda **kw: l0sparse.L0LeNet5(**kw)}[name]
    plain = build(per_example_noise=per_example_noise).double()
    _close_most_gates(plain, torch.Generator().manual_seed(1))
    conditional = build(per_example_noise=per_example_noise, conditional=True).double()
    conditional.load_state_dict(plain.state_dict())
    x, y = torch.randn(32, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (32,))
    for mode in ("train", "eval"):
        results = []
        for model in (plain, conditional):
            model.train(mode == "train")
            model.zero_grad()
            torch.manual_seed(2)
            out = model(x)
            F.cross_entropy(out, y).backward()
            results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (out_plain, grads_plain), (out_conditional, grads_conditional) = results
        # float64 sums of up to 800 terms in another order: 800 ulps of the largest magnitude
        eps = torch.finfo(torch.float64).eps
        torch.testing.assert_close(out_conditional, out_plain, rtol=0, atol=800 * eps * float(out_plain.abs().max()))
        for key, grad in grads_plain.items():
            torch.testing.assert_close(grads_conditional[key], grad, rtol=0, atol=800 * eps * max(1.0, float(grad.abs().max())))
    # the conditional path really skipped units: some gates were closed for the whole batch
    assert any(float((g.deterministic() == 0).float().mean()) > 0.3 for g in l0sparse.find_gates(plain))


def test_conditional_models_trace_for_costs_and_pruning(tmp_path):
    """CostModel and prune trace the plain path of a conditional model (the same function), and a training
    run with `conditional = true` reports its sizes like any other."""
    from l0sparse.training.config import load_config
    from l0sparse.training.train import run_training

    torch.manual_seed(0)
    for plain, conditional, x in ((l0sparse.L0MLP((20, 12, 4)), l0sparse.L0MLP((20, 12, 4), conditional=True), torch.randn(3, 20)),
                                  (l0sparse.L0LeNet5(), l0sparse.L0LeNet5(conditional=True), torch.randn(3, 1, 28, 28))):
        _close_most_gates(plain, torch.Generator().manual_seed(3))
        conditional.load_state_dict(plain.state_dict())
        costs = l0sparse.CostModel(conditional, x).costs(deterministic=True)
        assert float(costs["flops"]) == float(l0sparse.CostModel(plain, x).costs(deterministic=True)["flops"])
        pruned = l0sparse.prune(conditional.eval(), x)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), conditional(x))
    config = load_config(RECIPES / "mlp-digits.toml", ["epochs=2", "hidden=[16]", "conditional=true", "per_example_noise=false"])
    history = run_training(config, tmp_path / "run", progress=False)
    assert len(history) == 2 and 0 < history[-1]["flops_kept"] <= 1
