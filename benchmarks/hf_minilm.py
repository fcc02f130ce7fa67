"""all-MiniLM-L6-v2 on WordNet glosses: L0 vs importance pruning at equal FLOPs and training budget (issue #12).

The whole experiment from the command line's own pieces, in order:
1. the teacher: the dense model fine-tuned (recipes/minilm-wordnet-teacher.toml);
2. for each FLOPs target, each of --methods: ``l0`` (heads and feed-forward units gated, TargetController,
   distilled from the teacher's logits, starting from its weights), ``importance`` (issue #12's baseline,
   ``importance = "heads-magnitude-units"``: Michel et al.'s head scores, feed-forward units by weight norm) and
   ``taylor`` (issue #26's: heads and units by the loss gradient of their mask, ranked in one pool per MAC); the
   baselines remove their gates once, then the same distillation for the same epochs;
3. each run pruned (``prune_run``), the pruned model reloaded (``load_pruned``) and evaluated on the test set;
4. latency at batch 32, sequence 64, one thread: the teacher and each pruned model timed alternately in this
   process, medians over repeats; with --round-to N also each model pruned with ``round_to=N`` (the same outputs,
   widths rounded up to multiples of N with zero units, which the CPU's vector units handle faster).

Encoder FLOPs are MACs per example at sequence length 64 (attention's two matrix products included), without the
classification layer. A run that already holds this config finished is reused, and one interrupted is resumed;
--fresh retrains them. ``training_wall_seconds`` is the time this process spent training each run (0 for a reused
one); ``epoch_seconds`` the training time its epochs recorded (metrics.jsonl), whichever process ran them.

Needs: make hf and apt-get install wordnet-base. Run:
  .venv/bin/python benchmarks/hf_minilm.py [--targets 0.5 0.25] [--methods l0 importance taylor] [--epochs 1] [--threads 2]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import reuse_freed_memory, save_json  # noqa: E402

from l0sparse.training.config import load_config, read_config_json  # noqa: E402
from l0sparse import prune  # noqa: E402
from l0sparse.core.costs import median_latency  # noqa: E402
from l0sparse.hf import encoder_flops  # noqa: E402
from l0sparse.training.runs import CHECKPOINT, accuracy, load_pruned, load_run, prune_run, read_metrics  # noqa: E402
from l0sparse.training.train import configure_torch, run_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
#: each method's recipe and the config keys it sets on top (its target is set by --targets)
METHODS = {
    "l0": ("minilm-wordnet-l0-flops50.toml", []),
    "importance": ("minilm-wordnet-importance-flops50.toml", []),
    "taylor": ("minilm-wordnet-taylor-flops50.toml", []),
    # issue #26's variants: the last 30% of the steps with the gates fixed as prune keeps them (the warm-up ends at
    # 50%, so L0 steps at the target come between); the hidden-size gate, for L0 and for the Taylor ranking alike
    "l0-settle": ("minilm-wordnet-l0-flops50.toml", ["settle=0.3"]),
    # the gates closed over the first quarter of the steps instead of the first half: the kept structure trains longer
    "l0-warmup25": ("minilm-wordnet-l0-flops50.toml", ["warmup=0.25"]),
    # the gates' learning rate on either side of the recipe's 2e-2
    "l0-gate-lr5e-2": ("minilm-wordnet-l0-flops50.toml", ["gate_lr=5e-2"]),
    "l0-gate-lr1e-2": ("minilm-wordnet-l0-flops50.toml", ["gate_lr=1e-2"]),
    "l0-hidden": ("minilm-wordnet-l0-flops50.toml", ["hidden_gate=true", "settle=0.3"]),
    "taylor-hidden": ("minilm-wordnet-taylor-flops50.toml", ["hidden_gate=true"]),
    # L0 started from the Taylor ranking's choice, its gates fixed for the last 80% of the steps
    "l0-from-taylor": ("minilm-wordnet-l0-taylor-flops10.toml", ["settle=0.8"]),
    # the structure the "l0" run of the same target and seed ended with, trained as the baseline trains (from the teacher's
    # weights, gates fixed from the first step): L0's structure without L0's training
    "l0-structure": ("minilm-wordnet-taylor-flops50.toml", ["structure_from='{runs}/{l0_run}'"]),
}

#: the plot's names of the methods whose key does not say what they are
LABELS = {"importance": "importance (heads by gradient, units by magnitude)", "taylor": "taylor (strong importance baseline)",
          "l0": "L0 (open start)", "l0-from-taylor": "L0 from taylor's choice, settle 0.8",
          "l0-structure": "L0's structure, trained as taylor"}


def run_name(method: str, target: float, seed: int) -> str:
    """A run's folder: METHOD-PERCENT for seed 0, METHOD-PERCENT-sSEED for the others."""
    return f"{method}-{round(100 * target)}" + (f"-s{seed}" if seed else "")


def finished(run_dir: Path, config) -> bool:
    """Whether ``run_dir`` holds this very config, trained to its last epoch (then it is reused)."""
    if not (run_dir / CHECKPOINT).exists() or read_config_json(run_dir / "config.json") != config:
        return False
    records = read_metrics(run_dir / "metrics.jsonl")
    return bool(records) and records[-1]["epoch"] >= config.epochs


def train(recipe: str, run_dir: Path, overrides: list[str], threads: int, fresh: bool) -> float:
    """Train (or reuse) one run; returns the training wall time in seconds (0 when reused)."""
    config = load_config(RECIPES / recipe, overrides)
    if not fresh and finished(run_dir, config):
        print(f"reusing {run_dir}", flush=True)
        return 0.0
    started = time.perf_counter()
    resume = not fresh and (run_dir / CHECKPOINT).exists() and read_config_json(run_dir / "config.json") == config
    run_training(config, run_dir, resume=resume, force=not resume, threads=threads, progress=False,
                 on_epoch_end=lambda record: print(f"{run_dir.name}: {record}", flush=True))
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=["l0", "importance"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of every L0 and baseline run (the teacher's is its recipe's); seed 0's runs are named "
                             "METHOD-PERCENT, the others METHOD-PERCENT-sSEED")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every L0 and baseline run (the teacher: its recipe's)")
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--test-examples", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2, help="training threads (latency is always timed on 1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--round-to", type=int, default=1,
                        help="also time each run pruned with prune(..., round_to=N): zero units kept up to multiples of N, same outputs")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "hf_minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hf_minilm.json")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already exist")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a finished teacher run to distil from (default: train one in RUNS/teacher)")
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, then stop: no pruning, timing or file")
    parser.add_argument("--collect-only", action="store_true",
                        help="train nothing: prune, evaluate and time the runs of --methods x --targets x --seeds that are finished, "
                             "leaving out the others (runs trained by --train-only processes side by side)")
    parser.add_argument("--plot", type=Path, default=None, help="also plot test accuracy against encoder FLOPs to this image")
    parser.add_argument("--plot-with", nargs="*", default=[], help="results files (of this script) whose runs the plot adds")
    parser.add_argument("--plot-methods", nargs="*", default=None, help="the methods the plot shows (default: every one)")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    configure_torch(args.threads)
    sizes = [f"train_examples={args.train_examples}", f"test_examples={args.test_examples}"]
    teacher_dir = args.teacher or args.runs / "teacher"
    wall = {"teacher": 0.0 if args.teacher else train("minilm-wordnet-teacher.toml", teacher_dir, sizes, args.threads, args.fresh)}
    runs = {}
    for target in args.targets:
        for seed in args.seeds:
            keys = [*sizes, f"teacher={str(teacher_dir)!r}", f"target={target}", f"epochs={args.epochs}", f"seed={seed}"]
            for method in args.methods:
                name = run_name(method, target, seed)
                recipe, method_keys = METHODS[method]
                method_keys = [key.format(runs=args.runs, l0_run=run_name("l0", target, seed)) for key in method_keys]
                if args.collect_only:
                    if finished(args.runs / name, load_config(RECIPES / recipe, [*keys, *method_keys])):
                        wall[name], runs[name] = 0.0, args.runs / name
                    else:
                        print(f"left out (not finished with this config): {args.runs / name}", flush=True)
                    continue
                wall[name] = train(recipe, args.runs / name, [*keys, *method_keys], args.threads, args.fresh)
                runs[name] = args.runs / name
    if args.train_only:
        return {}
    epoch_seconds = {name: sum(record["seconds"] for record in read_metrics(run_dir / "metrics.jsonl"))
                     for name, run_dir in {"teacher": teacher_dir, **runs}.items()}

    configure_torch(1)
    _, teacher, data = load_run(teacher_dir)
    example = data.x_train[:2]  # padded to 64 tokens: FLOPs at sequence length 64
    dense_flops = encoder_flops(teacher, example)
    results = {"teacher": {"test_accuracy": accuracy(teacher, data.x_test, data.y_test, pad_id=data.pad_id),
                           "encoder_flops": dense_flops, "params": sum(p.numel() for p in teacher.parameters())}}
    models = {"teacher": teacher}
    rounded = {}
    for name, run_dir in runs.items():
        prune_run(run_dir, force=True, latency=False)  # timed below, all models in turns in one process
        pruned = load_pruned(run_dir)
        models[name] = pruned
        if args.round_to > 1:  # the same outputs (prune checks them): only its FLOPs and time differ
            rounded[f"{name}-round{args.round_to}"] = prune(load_run(run_dir, data=data)[1], example, round_to=args.round_to).eval()
        flops = encoder_flops(pruned, example)
        results[name] = {"test_accuracy": accuracy(pruned, data.x_test, data.y_test, pad_id=data.pad_id),
                         "encoder_flops": flops, "encoder_flops_kept": flops / dense_flops,
                         "params": sum(p.numel() for p in pruned.parameters()),
                         "last_epoch": read_metrics(run_dir / "metrics.jsonl")[-1]}
    for name, model in rounded.items():
        models[name] = model
        flops = encoder_flops(model, example)
        unrounded = results[name.rsplit("-round", 1)[0]]
        results[name] = {"test_accuracy": unrounded["test_accuracy"], "encoder_flops": flops, "encoder_flops_kept": flops / dense_flops,
                         "params": sum(p.numel() for p in model.parameters())}
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(1000, 20000, (32, 64), generator=generator)  # 64 real tokens each: no padding to skip
    latency = median_latency(models, batch, args.repeats)
    for name in results:
        results[name]["latency_s"] = latency[name]
        if name != "teacher":
            results[name]["speedup"] = latency["teacher"] / latency[name]
            # against the FLOPs of the model L0 chose (a rounded copy computes zeros on top of them)
            chosen = results[name.rsplit("-round", 1)[0]]["encoder_flops_kept"]
            results[name]["speedup_over_flops_ratio"] = results[name]["speedup"] * chosen
            results[name]["accuracy_vs_teacher"] = results[name]["test_accuracy"] / results["teacher"]["test_accuracy"]
    payload = {"command": "python benchmarks/hf_minilm.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "seeds": args.seeds, "train_examples": args.train_examples, "test_examples": args.test_examples, "epochs": args.epochs,
               "training_wall_seconds": wall, "epoch_seconds": epoch_seconds, "threads": args.threads, "results": results}
    payload["summary"] = summarise(results, args.methods, args.targets, args.seeds)
    save_json(payload, args.out)
    if args.plot:
        plot([payload, *(json.loads(Path(extra).read_text()) for extra in args.plot_with)], args.plot, args.plot_methods)
    print(f"{'model':<24}{'test acc':>10}{'vs teacher':>12}{'enc FLOPs':>11}{'latency ms':>12}{'speed-up':>10}")
    for name, row in results.items():
        print(f"{name:<24}{100 * row['test_accuracy']:>9.2f}%{100 * row.get('accuracy_vs_teacher', 1):>11.1f}%"
              f"{100 * row.get('encoder_flops_kept', 1):>10.1f}%{1000 * row['latency_s']:>12.1f}{row.get('speedup', 1):>10.2f}")
    return payload


def summarise(results: dict, methods: list[str], targets: list[float], seeds: list[int], baseline: str = "taylor") -> dict:
    """Per target and method: the test accuracy's mean and standard error over the seeds it has runs for, and the paired
    difference from ``baseline``'s run of the same seed (mean ± standard error of the differences, over the seeds both
    have), in points."""
    import statistics

    def mean_se(values: list[float]) -> dict:
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
        return {"mean": statistics.fmean(values), "se": se, "n": len(values)}

    summary = {}
    for target in targets:
        rows = {}
        for method in methods:
            names = [run_name(method, target, seed) for seed in seeds if run_name(method, target, seed) in results]
            if not names:
                continue
            row = {"test_accuracy": mean_se([100 * results[name]["test_accuracy"] for name in names]),
                   "encoder_flops_kept": mean_se([100 * results[name]["encoder_flops_kept"] for name in names]),
                   "seeds": [seed for seed in seeds if run_name(method, target, seed) in results]}
            paired = [(run_name(method, target, seed), run_name(baseline, target, seed)) for seed in row["seeds"]
                      if run_name(baseline, target, seed) in results]
            if method != baseline and paired:
                row["minus_" + baseline] = mean_se([100 * (results[a]["test_accuracy"] - results[b]["test_accuracy"]) for a, b in paired])
            rows[method] = row
        summary[f"{round(100 * target)}%"] = rows
    return summary


def summary_of(payload: dict) -> dict:
    """A results file's summary; for a file written before summaries were (hf_minilm.json) or runs merged from several
    files, made from its run names."""
    if "summary" in payload:
        return payload["summary"]
    import re

    # run_name's form, METHOD-PERCENT[-sSEED]; a method's own name may hold "-s" (l0-settle)
    parsed = [re.fullmatch(r"(.+)-(\d+)(?:-s(\d+))?", name) for name in payload["results"] if name != "teacher" and "-round" not in name]
    methods = sorted({match.group(1) for match in parsed})
    targets = sorted({int(match.group(2)) / 100 for match in parsed})
    seeds = sorted({int(match.group(3) or 0) for match in parsed})
    return summarise(payload["results"], methods, targets, seeds)


def plot(payloads: list[dict], path: Path, methods: list[str] | None = None) -> None:
    """Test accuracy (mean ± s.e. over the seeds) against the encoder FLOPs kept, one line per method over every file's
    targets and seeds (a run named in several files is taken from the first), the teacher as a line (every file's runs
    distil from the same teacher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    results: dict = {}
    for payload in reversed(payloads):  # runs merged by name, a run in several files taken from the first
        results.update(payload["results"])
    points: dict[str, list] = {}
    for rows in summary_of({"results": results}).values():
        for method, row in rows.items():
            if methods is not None and method not in methods:
                continue
            n = row["test_accuracy"]["n"]
            points.setdefault(method, []).append((row["encoder_flops_kept"]["mean"], row["test_accuracy"]["mean"],
                                                  row["test_accuracy"]["se"] or 0.0, n))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, found in sorted(points.items()):
        found.sort()
        seeds = "/".join(str(n) for n in sorted({p[3] for p in found}))
        axes.errorbar([p[0] for p in found], [p[1] for p in found], yerr=[p[2] for p in found], marker="o", capsize=3,
                      label=f"{LABELS.get(method, method)} ({seeds} seed{'s' if seeds != '1' else ''})")
    axes.axhline(100 * payloads[0]["results"]["teacher"]["test_accuracy"], color="black", linestyle="--", label="teacher (dense)")
    axes.set_xscale("log")
    ticks = sorted({round(p[0]) for found in points.values() for p in found})
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([f"{tick}%" for tick in ticks])
    axes.set_xlabel("encoder FLOPs kept (of the teacher's, log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("all-MiniLM-L6-v2 on WordNet glosses: mean ± s.e. over seeds")
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)

if __name__ == "__main__":
    main()
