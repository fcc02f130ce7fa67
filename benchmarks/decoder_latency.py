"""Latency of a decoder pruned to a target shape against the dense model (issue #25's target: speed-up at least
0.8 × the FLOPs ratio), on one thread: prefill of batch 8 × 128 tokens, and 32 greedy decode steps with the KV cache.

A random Llama (width 512, 8 layers, 8 query heads of 64 in 2 key/value groups, 1,536 SwiGLU units, a 4,096-token
vocabulary) is gated by decoder_rules and pruned by prune_to_shape to 2 heads in 1 group and 384 units (about 25% of
its non-embedding parameters); random log α pick the kept heads and units (latency does not depend on which). The
two models are timed alternately in one process, and the medians and their ratio reported.

    .venv/bin/python benchmarks/decoder_latency.py          # writes benchmarks/results/decoder_latency.json
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_json  # noqa: E402

import l0sparse  # noqa: E402
from l0sparse import hf  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decoder_latency.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)
warnings.simplefilter("ignore")
import transformers  # noqa: E402  (the 'hf' extra)

transformers.logging.set_verbosity_error()

BATCH, PREFILL, DECODE = 8, 128, 32
config = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                  head_dim=64, intermediate_size=1536, max_position_embeddings=PREFILL + DECODE)
shape = hf.DecoderShape(heads=2, kv_heads=1, intermediate_size=384)
torch.manual_seed(0)
dense = transformers.LlamaForCausalLM(config).eval()
gated = transformers.LlamaForCausalLM(config).eval()
gated.load_state_dict(dense.state_dict())
ids = torch.randint(0, config.vocab_size, (BATCH, PREFILL), generator=torch.Generator().manual_seed(1))
l0sparse.sparsify(gated, hf.decoder_rules(gated), example_inputs={"input_ids": ids[:2, :16]})
with torch.no_grad():
    for gate in l0sparse.find_gates(gated):
        gate.log_alpha.normal_()
pruned = hf.prune_to_shape(gated.eval(), {"input_ids": ids[:2, :16]}, shape).eval()


def non_embedding(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)


macs = {name: l0sparse.count_flops(model, {"input_ids": ids}) for name, model in (("dense", dense), ("pruned", pruned))}


def prefill(model) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def decode(model) -> float:
    """32 new tokens with the cache after the prompt; the prompt's own pass is timed by prefill()."""
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start - prefill_time[id(model)]


prefill_time = {id(model): prefill(model) for model in (dense, pruned)}  # warm-up, and the prompt's share of generate
times = {(name, kind): [] for name in ("dense", "pruned") for kind in ("prefill", "decode")}
for _ in range(args.rounds):
    for name, model in (("dense", dense), ("pruned", pruned)):  # alternate, so that load on the machine hits both
        times[(name, "prefill")].append(prefill(model))
        prefill_time[id(model)] = statistics.median(times[(name, "prefill")])
        times[(name, "decode")].append(decode(model))

flops_ratio = macs["dense"] / macs["pruned"]
result = {"command": "benchmarks/decoder_latency.py " + " ".join(sys.argv[1:]), "threads": args.threads, "rounds": args.rounds,
          "config": config.to_dict(), "shape": vars(shape), "batch": BATCH, "prefill_tokens": PREFILL, "decode_steps": DECODE,
          "non_embedding_params": {"dense": non_embedding(dense), "pruned": non_embedding(pruned)},
          "prefill_macs_per_sequence": macs, "flops_ratio": flops_ratio, "times": {f"{n}/{k}": v for (n, k), v in times.items()}}
for kind in ("prefill", "decode"):
    dense_median, pruned_median = statistics.median(times[("dense", kind)]), statistics.median(times[("pruned", kind)])
    speedup = dense_median / pruned_median
    result[kind] = {"dense_median_s": dense_median, "pruned_median_s": pruned_median, "speedup": speedup,
                    "speedup_over_flops_ratio": speedup / flops_ratio, "target_met": speedup >= 0.8 * flops_ratio}
    print(f"{kind}: dense {dense_median * 1e3:.1f} ms, pruned {pruned_median * 1e3:.1f} ms: {speedup:.2f}x "
          f"({speedup / flops_ratio:.2f} of the {flops_ratio:.2f}x FLOPs ratio)")
print(f"non-embedding parameters: {result['non_embedding_params']}")
save_json(result, args.out)
