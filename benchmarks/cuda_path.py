"""The whole l0sparse path on CUDA: sparsify, Penalty, CostModel, TargetController, training steps, prune.

issue #14 item 10: CostModel made its tensors on the CPU, so expected FLOPs, the controller and the
training metrics failed for any model off the CPU. tests/test_devices.py checks the path on the
``meta`` device (shapes, no values); this script runs it with values on a GPU and checks that the
pruned model's outputs equal the gated model's and that CostModel counts what pruning leaves.

Run:  .venv/bin/python benchmarks/cuda_path.py      (exits 0 with a message when there is no CUDA device; --cpu: on the CPU)
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import TinyResNet, mlp  # noqa: E402

import l0sparse  # noqa: E402

STEPS = 20


class BertLogits(torch.nn.Module):
    """A tiny random BertModel whose mean hidden state serves as logits (heads and feed-forward units gated)."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                         vocab_size=100, max_position_embeddings=32)
        self.bert = transformers.BertModel(config)

    def forward(self, input_ids):
        return self.bert(input_ids).last_hidden_state.mean(1)


BERT_RULES = {"bert.encoder.layer.*.attention": ("heads", 4), "bert.encoder.layer.*.output.dense": "in"}


def run_path(name: str, model: torch.nn.Module, x: torch.Tensor, classes: int, device: torch.device, rules=None) -> None:
    """Gate, train a few steps with the penalty and the controller, prune, and check the result on ``device``."""
    torch.manual_seed(0)
    model, x = model.to(device), x.to(device)
    y = torch.randint(0, classes, (x.shape[0],), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, rules, example_inputs=x)
    cost_model = l0sparse.CostModel(model, x)
    penalty = l0sparse.Penalty(model, 0.1, N=1000, cost_weights=cost_model.gate_costs("flops"))
    controller = l0sparse.TargetController(model, 0.5, "flops", example_inputs=x, warmup_steps=STEPS // 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(STEPS):
        loss = F.cross_entropy(model(x), y) + penalty() + controller.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        controller.step()
    expected = {key: float(value.detach()) for key, value in cost_model.costs().items()}
    pruned = l0sparse.prune(model, x)  # checks its outputs against the gated model's itself
    model.eval()
    with torch.no_grad():
        error = float((pruned(x) - model(x)).abs().max())
    kept = float(cost_model.flops(deterministic=True))
    counted = l0sparse.count_flops(pruned, x)
    assert kept == counted, f"{name}: CostModel says {kept} MACs after pruning, the pruned model does {counted}"
    assert next(pruned.parameters()).device.type == device.type
    print(f"{name} on {device}: loss {float(loss):.4f}, expected MACs {expected['flops']:.0f}, "
          f"pruned MACs {counted} of {l0sparse.count_flops(model, x)}, max |pruned - gated| {error:.2e}")


def run_decoder(device: torch.device) -> None:
    """A tiny Llama (grouped-query attention, SwiGLU, RMSNorm, tied embeddings) gated by decoder_rules and
    gate_decoder_hidden, trained a few steps towards a target shape, pruned to it: the same logits, the same greedy
    tokens with the KV cache, and CostModel counting what pruning leaves (issue #25)."""
    import transformers

    from l0sparse import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).to(device)
    ids = torch.randint(1, 64, (4, 12), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l0sparse.sparsify(model, hf.decoder_rules(model), example_inputs=batch, droprate_init=0.02)
        hf.gate_decoder_hidden(model, batch, droprate_init=0.02)
    shape = hf.DecoderShape(heads=4, kv_heads=1, intermediate_size=24, hidden_size=24)
    controller = hf.ShapeController(model, shape, warmup_steps=STEPS // 2)
    optimizer = torch.optim.Adam(l0sparse.param_groups(model, lr=1e-3, gate_lr=5e-2))
    model.train()
    for _ in range(STEPS):
        loss = model(**batch, labels=ids).loss + controller.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        controller.step()
    model.eval()
    pruned = hf.prune_to_shape(model, batch, shape)  # prune checks the logits against the selection's gated model
    budget = l0sparse.prune(model, batch)
    with torch.no_grad():
        error = float((budget(**batch).logits - model(**batch).logits).abs().max())
        same_tokens = torch.equal(budget.generate(ids[:1], max_new_tokens=8, do_sample=False),
                                  model.generate(ids[:1], max_new_tokens=8, do_sample=False))
    kept, counted = float(l0sparse.CostModel(model, batch).flops(deterministic=True)), l0sparse.count_flops(budget, batch)
    assert kept == counted, f"decoder: CostModel says {kept} MACs after pruning, the pruned model does {counted}"
    assert same_tokens, "decoder: the pruned model's greedy tokens differ from the gated model's"
    assert next(pruned.parameters()).device.type == device.type and pruned.config.hidden_size == 24
    print(f"Llama decoder on {device}: loss {float(loss):.4f}, pruned MACs {counted} of {l0sparse.count_flops(model, batch)}, "
          f"max |pruned - gated| {error:.2e}, greedy tokens equal, shape-pruned to {pruned.config.num_attention_heads} heads, "
          f"{pruned.config.intermediate_size} units, width {pruned.config.hidden_size}")


def main() -> int:
    device = torch.device("cuda")
    if "--cpu" in sys.argv:  # a check of this script itself where no GPU is lent
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("cuda_path: no CUDA device here; nothing to run (tests/test_devices.py covers the meta device; --cpu runs this script on the CPU)")
        return 0
    run_path("TinyResNet", TinyResNet(), torch.randn(8, 3, 8, 8), 5, device)
    run_path("MLP", mlp(), torch.randn(8, 20), 4, device)
    try:
        import transformers  # noqa: F401  (the 'hf' extra)
    except ImportError:
        print("cuda_path: transformers is not installed; the BERT path was not run")
    else:
        run_path("BERT", BertLogits(), torch.randint(0, 100, (8, 16)), 32, device, BERT_RULES)
        run_decoder(device)
    print(f"cuda_path: the whole path ran on {device.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
