"""Sheared-LLaMA's comparison in miniature, offline (issue #25).

A small Llama-architecture teacher (grouped-query attention, SwiGLU, RMSNorm) is trained on the King James Bible
(Debian's bible-kjv, byte-level: 256 symbols; every 20th block of 100 verses held out). Each target shape is then
reached three ways with the same number of training tokens after the teacher:

- l0: the teacher gated by decoder_rules, trained with ShapeController (the shape's Lagrangian) and distillation
  for the pruning phase, pruned with prune_to_shape, then trained on (distillation) for the rest;
- importance: Minitron's activation-importance width pruning (each key/value group's output and each unit's
  activation, root mean square over calibration tokens) to the same shape, then the same continued training;
- scratch: the same shape from a random init, trained on the language-modelling loss for all the tokens.

Held-out perplexity is per byte. Writes benchmarks/results/decoder_shear.json and docs/img/decoder_shear.png.

    .venv/bin/python benchmarks/decoder_shear.py            # the figures in docs/decoders.md
    .venv/bin/python benchmarks/decoder_shear.py --quick    # a smoke run (minutes)
"""

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import save_json  # noqa: E402

import l0sparse  # noqa: E402
from l0sparse import hf  # noqa: E402
from l0sparse.training.data import load_bible_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--teacher-steps", type=int, default=3000)
parser.add_argument("--steps", type=int, default=1000, help="training steps after the teacher, equal for every method")
parser.add_argument("--prune-fraction", type=float, default=0.4, help="l0: the share of --steps spent learning the gates")
parser.add_argument("--scratch-factor", type=int, default=3, help="scratch trains this many times --steps, to see when it catches up")
parser.add_argument("--seeds", type=int, default=3)
parser.add_argument("--first-seed", type=int, default=0, help="the seeds run are first-seed, first-seed + 1, ...")
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--context", type=int, default=128)
parser.add_argument("--eval-windows", type=int, default=128)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--teacher-cache", type=Path, default=ROOT / "runs" / "decoder-teacher.pt")
parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decoder_shear.json")
parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "decoder_shear.png")
parser.add_argument("--sizes", default="50%,25%", help="which target shapes, comma-separated")
parser.add_argument("--methods", default="l0,importance,scratch", help="which methods, comma-separated (also l0_from_importance)")
parser.add_argument("--reuse", type=Path, default=None,
                    help="a results file of this script with the same teacher and budgets: its runs of the methods not run now join the summary")
parser.add_argument("--quick", action="store_true", help="tiny budgets, one seed: a smoke run")
args = parser.parse_args()
if args.quick:
    args.teacher_steps, args.steps, args.seeds, args.eval_windows = 200, 100, 1, 32
    args.out, args.plot = args.out.with_name("decoder_shear_quick.json"), args.plot.with_name("decoder_shear_quick.png")
    args.teacher_cache = args.teacher_cache.with_name("decoder-teacher-quick.pt")
torch.set_num_threads(args.threads)
torch.set_flush_denormal(True)
warnings.simplefilter("ignore")  # sparsify's "has weights but no gate" for embeddings and norms
import transformers  # noqa: E402  (the 'hf' extra)

transformers.logging.set_verbosity_error()

# ---- the teacher's architecture and the two target shapes (about 50% and 25% of its non-embedding parameters)
TEACHER = dict(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
               head_dim=16, intermediate_size=384, max_position_embeddings=args.context, tie_word_embeddings=True)
# whole key/value groups (4 query heads each) and SwiGLU units: 50.0% and 25.5% of the non-embedding parameters
SHAPES = {"50%": hf.DecoderShape(heads=4, kv_heads=1, intermediate_size=192),
          "25%": hf.DecoderShape(heads=4, kv_heads=1, intermediate_size=72)}
RULES = {"groups": True}  # one gate per key/value group: a shape of whole groups is one constraint per layer, not two


def llama(shape: hf.DecoderShape | None = None):
    config = dict(TEACHER)
    if shape is not None:
        config.update(num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate_size)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


def non_embedding_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name
               and "log_alpha" not in name)


# ---- data: random windows of the training text; fixed, non-overlapping windows of the held-out text
train_text, held_out_text = load_bible_bytes()
windows = held_out_text[: (len(held_out_text) // (args.context + 1)) * (args.context + 1)].view(-1, args.context + 1)
held_out = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[: args.eval_windows]].long()


def batch_of(generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(train_text) - args.context - 1, (args.batch,), generator=generator)
    return torch.stack([train_text[s: s + args.context + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def perplexity(model) -> float:
    """exp of the mean next-byte cross-entropy over the held-out windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in held_out.split(32):
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
        total += float(F.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum"))
    model.train(was_training)
    return math.exp(total / (len(held_out) * args.context))


def train(model, steps: int, seed: int, lr: float, teacher=None, extra_loss=None, after_step=None, curve=None, tokens_before=0):
    """AdamW with a cosine decay to zero; the loss is next-byte cross-entropy, plus the KL divergence to the teacher's
    next-byte distribution when a teacher is given, plus ``extra_loss()`` (a controller's penalty)."""
    generator = torch.Generator().manual_seed(seed)
    gates = [g.log_alpha for g in l0sparse.find_gates(model)]
    weights = [p for p in model.parameters() if all(p is not g for g in gates)]
    groups = [{"params": weights, "lr": lr, "weight_decay": 0.1}] + ([{"params": gates, "lr": 0.05, "weight_decay": 0.0}] if gates else [])
    optimizer = torch.optim.AdamW(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    every = max(1, steps // 5)
    model.train()
    for step in range(1, steps + 1):
        x = batch_of(generator)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                target = teacher(input_ids=x[:, :-1], use_cache=False).logits
            loss = loss + F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean") / args.context
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step()
        if curve is not None and (step % every == 0 or step == steps):
            curve.append((tokens_before + step * args.batch * args.context, perplexity(model)))
    return model


def calibration_importance(model, batches: int = 8) -> dict[str, torch.Tensor]:
    """Minitron's activation importance: per attention module, each key/value group's output (the output projection's
    input columns of its query heads) and per feed-forward block, each unit's activation (the down projection's
    input), as the root mean square over every calibration token."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("self_attn.o_proj") or name.endswith("mlp.down_proj"):
            def keep(module, inputs, output, name=name):
                squares = inputs[0].detach().pow(2).reshape(-1, inputs[0].shape[-1]).mean(0)
                sums[name] = sums.get(name, 0) + squares
            hooks.append(module.register_forward_hook(keep))
    generator = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for _ in range(batches):
            model(input_ids=batch_of(generator)[:, :-1], use_cache=False)
    for hook in hooks:
        hook.remove()
    scores = {}
    for name, total in sums.items():
        rms = (total / batches).sqrt()
        if name.endswith("o_proj"):  # a key/value group's score: the norm of its query heads' output activations
            scores[name.removesuffix(".o_proj")] = rms.view(TEACHER["num_key_value_heads"], -1).norm(dim=1)
        else:
            scores[name] = rms
    return scores


# ---- the teacher (cached: the methods all start from the same one)
torch.manual_seed(0)
if args.teacher_cache.exists():
    teacher = llama()
    teacher.load_state_dict(torch.load(args.teacher_cache, weights_only=True))
    teacher_seconds = None
else:
    start = time.perf_counter()
    teacher = train(llama(), args.teacher_steps, seed=0, lr=3e-3)
    teacher_seconds = time.perf_counter() - start
    args.teacher_cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), args.teacher_cache)
teacher.eval()
teacher_ppl = perplexity(teacher)
print(f"teacher: {non_embedding_params(teacher):,} non-embedding parameters, held-out perplexity {teacher_ppl:.3f}", flush=True)
example = {"input_ids": held_out[:2, :-1]}
tokens_per_step = args.batch * args.context

results = {"command": " ".join(["benchmarks/decoder_shear.py", *sys.argv[1:]]), "teacher": TEACHER, "teacher_steps": args.teacher_steps,
           "teacher_perplexity": teacher_ppl, "teacher_seconds": teacher_seconds, "teacher_non_embedding_params": non_embedding_params(teacher),
           "steps": args.steps, "tokens": args.steps * tokens_per_step, "prune_fraction": args.prune_fraction, "batch": args.batch,
           "context": args.context, "threads": args.threads, "corpus": "bible-kjv, bytes, every 20th block of 100 verses held out",
           "runs": []}
def run_l0(shape: hf.DecoderShape, seed: int, curve: list, from_importance: bool = False):
    """Gates learned under the shape's constraint with distillation for the pruning phase, pruned, trained on.
    ``from_importance``: log α starts from the activation-importance ranks (in [0, 4]: every gate open, P(z ≠ 0) from
    0.83 to 1.00, the most important highest), so that L0 refines importance's choice instead of starting level."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher).train()
    scores = calibration_importance(student) if from_importance else {}
    l0sparse.sparsify(student, hf.decoder_rules(student, **RULES), example_inputs=example, droprate_init=0.02)
    with torch.no_grad():
        for gate in l0sparse.find_gates(student):  # a head gate's owner is its attention module, a unit gate's its down projection
            if gate.owner in scores:
                ranks = scores[gate.owner].argsort().argsort().float()
                gate.log_alpha.copy_(4.0 * ranks / max(1, ranks.numel() - 1))
    prune_steps = int(args.steps * args.prune_fraction)
    controller = hf.ShapeController(student, shape, warmup_steps=prune_steps // 2, lr=0.05)
    train(student, prune_steps, seed=100 + seed, lr=1e-3, teacher=teacher, extra_loss=controller.penalty, after_step=controller.step,
          curve=curve)
    pruned = hf.prune_to_shape(student.eval(), example, shape)
    curve.append((prune_steps * tokens_per_step, perplexity(pruned)))  # what the cut to the shape costs
    return train(pruned, args.steps - prune_steps, seed=200 + seed, lr=1e-3, teacher=teacher, curve=curve,
                 tokens_before=prune_steps * tokens_per_step)


def run_importance(shape: hf.DecoderShape, seed: int, curve: list):
    """Minitron's activation norms pick the same shape at once; then the same continued training, for every step."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher).eval()
    scores = calibration_importance(student)
    l0sparse.sparsify(student, hf.decoder_rules(student, **RULES), example_inputs=example, droprate_init=0.02)  # every gate at 1
    pruned = hf.prune_to_shape(student.eval(), example, shape, scores=scores)
    curve.append((0, perplexity(pruned)))
    return train(pruned, args.steps, seed=200 + seed, lr=1e-3, teacher=teacher, curve=curve)


def run_scratch(shape: hf.DecoderShape, seed: int, curve: list):
    """The same shape from a random init, trained longer than the budget to see when it catches up."""
    torch.manual_seed(1000 + seed)
    return train(llama(shape), args.steps * args.scratch_factor, seed=300 + seed, lr=3e-3, curve=curve)


RUNS = {"l0": run_l0, "importance": run_importance, "scratch": run_scratch,
        "l0_from_importance": lambda shape, seed, curve: run_l0(shape, seed, curve, from_importance=True)}
methods, sizes = args.methods.split(","), args.sizes.split(",")
unknown = sorted(set(methods) - set(RUNS)) + sorted(set(sizes) - set(SHAPES))
if unknown:
    parser.error(f"unknown method or size {unknown[0]!r}: methods are {', '.join(RUNS)}; sizes {', '.join(SHAPES)}")
budget_tokens = args.steps * tokens_per_step
seeds = range(args.first_seed, args.first_seed + args.seeds)
for size in sizes:
    for seed in seeds:
        for method in methods:
            start, curve = time.perf_counter(), []
            model = RUNS[method](SHAPES[size], seed, curve)
            run = {"method": method, "size": size, "seed": seed, "curve": curve, "non_embedding_params": non_embedding_params(model),
                   "seconds": time.perf_counter() - start}
            # the perplexity at the budget (scratch's curve goes on past it)
            run["perplexity"] = min(curve, key=lambda point: abs(point[0] - budget_tokens))[1] if method == "scratch" else perplexity(model)
            results["runs"].append(run)
            print(f"{size} seed {seed} {method:>10}: perplexity {run['perplexity']:.3f} ({run['non_embedding_params']:,} parameters, "
                  f"{run['seconds']:.0f} s)", flush=True)

if args.reuse is not None:  # the other methods' runs, from a file made with the same teacher, budgets and seeds
    earlier = json.loads(args.reuse.read_text())
    same = {key: earlier[key] for key in ("teacher_perplexity", "steps", "batch", "context", "teacher")} == {
        key: results[key] for key in ("teacher_perplexity", "steps", "batch", "context", "teacher")}
    if not same:
        parser.error(f"--reuse {args.reuse}: made with another teacher or budget")
    # every run of the earlier file that this command did not make again (another method, or another seed)
    reused = [run for run in earlier["runs"] if run["size"] in sizes and not (run["method"] in methods and run["seed"] in seeds)]
    results["reused"] = {"file": str(args.reuse.relative_to(ROOT) if args.reuse.is_absolute() else args.reuse), "runs": len(reused)}
    results["runs"] += reused
    methods += sorted({run["method"] for run in reused} - set(methods), key=list(RUNS).index)

# ---- summary: mean ± standard error over seeds; the differences paired by seed
summary = {}
for size in sizes:
    by_seed = {m: {r["seed"]: r["perplexity"] for r in results["runs"] if r["size"] == size and r["method"] == m} for m in methods}
    by_method = {m: [values[seed] for seed in sorted(values)] for m, values in by_seed.items()}
    row = {}
    for method, values in by_method.items():
        mean = sum(values) / len(values)
        se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 / len(values) ** 0.5 if len(values) > 1 else float("nan")
        row[method] = {"mean": mean, "se": se, "values": values, "seeds": sorted(by_seed[method])}
    for learned in [m for m in by_method if m.startswith("l0")]:
        for other in [m for m in ("importance", "scratch") if m in by_method]:
            paired = sorted(set(by_seed[learned]) & set(by_seed[other]))  # the seeds both have, paired by seed
            differences = [by_seed[learned][seed] - by_seed[other][seed] for seed in paired]
            mean = sum(differences) / len(differences)
            se = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)) ** 0.5 / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
            row[f"{learned}_minus_{other}"] = {"mean": mean, "se": se, "seeds": paired}
    l0_mean = row["l0"]["mean"] if "l0" in row else float("nan")
    catch_up = []
    for run in (r for r in results["runs"] if r["size"] == size and r["method"] == "scratch"):
        reached = [tokens for tokens, ppl in run["curve"] if ppl <= l0_mean]
        catch_up.append(reached[0] if reached else None)
    row["scratch_tokens_to_reach_l0"] = catch_up
    summary[size] = row
    print(size, {k: (round(v["mean"], 3), round(v["se"], 3)) if isinstance(v, dict) else v for k, v in row.items()}, flush=True)
results["summary"] = summary
save_json(results, args.out)

# ---- the plot: held-out perplexity against training tokens after the teacher
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), sharey=True, squeeze=False)
axes = axes[0]
colours = {"l0": "tab:blue", "importance": "tab:orange", "scratch": "tab:green", "l0_from_importance": "tab:purple"}
for axis, size in zip(axes, sizes):
    for run in (r for r in results["runs"] if r["size"] == size):
        tokens, values = zip(*run["curve"])
        axis.plot([t / 1e6 for t in tokens], values, marker=".", color=colours[run["method"]], alpha=0.7,
                  label=run["method"] if run["seed"] == 0 else None)
    axis.axhline(teacher_ppl, color="black", linestyle=":", label="teacher")
    axis.axvline(args.steps * tokens_per_step / 1e6, color="grey", linestyle="--", linewidth=0.8)
    axis.set_title(f"{size} of the teacher's non-embedding parameters")
    axis.set_xlabel("training tokens after the teacher (millions)")
    axis.set_yscale("log")
axes[0].set_ylabel("held-out perplexity per byte")
axes[0].legend()
figure.tight_layout()
args.plot.parent.mkdir(parents=True, exist_ok=True)
figure.savefig(args.plot, dpi=110)
print(f"wrote {args.out} and {args.plot}")
