"""What each importance baseline removes from the fine-tuned MiniLM teacher at each FLOPs target (issue #26; no training).

Scores the gates of the teacher once per method, on the scoring examples a run of ``regularizer = "importance"`` uses
(the first 2,048 of a seeded permutation of the training set, in batches of 32), then prunes a fresh copy of the
gates to each target and records what is kept: heads and feed-forward units per layer, and the FLOPs reached. The
runs themselves then distil from the teacher for an epoch (recipes/minilm-wordnet-taylor-flops*.toml); this is only
their starting structure, and how long the scoring and the ranking take.

Needs: make hf, apt-get install wordnet-base and a teacher run (recipes/minilm-wordnet-teacher.toml). Run:
  .venv/bin/python benchmarks/importance_choice.py --teacher runs/minilm-teacher   # benchmarks/results/importance_choice.json
"""

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_json  # noqa: E402

import l0sparse  # noqa: E402
from l0sparse.training.baselines import cost_ranked_prune_, gate_importance, importance_prune_, taylor_importance  # noqa: E402
from l0sparse.hf import encoder_rules, trim_padding  # noqa: E402
from l0sparse.core.sites import find_gates  # noqa: E402
from l0sparse.training.train import IMPORTANCE_EXAMPLES, configure_torch  # noqa: E402
from l0sparse.training.runs import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"taylor": (taylor_importance, cost_ranked_prune_), "heads-magnitude-units": (gate_importance, importance_prune_)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "minilm-teacher")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0, help="the scoring examples' permutation (a run's config seed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "importance_choice.json")
    args = parser.parse_args(argv)
    configure_torch(1)
    started = time.perf_counter()
    _, teacher, data = load_run(args.teacher)
    scoring = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(args.seed))[:IMPORTANCE_EXAMPLES]
    batches = [(trim_padding(data.x_train[index], data.pad_id), data.y_train[index]) for index in scoring.split(args.batch_size)]
    example = data.x_train[:2]  # padded to 64 tokens: FLOPs at sequence length 64, as the runs count them
    results = {}
    for method in args.methods:
        score, prune = METHODS[method]
        model = copy.deepcopy(teacher)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the embeddings, q/k/v and the classifier have no gate of their own
            l0sparse.sparsify(model, encoder_rules(model), example_inputs=example)
        clock = time.perf_counter()
        scores = score(model, batches, F.cross_entropy)
        scoring_seconds = time.perf_counter() - clock
        start = {id(gate): gate.log_alpha.detach().clone() for gate in find_gates(model)}
        rows = []
        for target in args.targets:
            for gate in find_gates(model):
                with torch.no_grad():
                    gate.log_alpha.copy_(start[id(gate)])
            clock = time.perf_counter()
            kept = prune(model, target, example, scores)
            seconds = time.perf_counter() - clock
            counts = [int(gate.is_open().sum()) for gate in find_gates(model)]
            rows.append({"target": target, "flops_kept": kept, "architecture": l0sparse.architecture(model),
                         "heads": counts[0::2], "units": counts[1::2], "prune_seconds": seconds})
            print(f"{method} {100 * target:g}%: {100 * kept:.2f}% of the FLOPs, heads {rows[-1]['heads']}, units {rows[-1]['units']}",
                  flush=True)
        results[method] = {"scoring_seconds": scoring_seconds, "targets": rows}
    payload = {"command": "python benchmarks/importance_choice.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "teacher": str(args.teacher), "scoring_examples": int(scoring.numel()), "threads": 1,
               "wall_seconds": time.perf_counter() - started, "results": results}
    save_json(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
