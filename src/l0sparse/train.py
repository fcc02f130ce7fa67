"""The training loop behind the command, readable top to bottom."""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .costs import Penalty, expected_l0, gates
from .distributed import ProcessGroup
from .files import atomic_save, atomic_write_text

__all__ = ["configure_torch", "fit", "accuracy", "recalibrate_batchnorm", "ema", "run_training", "load_run"]


def configure_torch(threads: int | None = None) -> None:
    """Fix the thread count and flush denormals.

    Closed gates give exact-zero gradients, and Adam's moments then decay
    into denormal floats, which the CPU handles tens of times slower (the
    paper's code went from 5 s to 23 s an epoch). Flushing them to zero
    changes nothing measurable in training. A fixed thread count avoids
    OpenMP spin-waits against other processes on a shared machine.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def ema(model: nn.Module, decay: float = 0.999) -> torch.optim.swa_utils.AveragedModel:
    """Temporal averaging of every parameter, log α included (the paper's EMA of the parameters).

    A thin wrapper over PyTorch's own ``AveragedModel`` with
    ``get_ema_multi_avg_fn``: call ``averaged.update_parameters(model)``
    after each optimizer step and evaluate (or prune) ``averaged.module``.
    Buffers (BatchNorm statistics) are averaged too.
    """
    if not (isinstance(decay, float) and 0.0 < decay < 1.0):
        raise ValueError(f"decay must be a float in (0, 1), got {decay!r}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Recompute every BatchNorm's running statistics with the test-time gates.

    During training the gates are random, and BatchNorm's running mean and
    variance average over those samples; with the deterministic gates of
    eval mode the activations are distributed differently, and a CNN can
    fall to chance accuracy (measured: 12% before, 95.8% after on the
    digits CNN at 50% of the FLOPs). ``batches`` is an iterable of input
    batches (a few hundred examples suffice). Returns the model in eval mode.
    """
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
        norm.train()
    for batch in batches:
        model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Classification accuracy in eval mode (deterministic gates); restores the model's mode."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return correct / len(y)


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    lam: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train a classifier with Adam on ``mean cross-entropy + penalty / N``.

    ``lam`` and ``weight_decay`` follow :func:`l0sparse.penalty` (λ per
    weight, N = ``len(x)``); a model without gates gets plain weight decay
    through the optimizer instead. Returns one record per epoch.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)  # the gate noise and the batch order both come from here
    model_gates = gates(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0 if model_gates else weight_decay)
    n_train = len(x)
    l0_penalty = Penalty(model, lam, weight_decay, N=n_train) if model_gates else None
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        total_loss = 0.0
        for index in torch.randperm(n_train).split(batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            if l0_penalty is not None:
                loss = loss + l0_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for gate in model_gates:
                gate.clamp_()
            total_loss += float(loss.detach()) * len(index)
        record = {"epoch": epoch + 1, "loss": total_loss / n_train}
        if model_gates:
            record["expected_l0"] = float(expected_l0(model).detach())
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
    return history


# ---------------------------------------------------------------------------
# The configured run behind `l0sparse train`: read top to bottom.
# ---------------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def model_for(config, data) -> nn.Module:
    from .models import build_model
    from .sparsify import sparsify

    gated = config.regularizer == "l0"
    if gated and config.gates == "weights":  # the plain model with one gate per weight, through sparsify
        model = build_model(config.model, data.num_features, data.num_classes, hidden=config.hidden, gated=False)
        return sparsify(model, rules={nn.Linear: "weight", nn.Conv2d: "weight"}, droprate_init=config.droprate_init)
    return build_model(config.model, data.num_features, data.num_classes, hidden=config.hidden, gated=gated,
                       droprate_init=config.droprate_init, per_example_noise=config.per_example_noise,
                       conditional=config.conditional)


def _optimizer_for(model: nn.Module, config) -> torch.optim.Optimizer:
    # log α gets its own learning rate: with the weights' 1e-3 a controller's multipliers outrun the gates
    gate_parameters = [g.log_alpha for g in gates(model)]
    gate_ids = {id(p) for p in gate_parameters}
    groups = [{"params": [p for p in model.parameters() if id(p) not in gate_ids], "lr": config.lr}]
    if gate_parameters:
        groups.append({"params": gate_parameters, "lr": config.gate_lr})
    return torch.optim.Adam(groups, weight_decay=0.0 if gate_parameters else config.weight_decay)


class _SigtermToInterrupt:
    """Turn SIGTERM into KeyboardInterrupt while training, so both end at a clean checkpoint boundary."""

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
        return self

    @staticmethod
    def _handle(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.previous)
        return False


def run_training(config, out_dir, resume: bool = False, force: bool = False, threads: int | None = 1,
                 progress: bool = True, on_epoch_end=None) -> list[dict]:
    """Train as ``config`` says, writing ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` to ``out_dir``.

    The checkpoint is written atomically after every epoch with the model,
    the optimizer, the controller, the epoch and the RNG state, so that
    ``resume=True`` continues the exact run: the same trajectory as an
    uninterrupted run with the same seed. An existing run directory is
    never overwritten without ``force``. SIGINT and SIGTERM stop the run
    with its last complete checkpoint in place.

    Launched by ``torchrun`` (WORLD_SIZE > 1) it trains with
    DistributedDataParallel over gloo: each rank takes a disjoint share of
    every epoch in batches of ``batch_size`` (so a step sees world_size ×
    batch_size examples), draws its gate noise from ``seed + rank``, and
    rank 0 alone writes the run directory (docs/scale.md).
    """
    with ProcessGroup() as group:
        return _run_training(config, out_dir, resume, force, threads, progress, on_epoch_end, group)


def _run_training(config, out_dir, resume, force, threads, progress, on_epoch_end, group: ProcessGroup) -> list[dict]:
    from .baselines import magnitude_prune
    from .config import TrainConfig
    from .control import TargetController
    from .norms import lk_penalty, sparsity, threshold_
    from .costs import CostModel, count_flops, count_params
    from .data import load_dataset
    from .prune import plain_copy

    out_dir = Path(out_dir)
    checkpoint_path, metrics_path = out_dir / CHECKPOINT, out_dir / METRICS_FILE
    if resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {out_dir}")
        saved = json.loads((out_dir / CONFIG_FILE).read_text())
        config = TrainConfig(**{**saved, "epochs": config.epochs if config is not None else saved["epochs"]}).validate()
    elif out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"run directory {out_dir} exists and is not empty: pass --force to overwrite it or --resume to continue it")
    if config.regularizer == "magnitude" and group.world_size > 1:
        raise ValueError("config key 'regularizer' = 'magnitude': the baseline does not run distributed (it restructures the model mid-run)")
    group.barrier()  # every rank has checked the directory before rank 0 changes it
    if group.is_main:
        if not resume:
            for name in (CHECKPOINT, METRICS_FILE, CONFIG_FILE):
                (out_dir / name).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
    configure_torch(threads)

    # data, model, optimizer, and the size controller if a target is set
    data = load_dataset(config.data)
    torch.manual_seed(config.seed)
    model = model_for(config, data)
    example = data.x_train[:2]
    gated = config.regularizer == "l0"
    optimizer = _optimizer_for(model, config)
    n_train = len(data.x_train)
    # under DDP each rank takes an equal, disjoint share of the epoch: the remainder of n / world_size is left out
    per_rank = n_train // group.world_size
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    forward = model
    if group.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model)  # broadcasts rank 0's weights; averages gradients each step
    controller = None
    if gated and config.target is not None:
        controller = TargetController(model, config.target, config.metric, example_inputs=example,
                                      warmup_steps=int(config.warmup * config.epochs * steps_per_epoch), lr=config.controller_lr)
    cost_model = CostModel(model, example) if gated else None
    dense = plain_copy(model)
    dense_flops, dense_params = count_flops(dense, example), count_params(dense)

    magnitude = config.regularizer == "magnitude"
    lk_regularized = config.regularizer in ("l1", "group_l1", "l2")
    thresholded = config.regularizer in ("l1", "group_l1")
    total_epochs = 2 * config.epochs if magnitude else config.epochs  # the baseline fine-tunes as long as it trained
    flops_kept = 1.0
    start_epoch, history = 0, []
    if resume:
        state = torch.load(checkpoint_path, weights_only=True)
        if magnitude and state["epoch"] >= config.epochs:
            flops_kept = magnitude_prune(model, config.target, example)  # the masks' structure; their values load below
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if controller is not None:
            controller.load_state_dict(state["controller"])
        rng_per_rank = state.get("rng_per_rank", [state["rng"]])
        if len(rng_per_rank) != group.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {len(rng_per_rank)} process(es); resume it with as many, not {group.world_size}")
        torch.set_rng_state(rng_per_rank[group.rank])
        start_epoch = state["epoch"]
        history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()][:start_epoch]
        group.barrier()  # every rank has read the metrics before rank 0 trims them
        if group.is_main:
            atomic_write_text("".join(json.dumps(r) + "\n" for r in history), metrics_path)  # drop lines past the checkpoint
    else:
        if group.is_main:
            atomic_write_text(json.dumps(config.to_dict(), indent=1), out_dir / CONFIG_FILE)
        if group.world_size > 1:
            torch.manual_seed(config.seed + group.rank)  # the same initial model everywhere, then each rank its own noise

    from tqdm.auto import tqdm

    l0_penalty = Penalty(model, config.lam, config.weight_decay, N=n_train) if gated and controller is None else None
    with _SigtermToInterrupt():
        try:
            for epoch in range(start_epoch, total_epochs):
                if magnitude and epoch == config.epochs:
                    flops_kept = magnitude_prune(model, config.target, example)
                started = time.perf_counter()
                model.train()
                total_loss, correct = 0.0, 0
                if group.world_size == 1:
                    order = torch.randperm(n_train)
                else:  # one permutation on every rank (its own generator), each rank its slice of it
                    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
                    order = order[group.rank:per_rank * group.world_size:group.world_size]
                bar = tqdm(order.split(config.batch_size), desc=f"epoch {epoch + 1}/{total_epochs}",
                           disable=not (progress and group.is_main), leave=False)
                for index in bar:
                    x, y = data.x_train[index], data.y_train[index]
                    logits = forward(x)
                    loss = F.cross_entropy(logits, y)
                    if controller is not None:
                        loss = loss + controller.penalty()
                    elif gated:
                        loss = loss + l0_penalty()
                    elif lk_regularized:
                        loss = loss + lk_penalty(model, config.regularizer, config.lam, N=n_train)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if controller is not None:
                        controller.step()
                    total_loss += float(loss.detach()) * len(index)
                    correct += int((logits.argmax(-1) == y).sum())
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                total_loss, correct, seen = group.sum([total_loss, correct, len(order)])
                record = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
                          "test_accuracy": accuracy(model, data.x_test, data.y_test), "seconds": time.perf_counter() - started}
                if group.world_size > 1:  # the ranks compare their gates and multipliers, which DDP should keep equal
                    state = ([g.log_alpha.detach().flatten().tolist() for g in gates(model)],
                             None if controller is None else [float(controller.lambda_1.detach()), float(controller.lambda_2.detach())])
                    everyone = group.gather(state)
                    record.update({"world_size": group.world_size, "steps": len(bar), "examples": int(seen),
                                   "gates_identical_on_ranks": all(other[0] == state[0] for other in everyone)})
                    if controller is not None:
                        record["multipliers_identical_on_ranks"] = all(other[1] == state[1] for other in everyone)
                if gated:
                    with torch.no_grad():
                        expected = cost_model.costs()
                        kept = cost_model.costs(deterministic=True)
                    record.update({"expected_l0": float(expected_l0(model).detach()),
                                   "expected_flops_kept": float(expected["flops"]) / dense_flops,
                                   "flops_kept": float(kept["flops"]) / dense_flops, "params_kept": float(kept["params"]) / dense_params})
                    if controller is not None:
                        record.update({"lambda_1": float(controller.lambda_1.detach()), "lambda_2": float(controller.lambda_2.detach()),
                                       "target_now": controller.current_target()})
                elif magnitude:
                    record["flops_kept"] = flops_kept
                elif thresholded:  # measured on a thresholded copy: the checkpoint keeps the exact weights
                    record.update(sparsity(threshold_(copy.deepcopy(model), config.regularizer, config.threshold_value)))
                elif lk_regularized:
                    record.update(sparsity(model))
                rng_per_rank = group.gather(torch.get_rng_state())
                # the metrics line first, then the checkpoint: a resumed run trims lines past its checkpoint
                if group.is_main:
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "controller": None if controller is None else controller.state_dict(),
                                 "epoch": epoch + 1, "rng": rng_per_rank[0], "config": config.to_dict(),
                                 **({"rng_per_rank": rng_per_rank} if group.world_size > 1 else {})}, checkpoint_path)
                history.append(record)
                if progress and group.is_main:
                    shown = {k: round(v, 4) for k, v in record.items() if k in ("train_loss", "test_accuracy", "expected_l0", "flops_kept")}
                    tqdm.write(f"epoch {epoch + 1}/{total_epochs} " + " ".join(f"{k}={v}" for k, v in shown.items()))
                if on_epoch_end is not None:
                    on_epoch_end(record)
        except KeyboardInterrupt:
            done = history[-1]["epoch"] if history else 0
            print(f"interrupted: {checkpoint_path} holds epoch {done}; continue with --resume", file=sys.stderr)
            raise
    return history


def load_run(run_dir) -> tuple:
    """(config, model with the checkpoint's weights in eval mode, dataset) of a run directory."""
    from .config import TrainConfig
    from .data import load_dataset

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no {CHECKPOINT}")
    config = TrainConfig(**json.loads((run_dir / CONFIG_FILE).read_text())).validate()
    data = load_dataset(config.data)
    model = model_for(config, data)
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    if config.regularizer == "magnitude" and state["epoch"] >= config.epochs:
        from .baselines import magnitude_prune

        magnitude_prune(model, config.target, data.x_train[:2])  # the masks' structure; their values load below
    model.load_state_dict(state["model"])
    if config.regularizer in ("l1", "group_l1"):
        from .norms import threshold_

        threshold_(model, config.regularizer, config.threshold_value)  # the usual last step of an L1 run
    return config, model.eval(), data


PRUNED_WEIGHTS = "pruned.pt"
PRUNED_SPEC = "pruned.json"


def prune_run(run_dir, force: bool = False, round_to: int = 1) -> tuple[nn.Module, str]:
    """Prune a run's checkpoint; write ``pruned.pt`` (state_dict) and ``pruned.json`` (plan and architecture).

    ``round_to`` is :func:`l0sparse.prune`'s: kept counts rounded up to a multiple of it.

    Returns the pruned module and its summary table. Load it back with
    :func:`load_pruned`, which uses ``torch.load(..., weights_only=True)``.
    """
    from .prune import prune
    from .report import architecture, summary

    run_dir = Path(run_dir)
    if (run_dir / PRUNED_WEIGHTS).exists() and not force:
        raise FileExistsError(f"{run_dir / PRUNED_WEIGHTS} exists: pass --force to overwrite it")
    config, model, data = load_run(run_dir)
    example = data.x_train[:2]
    pruned, plan = prune(model, example, return_plan=True, round_to=round_to)
    table = summary(model, example)
    spec = {"config": config.to_dict(), "plan": plan, "example_shape": list(example.shape[1:]), "num_classes": data.num_classes,
            "architecture": architecture(model), "summary": table.to_markdown()}
    atomic_save(pruned.state_dict(), run_dir / PRUNED_WEIGHTS)
    atomic_write_text(json.dumps(spec, indent=1), run_dir / PRUNED_SPEC)
    return pruned, str(table)


def load_pruned(run_dir) -> nn.Module:
    """The pruned model of a run, rebuilt from ``pruned.json`` and loaded with ``weights_only=True``."""
    from .config import TrainConfig
    from .models import build_model
    from .prune import rebuild

    run_dir = Path(run_dir)
    spec = json.loads((run_dir / PRUNED_SPEC).read_text())
    config = TrainConfig(**spec["config"]).validate()
    example = torch.zeros(2, *spec["example_shape"])
    fresh = build_model(config.model, int(math.prod(spec["example_shape"])), spec["num_classes"], hidden=config.hidden,
                        gated=config.regularizer == "l0")
    module = rebuild(fresh, spec["plan"], example)
    module.load_state_dict(torch.load(run_dir / PRUNED_WEIGHTS, weights_only=True))
    return module.eval()
