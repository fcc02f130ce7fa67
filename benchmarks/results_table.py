"""Turn the runs of benchmarks/run_results.sh into the table of benchmarks/RESULTS.md.

Run:  .venv/bin/python benchmarks/results_table.py   (after bash benchmarks/run_results.sh mlp|lenet)
"""

import json
from pathlib import Path

import l0sparse
from l0sparse.training.runs import load_run

RUNS = Path("runs/results")
COMMANDS = {
    "dense": "--set regularizer='\"none\"'",
    "l0-lambda": "",
    "l0-flops10": "--set target=0.1",
    "magnitude-flops10": "--set regularizer='\"magnitude\"' --set target=0.1",
}


def main():
    walls = {}
    if (RUNS / "wall_times.jsonl").exists():
        for line in (RUNS / "wall_times.jsonl").read_text().splitlines():
            row = json.loads(line)
            walls[Path(row["run"]).name] = row["wall_seconds"]
    lines = ["| model | run | epochs | test error | % params kept | % FLOPs kept | pruned architecture | wall time | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for prefix, recipe in (("mlp", "recipes/mlp-fashion-mnist.toml"), ("lenet5", "recipes/lenet5-fashion-mnist.toml")):
        for name, extra in COMMANDS.items():
            run_dir = RUNS / f"{prefix}-{name}"
            if not (run_dir / "metrics.jsonl").exists():
                continue
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            last = metrics[-1]
            config, model, _ = load_run(run_dir)
            if last["epoch"] < config.epochs * (2 if config.regularizer == "magnitude" else 1):
                continue  # still training (or stopped): only finished runs go in the table
            architecture = l0sparse.architecture(model) if config.regularizer == "l0" else "-"
            params = last.get("params_kept")
            wall = walls.get(run_dir.name)
            command = f"l0sparse train {recipe} --set epochs={config.epochs} {extra}".strip()
            lines.append(f"| {prefix} | {name} | {last['epoch']} | {100 * (1 - last['test_accuracy']):.2f}% | "
                         f"{'-' if params is None else f'{100 * params:.1f}%'} | {100 * last.get('flops_kept', 1.0):.1f}% | "
                         f"{architecture} | {'-' if wall is None else f'{wall / 60:.1f} min'} | `{command}` |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
