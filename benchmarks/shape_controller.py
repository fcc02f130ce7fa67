"""How ShapeController's expected counts reach a DecoderShape, with and without its anti-windup (issue #25).

The penalty alone (no task loss, so nothing but the constraints moves log α; Adam at 0.05 on log α, the
multipliers' Adam at ``--lr``), on random Llamas gated by decoder_rules (one gate per query head, so a key/value
target is a second constraint on the same gates) with every gate open at the start (droprate_init=0.02):

- small: width 32, 2 layers, 8 heads of 4 in 2 groups, 48 units -> 4 heads in 1 group, 24 units;
- wider: width 128, 4 layers, 8 heads of 16 in 2 groups, 384 units -> 2 heads in 1 group, 96 units.

Writes the first layer's expected counts (and its open test-time gates: the controller lands them on the shape
once the warm-up is over) every 50 steps to benchmarks/results/shape_controller.json.

    .venv/bin/python benchmarks/shape_controller.py
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_json  # noqa: E402

import l0sparse  # noqa: E402
from l0sparse import hf  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--warmup", type=int, default=100)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shape_controller.json")
args = parser.parse_args()
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import transformers  # noqa: E402  (the 'hf' extra)


CASES = {
    "small": (dict(hidden_size=32, num_hidden_layers=2, head_dim=4, intermediate_size=48), hf.DecoderShape(heads=4, kv_heads=1, intermediate_size=24)),
    "wider": (dict(hidden_size=128, num_hidden_layers=4, head_dim=16, intermediate_size=384), hf.DecoderShape(heads=2, kv_heads=1, intermediate_size=96)),
}
results = {"command": "benchmarks/shape_controller.py " + " ".join(sys.argv[1:]), "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
           "runs": []}
for case, (sizes, shape) in CASES.items():
    for anti_windup in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, num_attention_heads=8, num_key_value_heads=2, **sizes))
        batch = {"input_ids": torch.randint(0, 64, (2, 8))}
        l0sparse.sparsify(model, hf.decoder_rules(model), example_inputs=batch, droprate_init=0.02)
        controller = hf.ShapeController(model, shape, warmup_steps=args.warmup, lr=args.lr, anti_windup=anti_windup)
        optimizer = torch.optim.Adam([gate.log_alpha for gate in l0sparse.find_gates(model)], lr=0.05)
        trace = []
        for step in range(1, args.steps + 1):
            optimizer.zero_grad()
            controller.penalty().backward()
            optimizer.step()
            controller.step()
            if step % 50 == 0:
                attention, units = controller.expected_counts()[:2]
                open_attention, open_units = controller.deterministic_counts()[:2]
                trace.append({"step": step, **{k: round(float(v), 3) for k, v in attention.items()}, "units": round(float(units["units"]), 2),
                              "open": {**{k: int(v) for k, v in open_attention.items()}, "units": int(open_units["units"])}})
        lowest = min(point["heads"] for point in trace)
        results["runs"].append({"case": case, "shape": vars(shape), "anti_windup": anti_windup, "trace": trace, "lowest_heads": lowest,
                                "lowest_units": min(point["units"] for point in trace), "last": trace[-1]})
        print(f"{case} anti_windup={anti_windup}: lowest heads {lowest}, lowest units {results['runs'][-1]['lowest_units']}, "
              f"at the end {trace[-1]}", flush=True)
save_json(results, args.out)
