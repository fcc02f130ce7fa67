"""What the gates' noise hides at the end of an L0 run (issue #26): a run's gated model evaluated on the test set with
its test-time gates (Eq. 13: what ``prune`` keeps) and with gates sampled as in training (the Hard Concrete noise),
the rest of the model in eval mode (no dropout).

An L0 run trains the weights under sampled gates; at 10% of the FLOPs its gates end the epoch with an expected 14%
of the FLOPs open (``expected_flops_kept`` in metrics.jsonl) against 10% at test time. If the sampled network is
clearly better than the test-time one, the weights were trained for a larger network than the one kept.

Run (each run folder of ``l0sparse train``; about a minute per run and sample on one thread):
  .venv/bin/python benchmarks/minilm_gate_noise.py runs/i26/l0-10 runs/i26/l0-10-s1 --samples 3 \
      --out benchmarks/results/minilm_gate_noise.json
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

from l0sparse.core.sites import find_gates  # noqa: E402
from l0sparse.hf.task import token_lengths, trim_padding  # noqa: E402
from l0sparse.training.runs import accuracy, load_run, read_metrics  # noqa: E402
from l0sparse.training.train import configure_torch  # noqa: E402


@torch.no_grad()
def sampled_accuracy(model, x, y, pad_id: int, batch_size: int = 256) -> float:
    """Test accuracy with every gate sampling as in training and every other module in eval mode."""
    model.eval()
    for gate in find_gates(model):
        gate.train()
    try:
        correct = 0
        for index in token_lengths(x, pad_id).argsort().split(batch_size):
            correct += int((model(trim_padding(x[index], pad_id)).argmax(-1) == y[index]).sum())
    finally:
        model.eval()
    return correct / len(y)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--samples", type=int, default=3, help="gate samples per run (each a pass over the test set)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minilm_gate_noise.json"))
    args = parser.parse_args(argv)
    configure_torch(1)
    results = {}
    for run_dir in args.runs:
        started = time.perf_counter()
        _, model, data = load_run(run_dir)
        last = read_metrics(run_dir / "metrics.jsonl")[-1]
        torch.manual_seed(0)
        sampled = [sampled_accuracy(model, data.x_test, data.y_test, data.pad_id) for _ in range(args.samples)]
        results[run_dir.name] = {
            "run": str(run_dir), "test_accuracy_test_time_gates": accuracy(model, data.x_test, data.y_test, pad_id=data.pad_id),
            "test_accuracy_sampled_gates": sampled, "test_accuracy_sampled_mean": sum(sampled) / len(sampled),
            "flops_kept": last.get("flops_kept"), "expected_flops_kept": last.get("expected_flops_kept"),
            "seconds": time.perf_counter() - started}
        print(run_dir.name, results[run_dir.name], flush=True)
    payload = {"command": "python benchmarks/minilm_gate_noise.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "samples": args.samples, "results": results}
    save_json(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
