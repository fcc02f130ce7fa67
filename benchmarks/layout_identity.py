"""Issue #24's "behaviour unchanged": prune the same gated models with two checkouts and compare bit for bit.

Builds, with fixed seeds, a small ResNet (BatchNorm, residual joins, 1x1 shortcuts), LeNet-5, an MLP, PyTorch's own
TransformerEncoder (heads and units) and, when transformers is installed, a tiny Llama (heads, key/value groups,
units); closes a random half of every gate; prunes each at round_to 1 and 16; and records every pruned tensor's
shape and values, the outputs on a fixed batch, count_flops, and CostModel's expected and deterministic costs.
Only the public API is used, so the same script runs on the layout before issue #24 and after it:

    PYTHONPATH=<old checkout>/src .venv/bin/python benchmarks/layout_identity.py --out /tmp/before.pt
    PYTHONPATH=src .venv/bin/python benchmarks/layout_identity.py --out /tmp/after.pt --compare /tmp/before.pt \\
        --results benchmarks/results/layout_identity_issue24.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import l0sparse


class Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False), nn.BatchNorm2d(channels_out)
        self.conv2, self.bn2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False), nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Block(16, 16, 1), Block(16, 32, 2),
                         Block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def lenet5() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 5))


def llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def cases():
    yield "resnet", resnet, lambda: torch.randn(4, 3, 16, 16), {nn.Conv2d: "out", nn.Linear: "in"}
    yield "lenet5", lenet5, lambda: torch.randn(4, 1, 28, 28), {nn.Conv2d: "out", nn.Linear: "in"}
    yield "mlp", lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)), \
        lambda: torch.randn(4, 20), {nn.Linear: "out", "4": "in"}
    yield "encoder", encoder, lambda: torch.randn(4, 7, 32), None
    try:
        import l0sparse.hf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return
    yield "llama", llama, lambda: torch.randint(0, 97, (2, 9)), "decoder"


def record() -> dict:
    torch.set_num_threads(1)
    found = {}
    for name, factory, batch, rules in cases():
        for round_to in (1, 16):
            torch.manual_seed(0)
            model, x = factory().eval(), batch()
            if rules == "decoder":
                rules = l0sparse.hf.decoder_rules(model, groups=False)
            l0sparse.sparsify(model, rules, example_inputs=x)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for gate in l0sparse.find_gates(model):
                    gate.log_alpha.copy_(torch.where(torch.rand(gate.log_alpha.shape, generator=generator) < 0.5, -6.0, 3.0))
            model.eval()
            costs = l0sparse.CostModel(model, x)
            pruned = l0sparse.prune(model, x, round_to=round_to)
            with torch.no_grad():
                out = pruned(x)
            out = out if isinstance(out, torch.Tensor) else out.logits
            found[f"{name}/round_to={round_to}"] = {
                "state": {key: value.detach().clone() for key, value in pruned.state_dict().items()},
                "output": out.detach().clone(),
                "count_flops": l0sparse.count_flops(pruned, x),
                "expected": {key: float(value) for key, value in costs.costs().items()},
                "deterministic": {key: float(value) for key, value in costs.costs(deterministic=True).items()},
            }
    return found


def compare(before: dict, after: dict) -> dict:
    rows = {}
    for case in sorted(set(before) | set(after)):
        a, b = before.get(case), after.get(case)
        if a is None or b is None:
            rows[case] = {"identical": False, "why": "missing on one side"}
            continue
        same_keys = a["state"].keys() == b["state"].keys()
        same_shapes = same_keys and all(a["state"][k].shape == b["state"][k].shape for k in a["state"])
        same_values = same_shapes and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        same_output = torch.equal(a["output"], b["output"])
        same_counts = a["count_flops"] == b["count_flops"] and a["deterministic"] == b["deterministic"] and a["expected"] == b["expected"]
        rows[case] = {"same_shapes": same_shapes, "same_weights": same_values, "bit_equal_outputs": same_output,
                      "same_counts": same_counts, "identical": same_shapes and same_values and same_output and same_counts,
                      "count_flops": b["count_flops"]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where this checkout's record goes (a .pt file)")
    parser.add_argument("--compare", type=Path, help="another checkout's record to compare with")
    parser.add_argument("--results", type=Path, help="a JSON file for the comparison")
    args = parser.parse_args()
    found = record()
    torch.save(found, args.out)
    if args.compare is not None:
        rows = compare(torch.load(args.compare, weights_only=True), found)
        print(json.dumps(rows, indent=1))
        if args.results is not None:
            command = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')} python " + " ".join(sys.argv)
            args.results.write_text(json.dumps({"command": command, "compared_with": str(args.compare), "cases": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
