"""torch.compile and DistributedDataParallel with gated models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import l0sparse
from models import TinyResNet


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


def test_ddp_keeps_gates_identical_across_ranks(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # DDP averages the gradients, so every rank applies the same update to log α ...
    assert ranks[0]["log_alpha"] == ranks[1]["log_alpha"]
    # ... while each rank draws its own gate noise (documented: like a larger batch with independent noise)
    assert ranks[0]["first_sample"] != ranks[1]["first_sample"]
    torch.manual_seed(0)
    initial = l0sparse.L0MLP((12, 8, 3)).l0_layers()[0].gate.log_alpha.tolist()
    assert ranks[0]["log_alpha"][0] != initial  # training moved them
