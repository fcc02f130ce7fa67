"""The ``l0sparse`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

__all__ = ["main", "run_demo"]

DEMO_SIZES = (64, 100, 50, 10)


def run_demo(epochs: int = 100, lam: float = 0.2, lr: float = 1e-2, seed: int = 0, threads: int = 1, progress: bool = True, out=None) -> dict:
    """Train an L0 MLP and a dense MLP on scikit-learn's digits and print what L0 kept."""
    from .core.costs import CostModel, count_flops, count_params, expected_l0
    from .training.data import load_digits_split
    from .core.models import L0MLP, mlp
    from .core.prune import plain_copy
    from .training.train import configure_torch, fit
    from .training.runs import accuracy

    out = out or sys.stdout
    configure_torch(threads)
    data = load_digits_split(seed=seed)
    n_train = len(data.y_train)
    print(f"digits: {n_train} train / {len(data.y_test)} test images of 8x8, {data.num_classes} classes", file=out)
    print(f"L0 MLP {'-'.join(map(str, DEMO_SIZES))}, lambda = {lam:g}/N per weight, {epochs} epochs of Adam at lr {lr:g}, seed {seed}", file=out)

    start = time.perf_counter()
    torch.manual_seed(seed)
    gated = L0MLP(DEMO_SIZES)
    fit(gated, data.x_train, data.y_train, epochs=epochs, lr=lr, lam=lam, seed=seed, progress=progress, desc="L0 MLP")
    torch.manual_seed(seed)
    dense = mlp(DEMO_SIZES)
    fit(dense, data.x_train, data.y_train, epochs=epochs, lr=lr, seed=seed, progress=progress, desc="dense MLP")
    elapsed = time.perf_counter() - start

    example = data.x_train[:2]
    kept = CostModel(gated, example).costs(deterministic=True)  # what prune leaves, counted without pruning
    plain = plain_copy(gated)
    counts = {"params": count_params(plain), "kept_params": int(kept["params"]),
              "flops": count_flops(plain, example), "kept_flops": int(kept["flops"])}
    result = {
        "architecture": gated.architecture(),
        "accuracy_l0": accuracy(gated, data.x_test, data.y_test),
        "accuracy_dense": accuracy(dense, data.x_test, data.y_test),
        "expected_l0": float(expected_l0(gated).detach()),
        "params_kept": counts["kept_params"] / counts["params"],
        "flops_kept": counts["kept_flops"] / counts["flops"],
        "seconds": elapsed,
    }
    n_gates = sum(DEMO_SIZES[:-1])
    print(f"architecture (kept inputs per layer): {result['architecture']}", file=out)
    print(f"test accuracy: L0 {100 * result['accuracy_l0']:.2f}%   dense {100 * result['accuracy_dense']:.2f}%", file=out)
    print(f"expected L0: {result['expected_l0']:.1f} of {n_gates} gates open", file=out)
    print(
        f"kept: {100 * result['params_kept']:.1f}% of parameters ({counts['kept_params']}/{counts['params']}), "
        f"{100 * result['flops_kept']:.1f}% of FLOPs ({counts['kept_flops']}/{counts['flops']} MACs per example)",
        file=out,
    )
    print(f"trained both models in {elapsed:.1f} s on {torch.get_num_threads()} thread(s)", file=out)
    return result


def _read_number(text: str, convert, allowed: str):
    try:
        return convert(text)
    except ValueError:  # argparse would name the converting function ("invalid _positive_float value"), not what is allowed
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _read_number(text, int, "an int >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _threads(text: str) -> int:
    """--threads: at most this machine's cores (100000 made ~1,800 threads before failing about the run folder)."""
    value = _positive_int(text)
    cores = os.cpu_count() or 1
    if value > cores:
        raise argparse.ArgumentTypeError(f"must be at most this machine's {cores} cores, got {value}")
    return value


def _seed(text: str) -> int:
    """--seed: numpy's range for a random state, [0, 2**32 - 1] (-1 was blamed on train_test_split)."""
    from .training.config import SEED_MAX

    value = _read_number(text, int, f"an int in [0, {SEED_MAX}]")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an int in [0, {SEED_MAX}], got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _read_number(text, float, "a number >= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _read_number(text, float, "a number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l0sparse", description="Learn sparse networks with L0 regularization.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train an L0 MLP on scikit-learn's digits and show what it kept")
    demo.add_argument("--epochs", type=_positive_int, default=100, help="training epochs (default 100)")
    demo.add_argument("--lam", type=_nonnegative_float, default=0.2, help="lambda per weight, divided by N (default 0.2)")
    demo.add_argument("--lr", type=_positive_float, default=1e-2, help="Adam learning rate (default 0.01)")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--threads", type=_threads, default=1, help="torch threads (default 1, at most the machine's cores)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    train = commands.add_parser("train", help="train a model from a TOML config (see recipes/)")
    train.add_argument("config", nargs="?", help="the TOML config (not needed with --resume)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set epochs=5 (repeatable)")
    train.add_argument("--out", help="run directory (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    train.add_argument("--threads", type=_threads, default=1, help="torch threads (default 1, at most the machine's cores)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars and lines")
    train.add_argument("--log-every", type=_positive_int, default=50, metavar="N",
                       help="without a terminal (a log file), a progress line every N steps instead of a bar (default 50)")

    prune = commands.add_parser("prune", help="write the physically pruned model of a run and print its summary")
    prune.add_argument("run_dir")
    prune.add_argument("--force", action="store_true", help="overwrite an existing pruned.pt")
    prune.add_argument("--round-to", type=_positive_int, default=None,
                       help="keep channel and unit counts at multiples of this (zero ones added; outputs unchanged); "
                            "default: the run's config key round_to (1 unless set)")
    prune.add_argument("--no-latency", action="store_true", help="skip timing the pruned model against the unpruned one")
    prune.add_argument("--threads", type=_threads, default=1, help="torch threads, the latency's included (default 1, at most the machine's cores)")

    report = commands.add_parser("report", help="plots and a Markdown table over one or more runs")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", help="folder for the report (default: <first run>/report)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(epochs=args.epochs, lam=args.lam, lr=args.lr, seed=args.seed, threads=args.threads, progress=not args.no_progress)
        elif args.command == "train":
            return _train(parser, args)
        elif args.command == "prune":
            from .training.runs import RunFolder
            from .training.train import configure_torch

            configure_torch(args.threads)
            run = RunFolder(args.run_dir)
            pruned, table = run.prune(force=args.force, round_to=args.round_to, latency=not args.no_latency, say=_steps_on_a_terminal())
            print(table)
            print(f"wrote {run.pruned_weights_path} and {run.pruned_spec_path.name} (load with l0sparse.training.runs.load_pruned)")
        elif args.command == "report":
            from .training.plots import report_runs
            from .training.runs import RunFolder

            _check_out(args.out, "the report folder", "<first run>/report")
            written = report_runs(args.run_dirs, args.out or RunFolder(args.run_dirs[0]).report_path, say=_steps_on_a_terminal())
            for path in written.values():
                print(f"wrote {path}")
    except (ValueError, OSError, ImportError, FloatingPointError) as error:  # bad input: one line, no traceback
        print(f"l0sparse {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _steps_on_a_terminal():
    """What announces a slow step of prune and report: a line on stderr on a terminal, else nothing, so that in a log
    a bad file's error stays the one line on stderr (docs/cli.md)."""
    if not sys.stderr.isatty():
        return None
    return lambda line: print(f"{line} ...", file=sys.stderr, flush=True)


def _check_out(out: str | None, what: str, default: str) -> None:
    """An empty ``--out`` (an unset shell variable) is an error, not the default folder."""
    if out is not None and not out.strip():
        raise ValueError(f"--out is empty ({out!r}): name {what}, or leave --out out for {default}")


def _one_line(error: BaseException) -> str:
    """The message of a user-facing error on one line; an OSError as 'path: reason' without its errno."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _train(parser, args) -> int:
    from pathlib import Path

    from .training.config import load_config
    from .training.runs import RunFolder
    from .training.train import run_training

    _check_out(args.out, "the run directory", "runs/<config name>")  # an unset $OUT: not the default run, which --force replaces
    if args.resume:
        if not args.out:
            parser.error("--resume needs --out, the run directory to continue")
        saved = RunFolder(args.out)
        if not saved.config_path.exists():
            raise FileNotFoundError(f"--resume: {args.out} has no {saved.config_path.name}; is it a run directory?")
        # the run's keys, then those the user gives: run_training refuses any of them that differ, but epochs
        config = load_config(args.config, args.overrides, base=saved.read_config().to_dict())
    else:
        if not args.config:
            parser.error("the config file is required (or --resume with --out)")
        config = load_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    run_training(config, out, resume=args.resume, force=args.force, threads=args.threads, progress=not args.no_progress,
                 log_every=args.log_every)
    print(f"run written to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
