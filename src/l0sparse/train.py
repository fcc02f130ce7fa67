"""The training loop behind the command, readable top to bottom."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .control import param_groups
from .costs import Penalty, expected_l0, gates
from .distributed import ProcessGroup
from .files import atomic_save, atomic_write_text, read_json, torch_load

__all__ = ["configure_torch", "fit", "accuracy", "recalibrate_batchnorm", "ema", "run_training", "load_run", "TrainingDiverged",
           "read_metrics"]


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
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024, pad_id: int | None = None) -> float:
    """Classification accuracy in eval mode (deterministic gates); restores the model's mode.

    ``pad_id``: ``x`` holds token ids padded with it, computed in batches of similar length without their padding.
    """
    if pad_id is not None:
        from .hf import predict_logits

        return float((predict_logits(model, x, pad_id, batch_size=batch_size).argmax(-1) == y).float().mean())
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return correct / len(y)


def distillation_loss(logits: Tensor, targets: Tensor, teacher_logits: Tensor, weight: float, temperature: float) -> Tensor:
    """``weight`` · T² · KL(teacher ‖ student), both softened by T, plus (1 − ``weight``) · cross-entropy (Hinton et al., 2015).

    T² keeps the soft term's gradients on the scale of the hard one's as T changes.
    """
    soft = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                    log_target=True, reduction="batchmean")
    return weight * temperature ** 2 * soft + (1 - weight) * F.cross_entropy(logits, targets)


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
        for step, index in enumerate(torch.randperm(n_train).split(batch_size), 1):
            loss = F.cross_entropy(model(x[index]), y[index])
            if l0_penalty is not None:
                loss = loss + l0_penalty()
            if not math.isfinite(float(loss.detach())):
                raise TrainingDiverged(f"{desc}: the loss is {float(loss.detach())} at epoch {epoch + 1}, step {step}: lower lr and train again")
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
PRUNED_WEIGHTS = "pruned.pt"
PRUNED_SPEC = "pruned.json"
REPORT_DIR = "report"
#: What `train --force` replaces in a run directory: the run's own files and what `prune` and `report` derived from them.
TEACHER_LOGITS = "teacher_logits.pt"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT, TEACHER_LOGITS, PRUNED_WEIGHTS, PRUNED_SPEC, REPORT_DIR)
#: A new run writes here, inside the run directory, until its first checkpoint; then it takes the old run's place.
STAGING_DIR = ".l0sparse-new"
REPLACED_DIR = ".l0sparse-old"


#: How many training examples score the importance baseline's heads (Michel et al. use a few thousand).
IMPORTANCE_EXAMPLES = 2048


def _batch_inputs(x: Tensor, pad_id: int | None) -> Tensor:
    """A batch as the model gets it: token ids without their columns of padding only (the same outputs, less compute)."""
    if pad_id is None:
        return x
    from .hf import trim_padding

    return trim_padding(x, pad_id)


class TrainingDiverged(FloatingPointError):
    """The loss or the weights became NaN or infinite: training stopped, and the last good checkpoint was kept."""


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a partial last line (a write cut short by kill -9 or a full disk) is dropped."""
    path = Path(path)
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and "epoch" in record):
            if number == len(lines):
                break  # the tail of an interrupted write: the checkpoint never counted it
            raise ValueError(f"{path} line {number} is not a metrics record: the file is damaged; delete that line and try again")
        records.append(record)
    return records


def check_run_directory(out_dir: Path) -> None:
    """Fail at once, before any data is loaded, if ``out_dir`` cannot hold a run: a file, or a folder this user cannot write."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"run directory {out_dir}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {out_dir}: {existing} is not writable by this user; choose another --out")


class _RunDirectory:
    """Where a new run writes: a staging folder inside ``out_dir`` until its first checkpoint, then ``out_dir`` itself.

    Until that checkpoint an older run in ``out_dir`` (replaced under ``force``) stays whole, and a
    failed set-up or a first epoch that diverges leaves nothing behind. Only the main process writes.
    """

    def __init__(self, out_dir: Path, staged: bool, writes: bool, committed: bool = False):
        self.out_dir, self.staged, self.writes, self.committed = out_dir, staged, writes, committed
        self.path = out_dir / STAGING_DIR if staged else out_dir
        self.created = not out_dir.exists()

    def open(self) -> None:
        if not self.writes:
            return
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)  # left by a run killed before its first checkpoint: nothing in it counts
        self.path.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        """After the first checkpoint: move the old run's files aside, the new ones in, then delete the old ones."""
        if self.committed:
            return
        self.committed = True
        if self.writes and self.staged:
            aside = self.out_dir / REPLACED_DIR
            shutil.rmtree(aside, ignore_errors=True)
            aside.mkdir()
            for name in RUN_FILES:
                if (self.out_dir / name).exists():
                    os.replace(self.out_dir / name, aside / name)
            for child in self.path.iterdir():
                os.replace(child, self.out_dir / child.name)
            self.path.rmdir()
            shutil.rmtree(aside)
        self.path = self.out_dir

    def abandon(self) -> None:
        """Before the first checkpoint: remove what the new run wrote (the folder was empty or new, or this is the staging one)."""
        if self.committed or not self.writes:
            return
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in (CONFIG_FILE, METRICS_FILE):
            (self.out_dir / name).unlink(missing_ok=True)
        if self.created and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()


def _resumed_config(saved, requested, done_epochs: int):
    """The run's saved config, with ``epochs`` from ``requested``: any other difference is refused, as it would not apply."""
    if requested is None:
        return saved
    before, after = saved.to_dict(), requested.to_dict()
    differing = [key for key in after if after[key] != before[key] and key != "epochs"]
    if differing:
        changes = ", ".join(f"{key} ({before[key]!r} -> {after[key]!r})" for key in differing)
        raise ValueError(f"--resume continues the run as its {CONFIG_FILE} says, but these keys differ: {changes}; "
                         "only epochs may change on --resume (start a new run for a different config)")
    if requested.epochs == saved.epochs:
        return saved
    if saved.regularizer == "magnitude" and done_epochs >= min(saved.epochs, requested.epochs):
        raise ValueError(f"config key 'epochs': this magnitude run prunes after epoch {saved.epochs} and its checkpoint holds epoch "
                         f"{done_epochs}, so epochs cannot change now; start a new run to train it longer")
    total = 2 * requested.epochs if saved.regularizer == "magnitude" else requested.epochs
    if total < done_epochs:
        raise ValueError(f"config key 'epochs' = {requested.epochs}: the checkpoint already holds epoch {done_epochs}; "
                         "give at least that many")
    return requested


def _non_finite_entry(model: nn.Module) -> str | None:
    """The name of the first weight or buffer holding NaN or inf, or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _load_state(model: nn.Module, state, path: Path, described_by: str = CONFIG_FILE) -> None:
    """``model.load_state_dict(state)``; a mismatch names the file and the description it should fit."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:  # wrong keys or shapes; not a dict at all
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{path} does not fit the model that {described_by} describes ({first}); was either edited? "
                         "restore them, or train again") from None


def load_checkpoint(path) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``; a damaged or foreign file gives one clear error."""
    path = Path(path)
    state = torch_load(path)
    if not (isinstance(state, dict) and {"model", "epoch"} <= set(state)):
        raise ValueError(f"{path} is not an l0sparse training checkpoint (no model and epoch in it); delete it and train again")
    return state


def load_teacher(config, data=None) -> nn.Module:
    """The plain model of the finished run that ``config.teacher`` names, checked to fit ``config``; in eval mode.

    ``data``: the dataset, if already loaded (it is the teacher's too).
    """
    teacher_dir = Path(config.teacher)
    if not (teacher_dir / CHECKPOINT).exists():
        raise FileNotFoundError(f"config key 'teacher' = {config.teacher!r}: no {CHECKPOINT} there; train the teacher first "
                                f"(a run with regularizer = 'none' of the same model and data)")
    teacher_config, teacher, _ = load_run(teacher_dir, data=data)
    done = load_checkpoint(teacher_dir / CHECKPOINT)["epoch"]
    if done < teacher_config.epochs:
        raise ValueError(f"config key 'teacher' = {config.teacher!r}: that run holds epoch {done} of {teacher_config.epochs}; "
                         f"finish it first (l0sparse train --resume ... --out {teacher_dir})")
    if (teacher_config.model, teacher_config.data, teacher_config.regularizer) != (config.model, config.data, "none"):
        raise ValueError(f"config key 'teacher' = {config.teacher!r}: that run is model {teacher_config.model!r}, data "
                         f"{teacher_config.data!r}, regularizer {teacher_config.regularizer!r}; a teacher is a dense run "
                         f"(regularizer = 'none') of model {config.model!r} on data {config.data!r}")
    return teacher


def model_for(config, data, initial: nn.Module | None = None) -> nn.Module:
    """The model ``config`` describes, gated as its regularizer needs; ``initial``: a plain model to start from (copied)."""
    from .models import build_model
    from .sparsify import sparsify

    from .gates import PAPER_LOG_ALPHA_RANGE

    gated = config.regularizer == "l0"
    clamp = PAPER_LOG_ALPHA_RANGE if config.clamp_log_alpha else None
    if config.model == "minilm":  # pretrained: gated by heads and feed-forward units, or dense
        from .hf import encoder_rules

        model = copy.deepcopy(initial) if initial is not None else build_model(config.model, 0, data.num_classes)
        if gated or config.regularizer == "importance":
            with warnings.catch_warnings():  # the embeddings, q/k/v and the classifier are meant to have no gate of their own
                warnings.filterwarnings("ignore", message="sparsify: .*(skipped by rule|no rule supports it)")
                model = sparsify(model, rules=encoder_rules(model), example_inputs=data.x_train[:2],
                                 droprate_init=config.droprate_init, clamp_log_alpha=clamp)
        if config.regularizer == "importance":  # the baseline's gates are set once, by importance, and never trained
            for gate in gates(model):
                gate.log_alpha.requires_grad_(False)
        return model
    if gated and config.gates == "weights":  # the plain model with one gate per weight, through sparsify
        model = build_model(config.model, data.num_features, data.num_classes, hidden=config.hidden, gated=False)
        model = sparsify(model, rules={nn.Linear: "weight", nn.Conv2d: "weight"}, droprate_init=config.droprate_init,
                         clamp_log_alpha=clamp)
    else:
        rates = config.droprate_init if isinstance(config.droprate_init, list) else None
        model = build_model(config.model, data.num_features, data.num_classes, hidden=config.hidden, gated=gated,
                            droprate_init=0.5 if rates else config.droprate_init, per_example_noise=config.per_example_noise,
                            conditional=config.conditional, clamp_log_alpha=clamp)
        if rates:
            layer_gates = gates(model)
            if len(rates) != len(layer_gates):
                raise ValueError(f"config key 'droprate_init' lists {len(rates)} rates; the {config.model} has {len(layer_gates)} gated layers")
            for gate, rate in zip(layer_gates, rates):
                gate.droprate_init = float(rate)
                gate.reset_parameters()
    if config.init == "paper":
        paper_init_(model)
    return model


@torch.no_grad()
def paper_init_(model: nn.Module) -> nn.Module:
    """The paper's code's initialisation: Kaiming-normal weights over the fan-in (std √(2 / fan_in)), zero biases."""
    from .sparsify import gate_masks

    parametrized = {id(module) for _, module, _, _ in gate_masks(model)}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2:  # norms' weights are vectors: left as they are
            continue
        if id(module) in parametrized:
            weight = module.parametrizations.weight.original
        nn.init.kaiming_normal_(weight, nonlinearity="relu")  # fan_in mode: std √(2 / fan_in)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    return model


def _optimizer_for(model: nn.Module, config) -> torch.optim.Optimizer:
    # an L0 model's L2 is in its penalty, under the gates (the paper's); any other one's in the optimizer
    weight_decay = 0.0 if config.regularizer == "l0" else config.weight_decay
    return torch.optim.Adam(param_groups(model, lr=config.lr, gate_lr=config.gate_lr, weight_decay=weight_decay))


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
    from .config import read_config_json

    out_dir = Path(out_dir)
    state = None
    if resume:
        if not (out_dir / CHECKPOINT).exists():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out_dir}; is it a run directory?")
        saved = read_config_json(out_dir / CONFIG_FILE)
        state = load_checkpoint(out_dir / CHECKPOINT)
        config = _resumed_config(saved, config, state["epoch"])
        if config.epochs != saved.epochs and group.is_main:
            print(f"resuming with epochs = {config.epochs} ({CONFIG_FILE} said {saved.epochs}); {CONFIG_FILE} updated", file=sys.stderr)
        run_dir = _RunDirectory(out_dir, staged=False, writes=group.is_main, committed=True)
    else:
        check_run_directory(out_dir)
        replacing = out_dir.is_dir() and any(out_dir.iterdir())
        if replacing and not force:
            raise FileExistsError(f"run directory {out_dir} exists and is not empty: pass --force to overwrite it or --resume to continue it")
        run_dir = _RunDirectory(out_dir, staged=replacing, writes=group.is_main)
    if config.regularizer == "magnitude" and group.world_size > 1:
        raise ValueError("config key 'regularizer' = 'magnitude': the baseline does not run distributed (it restructures the model mid-run)")
    group.barrier()  # every rank has checked the directory before rank 0 changes it
    try:
        run_dir.open()
        return _train_into(run_dir, config, state, threads, progress, on_epoch_end, group)
    except BaseException:
        run_dir.abandon()  # a no-op once the first checkpoint is in place
        raise


def _train_into(run_dir: _RunDirectory, config, state: dict | None, threads, progress, on_epoch_end, group: ProcessGroup) -> list[dict]:
    from .baselines import magnitude_prune
    from .control import TargetController
    from .costs import CostModel, count_flops, count_params
    from .data import load_dataset
    from .norms import lk_penalty, sparsity, threshold_
    from .prune import plain_copy

    resume = state is not None
    configure_torch(threads)

    # data, model (from the teacher's weights, if one is named), optimizer, and the size controller if a target is set
    data = load_dataset(config.data).subset(config.train_examples, config.test_examples)
    teacher = load_teacher(config, data) if config.teacher is not None and not resume else None
    torch.manual_seed(config.seed)
    model = model_for(config, data, initial=teacher)
    example = data.x_train[:2]
    gated = config.regularizer == "l0"
    importance = config.regularizer == "importance"
    pad_id = data.pad_id
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
                                      warmup_steps=int(config.warmup * config.epochs * steps_per_epoch), lr=config.controller_lr,
                                      ceiling=config.target_mode == "ceiling")
    model_gates = gates(model)
    # the paper's temporal average of every parameter (log α included): what is evaluated, recorded and pruned
    averaged = ema(model, config.ema) if config.ema > 0 else None
    evaluated = model if averaged is None else averaged.module
    cost_model = CostModel(evaluated, example) if gated or importance else None
    dense = plain_copy(model)
    dense_flops, dense_params = count_flops(dense, example), count_params(dense)

    magnitude = config.regularizer == "magnitude"
    lk_regularized = config.regularizer in ("l1", "group_l1", "l2")
    thresholded = config.regularizer in ("l1", "group_l1")
    total_epochs = 2 * config.epochs if magnitude else config.epochs  # the baseline fine-tunes as long as it trained
    flops_kept = 1.0
    start_epoch, history = 0, []
    checkpoint_path = run_dir.out_dir / CHECKPOINT
    if resume:
        if magnitude and state["epoch"] >= config.epochs:
            flops_kept = magnitude_prune(model, config.target, example)  # the masks' structure; their values load below
        _load_state(model, state["model"], checkpoint_path)
        if averaged is not None:
            _load_state(averaged, state["ema"], checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        if controller is not None:
            controller.load_state_dict(state["controller"])
        rng_per_rank = state.get("rng_per_rank", [state["rng"]])
        if len(rng_per_rank) != group.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {len(rng_per_rank)} process(es); resume it with as many, not {group.world_size}")
        torch.set_rng_state(rng_per_rank[group.rank])
        start_epoch = state["epoch"]
        metrics_path = run_dir.path / METRICS_FILE
        history = read_metrics(metrics_path)[:start_epoch] if metrics_path.exists() else []
        group.barrier()  # every rank has read the metrics before rank 0 trims them
        if group.is_main:  # drop lines past the checkpoint (and a partial last line); say what runs now
            atomic_write_text("".join(json.dumps(r) + "\n" for r in history), metrics_path)
            atomic_write_text(json.dumps(config.to_dict(), indent=1), run_dir.path / CONFIG_FILE)
    else:
        if group.is_main:
            atomic_write_text(json.dumps(config.to_dict(), indent=1), run_dir.path / CONFIG_FILE)
        if importance:  # the baseline's structure, chosen once from the starting weights; the checkpoint keeps it
            from .baselines import gate_importance, importance_prune_

            scoring = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed))[:IMPORTANCE_EXAMPLES]
            batches = [(_batch_inputs(data.x_train[index], pad_id), data.y_train[index]) for index in scoring.split(config.batch_size)]
            kept = importance_prune_(model, config.target, example, gate_importance(model, batches, F.cross_entropy))
            if group.is_main and progress:
                print(f"importance pruning keeps {100 * kept:.1f}% of the FLOPs (target {100 * config.target:.1f}%)", file=sys.stderr)
        if group.world_size > 1:
            torch.manual_seed(config.seed + group.rank)  # the same initial model everywhere, then each rank its own noise

    from tqdm.auto import tqdm

    def diverged(epoch: int, step: int | str, what: str) -> TrainingDiverged:
        done = history[-1]["epoch"] if history else start_epoch
        if done:
            kept = f"{checkpoint_path} keeps epoch {done}, the last good one"
        elif run_dir.staged:
            kept = f"no checkpoint was written, and the run that was in {run_dir.out_dir} is untouched"
        else:
            kept = "no checkpoint was written"
        return TrainingDiverged(f"training diverged at epoch {epoch}, step {step} of {steps_per_epoch}: {what}; {kept}; "
                                "start a new run with a lower lr or gate_lr")

    # the teacher's logits for every training example, once (it is fixed, and deterministic in eval mode), kept in the
    # run directory: a resumed run learns from the same numbers even if the teacher's run was changed since
    teacher_logits = None
    if config.teacher is not None:
        from .files import torch_load
        from .hf import predict_logits

        logits_path = run_dir.path / TEACHER_LOGITS
        if resume:
            if not logits_path.exists():
                raise FileNotFoundError(f"--resume: {logits_path} is missing (the teacher's logits this run learns from); start a new run")
            teacher_logits = torch_load(logits_path)
            if not (isinstance(teacher_logits, Tensor) and teacher_logits.shape == (n_train, data.num_classes)):
                raise ValueError(f"{logits_path} does not hold {n_train} × {data.num_classes} logits; start a new run")
        else:
            teacher_logits = predict_logits(teacher, data.x_train, pad_id)
            if group.is_main:
                atomic_save(teacher_logits, logits_path)
            del teacher

    # under a controller λ is its job (unless the target is only a ceiling); the L2 under the gates (weight_decay) still applies
    lam = config.lam if controller is None or controller.ceiling else 0.0
    l0_penalty = None
    if gated and (lam or config.weight_decay):
        l0_penalty = Penalty(model, lam, config.weight_decay, N=n_train)
    with _SigtermToInterrupt():
        try:
            for epoch in range(start_epoch, total_epochs):
                if magnitude and epoch == config.epochs:
                    flops_kept = magnitude_prune(model, config.target, example)
                started = time.perf_counter()
                model.train()
                total_loss, correct, first_bad_step = 0.0, 0, None
                if group.world_size == 1:
                    order = torch.randperm(n_train)
                else:  # one permutation on every rank (its own generator), each rank its slice of it
                    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
                    order = order[group.rank:per_rank * group.world_size:group.world_size]
                bar = tqdm(order.split(config.batch_size), desc=f"epoch {epoch + 1}/{total_epochs}",
                           disable=not (progress and group.is_main), leave=False)
                for step, index in enumerate(bar, 1):
                    x, y = _batch_inputs(data.x_train[index], pad_id), data.y_train[index]
                    logits = forward(x)
                    if teacher_logits is None:
                        loss = F.cross_entropy(logits, y)
                    else:
                        loss = distillation_loss(logits, y, teacher_logits[index], config.distill_weight, config.temperature)
                    if controller is not None:
                        loss = loss + controller.penalty()
                    if l0_penalty is not None:
                        loss = loss + l0_penalty()
                    if lk_regularized:
                        loss = loss + lk_penalty(model, config.regularizer, config.lam, N=n_train)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        if group.world_size == 1:  # stop before the step spreads it into the weights
                            raise diverged(epoch + 1, step, f"the loss is {loss_value}")
                        # under DDP every rank must reach the gradient all-reduce: the epoch-end check stops them together
                        first_bad_step = first_bad_step or step
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    for gate in model_gates:  # the paper's clamp of log α, where the config asks for it
                        gate.clamp_()
                    if controller is not None:
                        controller.step()
                    if averaged is not None:
                        averaged.update_parameters(model)
                    total_loss += loss_value * len(index)
                    correct += int((logits.argmax(-1) == y).sum())
                    bar.set_postfix(loss=f"{loss_value:.3f}")
                total_loss, correct, seen = group.sum([total_loss, correct, len(order)])
                if not math.isfinite(total_loss):
                    raise diverged(epoch + 1, first_bad_step or "unknown (on another process)", "the loss is not finite")
                bad_entry = _non_finite_entry(model)
                if bad_entry is not None:  # the last step of the epoch can break the weights with a finite loss
                    raise diverged(epoch + 1, len(bar), f"{bad_entry} holds NaN or inf after the optimizer step")
                record = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
                          "test_accuracy": accuracy(evaluated, data.x_test, data.y_test, pad_id=pad_id),
                          "seconds": time.perf_counter() - started}
                if averaged is not None:
                    record["test_accuracy_without_ema"] = accuracy(model, data.x_test, data.y_test, pad_id=pad_id)
                if group.world_size > 1:  # the ranks compare their gates and multipliers, which DDP should keep equal
                    ranks_state = ([g.log_alpha.detach().flatten().tolist() for g in gates(model)],
                                   None if controller is None else [float(controller.lambda_1.detach()), float(controller.lambda_2.detach())])
                    everyone = group.gather(ranks_state)
                    record.update({"world_size": group.world_size, "steps": len(bar), "examples": int(seen),
                                   "gates_identical_on_ranks": all(other[0] == ranks_state[0] for other in everyone)})
                    if controller is not None:
                        record["multipliers_identical_on_ranks"] = all(other[1] == ranks_state[1] for other in everyone)
                if cost_model is not None:  # what prune would leave (L0, or the importance baseline's fixed gates)
                    with torch.no_grad():
                        kept = cost_model.costs(deterministic=True)
                    record.update({"flops_kept": float(kept["flops"]) / dense_flops, "params_kept": float(kept["params"]) / dense_params})
                if gated:
                    with torch.no_grad():
                        expected = cost_model.costs()
                    record.update({"expected_l0": float(expected_l0(evaluated).detach()),
                                   "expected_flops_kept": float(expected["flops"]) / dense_flops})
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
                # the metrics first, then the checkpoint: a resumed run trims lines past its checkpoint; the whole
                # file is rewritten atomically, so a kill leaves no partial line
                if group.is_main:
                    atomic_write_text("".join(json.dumps(r) + "\n" for r in [*history, record]), run_dir.path / METRICS_FILE)
                    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 **({"ema": averaged.state_dict()} if averaged is not None else {}),
                                 "controller": None if controller is None else controller.state_dict(),
                                 "epoch": epoch + 1, "rng": rng_per_rank[0], "config": config.to_dict(),
                                 **({"rng_per_rank": rng_per_rank} if group.world_size > 1 else {})}, run_dir.path / CHECKPOINT)
                run_dir.commit()  # the first checkpoint is in place: the new run takes the old one's place
                history.append(record)
                if progress and group.is_main:
                    shown = {k: round(v, 4) for k, v in record.items() if k in ("train_loss", "test_accuracy", "expected_l0", "flops_kept")}
                    tqdm.write(f"epoch {epoch + 1}/{total_epochs} " + " ".join(f"{k}={v}" for k, v in shown.items()))
                if on_epoch_end is not None:
                    on_epoch_end(record)
        except KeyboardInterrupt:
            done = history[-1]["epoch"] if history else start_epoch
            if done or resume:
                print(f"interrupted: {checkpoint_path} holds epoch {done}; continue with --resume", file=sys.stderr)
            else:
                print("interrupted before the first checkpoint: nothing of this run was kept", file=sys.stderr)
            raise
    return history


def load_run(run_dir, data=None) -> tuple:
    """(config, model with the checkpoint's weights in eval mode, dataset) of a run directory.

    ``data``: the run's dataset, if already loaded (it is not loaded again).
    """
    from .config import read_config_json
    from .data import load_dataset

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no {CHECKPOINT}")
    config = read_config_json(run_dir / CONFIG_FILE)
    state = load_checkpoint(run_dir / CHECKPOINT)
    if data is None:
        data = load_dataset(config.data).subset(config.train_examples, config.test_examples)
    model = model_for(config, data)
    if config.regularizer == "magnitude" and state["epoch"] >= config.epochs:
        from .baselines import magnitude_prune

        magnitude_prune(model, config.target, data.x_train[:2])  # the masks' structure; their values load below
    _load_state(model, state["model"], run_dir / CHECKPOINT)
    if config.ema > 0:  # the moving average is the model this run evaluated: it is the one to prune
        averaged = ema(model, config.ema)
        _load_state(averaged, state["ema"], run_dir / CHECKPOINT)
        model = averaged.module
    if config.regularizer in ("l1", "group_l1"):
        from .norms import threshold_

        threshold_(model, config.regularizer, config.threshold_value)  # the usual last step of an L1 run
    return config, model.eval(), data


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
    spec = {"config": config.to_dict(), "plan": plan, "example_shape": list(example.shape[1:]),
            "example_dtype": str(example.dtype).removeprefix("torch."), "num_classes": data.num_classes,
            "architecture": architecture(model), "summary": table.to_markdown()}
    atomic_save(pruned.state_dict(), run_dir / PRUNED_WEIGHTS)
    atomic_write_text(json.dumps(spec, indent=1), run_dir / PRUNED_SPEC)
    return pruned, str(table)


#: the example inputs' dtypes a pruned.json may name: images and features, or token ids
_EXAMPLE_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def load_pruned(run_dir) -> nn.Module:
    """The pruned model of a run, rebuilt from ``pruned.json`` and loaded with ``weights_only=True``."""
    from .config import config_from_dict
    from .models import build_model
    from .prune import rebuild

    run_dir = Path(run_dir)
    if not (run_dir / PRUNED_SPEC).exists():
        raise FileNotFoundError(f"{run_dir} has no {PRUNED_SPEC}: run `l0sparse prune {run_dir}` first")
    spec = read_json(run_dir / PRUNED_SPEC)
    config = config_from_dict(spec.get("config") if isinstance(spec, dict) else None, source=run_dir / PRUNED_SPEC)
    shape, dtype = spec.get("example_shape"), _EXAMPLE_DTYPES.get(spec.get("example_dtype", "float32"))
    if dtype is None or not (isinstance(shape, list) and all(isinstance(size, int) and size > 0 for size in shape)):
        raise ValueError(f"{run_dir / PRUNED_SPEC}: 'example_shape' must be a list of positive ints and 'example_dtype' one of "
                         f"{sorted(_EXAMPLE_DTYPES)}; was it edited? run `l0sparse prune --force {run_dir}` again")
    example = torch.zeros(2, *shape, dtype=dtype)
    fresh = build_model(config.model, int(math.prod(spec["example_shape"])), spec["num_classes"], hidden=config.hidden,
                        gated=config.regularizer == "l0")
    module = rebuild(fresh, spec["plan"], example)
    _load_state(module, torch_load(run_dir / PRUNED_WEIGHTS), run_dir / PRUNED_WEIGHTS, described_by=PRUNED_SPEC)
    return module.eval()
