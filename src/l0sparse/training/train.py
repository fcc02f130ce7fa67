"""Training: one loop, read top to bottom, behind the demo (:func:`fit`) and the command (:func:`run_training`).

Every step of either is :func:`train_epoch`'s: the task loss, plus the run's
regularizer's terms (:mod:`l0sparse.training.regularizers`), one optimizer step, the
regularizer's action after it, and the moving average. :func:`run_training`
adds what a long run needs around it: the run folder (:mod:`l0sparse.training.runs`),
a checkpoint per epoch, resume, DDP, distillation and clean stops.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .build import ema, model_for
from ..core.control import param_groups
from ..core.sites import find_gates
from .distributed import RankGroup
from .regularizers import L0, Regularizer, regularizer_for
from .runs import (CHECKPOINT, CONFIG_FILE, RunFolder, StagedRunFolder, accuracy, check_replaceable, check_resumable, check_run_directory, load_state,
                   reconcile_history)

if TYPE_CHECKING:
    from ..hf.distill import LayerDistillation
    from .config import TrainConfig
    from .data import Split

__all__ = ["configure_torch", "fit", "train_epoch", "recalibrate_batchnorm", "run_training", "load_teacher", "TrainingDiverged"]

#: How many training examples score the importance baseline's heads (Michel et al. use a few thousand).
IMPORTANCE_EXAMPLES = 2048


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


def distillation_loss(logits: Tensor, targets: Tensor, teacher_logits: Tensor, weight: float, temperature: float) -> Tensor:
    """``weight`` · T² · KL(teacher ‖ student), both softened by T, plus (1 − ``weight``) · cross-entropy (Hinton et al., 2015).

    T² keeps the soft term's gradients on the scale of the hard one's as T changes.
    """
    soft = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                    log_target=True, reduction="batchmean")
    return weight * temperature ** 2 * soft + (1 - weight) * F.cross_entropy(logits, targets)


class TrainingDiverged(FloatingPointError):
    """The loss or the weights became NaN or infinite: training stopped, and the last good checkpoint was kept."""


@dataclass
class EpochTotals:
    """What one process saw in one epoch: summed loss (per example), correct predictions, examples, steps."""

    loss: float
    correct: int
    examples: int
    steps: int
    first_bad_step: int | None  # the first step whose loss was not finite (only when training went on past it)


#: Steps between reads of the loss on an accelerator (CUDA, MPS, ...), where each read waits for the device.
DEVICE_CHECK_EVERY = 50


class _StepSums:
    """The epoch's loss sum and correct count, kept on the loss's device, and the step losses not yet read.

    Adding to them queues work on the device; nothing is read back until :meth:`read`, so a step does not wait
    for the device to finish the previous one. The loss sum is float64 (float32 where the device has no
    float64), as ``float(loss) * len(index)`` added up on the host was: the epoch's figures are the same numbers.
    """

    def __init__(self, loss: Tensor) -> None:
        wide = torch.float32 if loss.device.type == "mps" else torch.float64
        self.loss = torch.zeros((), dtype=wide, device=loss.device)
        self.correct = torch.zeros((), dtype=torch.long, device=loss.device)
        # (step, loss, task loss) since the last read: the first bad loss is named, the task losses shown
        self.pending: list[tuple[int, Tensor, Tensor]] = []

    def add(self, step: int, loss: Tensor, examples: int, correct: Tensor, task: Tensor) -> None:
        self.loss.add_(loss, alpha=examples)  # loss·examples is exact in float64 (a float32 times an int < 2^29)
        self.correct.add_(correct)
        self.pending.append((step, loss, task))

    def read(self) -> tuple[float, int, list[tuple[int, float, float]]]:
        """(loss sum, correct, [(step, loss, task loss) of each step since the last read]), in one transfer."""
        values = torch.stack([self.loss, self.correct.to(self.loss.dtype),
                              *(value.to(self.loss.dtype) for _, loss, task in self.pending for value in (loss, task))])
        loss_sum, correct, *losses = values.tolist()
        steps = [step for step, _, _ in self.pending]
        self.pending = []
        return loss_sum, int(correct), list(zip(steps, losses[0::2], losses[1::2]))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, regularizer: Regularizer, batches: Iterable[Tensor],
                batch: Callable[[Tensor], tuple[Tensor, Tensor]], task_loss: Callable[[Tensor, Tensor, Tensor], Tensor], *,
                forward: nn.Module | None = None, averaged: nn.Module | None = None,
                diverged: Callable[[int, float], Exception] | None = None, check_every: int | None = None,
                on_step: Callable[[int, float], None] | None = None) -> EpochTotals:
    """One epoch of training: for each index tensor of ``batches``, one step on ``batch(index)``.

    A step is ``regularizer.loss(task_loss(logits, targets, index))``, backward, ``optimizer.step()``,
    ``regularizer.after_step()`` and the moving average's update. ``forward``: what computes the logits
    (a DDP wrapper of ``model``; default ``model``). The loss and the correct count are summed on the
    loss's device and read back every ``check_every`` steps and at the end of the epoch (default: every
    step on the CPU, where reading costs nothing, and every :data:`DEVICE_CHECK_EVERY` steps on an
    accelerator, where each read waits for the device to finish). At each read a non-finite loss raises
    ``diverged(step, loss)`` for its first step; with ``check_every=1`` that is before the step spreads it
    into the weights, with more the steps since the last read have been taken. With ``diverged=None``
    (under DDP, where every rank must reach the gradient all-reduce) the epoch goes on and reports its
    first bad step. ``on_step(step, task loss)`` for each step, at the read that brings its loss back: the
    progress shown (:class:`StepProgress`).
    """
    if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every must be a positive int or None, got {check_every!r}")
    forward = model if forward is None else forward
    totals = EpochTotals(0.0, 0, 0, 0, None)
    sums: _StepSums | None = None
    model.train()
    for step, index in enumerate(batches, 1):
        inputs, targets = batch(index)
        logits = forward(inputs)
        task = task_loss(logits, targets, index)
        loss = regularizer.loss(task)
        if sums is None:
            sums = _StepSums(loss)
            every = check_every or (1 if loss.device.type == "cpu" else DEVICE_CHECK_EVERY)
        sums.add(step, loss.detach(), len(index), (logits.detach().argmax(-1) == targets).sum(), task.detach())
        totals.examples += len(index)
        totals.steps = step
        if step % every == 0:
            _check(sums, totals, diverged, on_step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        regularizer.after_step()
        if averaged is not None:
            averaged.update_parameters(model)
    if sums is not None:
        _check(sums, totals, diverged, on_step)
    return totals


def _check(sums: _StepSums, totals: EpochTotals, diverged: Callable[[int, float], Exception] | None,
           on_step: Callable[[int, float], None] | None) -> None:
    """Read the sums into ``totals``; raise ``diverged(step, loss)`` for the first non-finite loss since the last
    read, or record its step; then ``on_step(step, task loss)`` for each step read."""
    totals.loss, totals.correct, losses = sums.read()
    bad = next(((step, loss) for step, loss, _ in losses if not math.isfinite(loss)), None)
    if bad is not None:
        if diverged is not None:
            raise diverged(*bad)
        totals.first_bad_step = totals.first_bad_step or bad[0]
    if on_step is not None:
        for step, _, task in losses:
            on_step(step, task)


class StepProgress:
    """What the user sees while :func:`run_training` trains: on a terminal, a bar per epoch with the task loss and the
    regularizer's values (:meth:`Regularizer.progress`: the size kept and the target); elsewhere (a log file, a
    batch job), where a bar would be a stream of carriage returns, a line every ``every`` steps with the same values.

    The regularizer's values cost a pass over the gates: they are refreshed at most every ``interval`` seconds.
    """

    def __init__(self, regularizer: Regularizer, total_epochs: int, steps_per_epoch: int, enabled: bool = True,
                 terminal: bool | None = None, every: int = 50, interval: float = 1.0, stream=None) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"log_every must be an int >= 1 (steps between progress lines), got {every!r}")
        self.regularizer, self.total_epochs, self.steps_per_epoch = regularizer, total_epochs, steps_per_epoch
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)()) if terminal is None else terminal
        self.every, self.interval = every, interval
        self.bar, self.epoch, self.losses, self.shown_at, self.started = None, 0, [], 0.0, time.perf_counter()

    def batches(self, epoch: int, batches):
        """``batches`` of epoch ``epoch`` (from 0), inside a bar on a terminal."""
        from tqdm.auto import tqdm

        self.epoch, self.losses, self.started = epoch, [], time.perf_counter()
        if not (self.enabled and self.terminal):
            return batches
        self.bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.total_epochs}", leave=False, file=self.stream)
        return self.bar

    def _values(self, loss: float) -> dict[str, str]:
        return {"task_loss": f"{loss:.4f}", **self.regularizer.progress()}

    def __call__(self, step: int, task_loss: float) -> None:
        if not self.enabled:
            return
        self.losses.append(task_loss)
        if self.bar is not None:
            now = time.perf_counter()
            if now - self.shown_at >= self.interval or step == self.steps_per_epoch:
                self.shown_at = now
                self.bar.set_postfix(self._values(task_loss))  # at most every interval: a render is cheap then
        elif step % self.every == 0 or step == self.steps_per_epoch:
            mean = sum(self.losses) / len(self.losses)  # the mean since the last line: one step's loss is noise
            self.losses = []
            seconds = time.perf_counter() - self.started
            values = ", ".join(f"{key} {value}" for key, value in self._values(mean).items())
            print(f"epoch {self.epoch + 1}/{self.total_epochs} step {step}/{self.steps_per_epoch}: {values} "
                  f"({seconds:.0f} s into the epoch)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _non_finite_entry(model: nn.Module) -> str | None:
    """The name of the first weight or buffer holding NaN or inf, or None."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    gate_lr: float | None = None,
    lam: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train a classifier with Adam on ``mean cross-entropy + penalty / N``: the steps of :func:`run_training`.

    ``lam`` and ``weight_decay`` follow :func:`l0sparse.penalty` (λ per
    weight, N = ``len(x)``); a model without gates gets plain weight decay
    through the optimizer instead. The gates' log α learn at ``gate_lr``
    (default ``lr``) and are clamped after each step where their
    ``clamp_log_alpha`` asks for it. Returns one record per epoch.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)  # the gate noise and the batch order both come from here
    gated = bool(find_gates(model))
    optimizer = torch.optim.Adam(param_groups(model, lr=lr, gate_lr=gate_lr, weight_decay=0.0 if gated else weight_decay))
    n_train = len(x)
    regularizer = L0(model, lam, weight_decay, N=n_train) if gated else Regularizer()
    history: list[dict[str, float]] = []

    def diverged(epoch: int, step: int, loss: float) -> TrainingDiverged:
        return TrainingDiverged(f"{desc}: the loss is {loss} at epoch {epoch}, step {step}: lower lr and train again")

    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        totals = train_epoch(model, optimizer, regularizer, torch.randperm(n_train).split(batch_size),
                             lambda index: (x[index], y[index]), lambda logits, targets, _: F.cross_entropy(logits, targets),
                             diverged=functools.partial(diverged, epoch + 1))
        bad_entry = _non_finite_entry(model)
        if bad_entry is not None:
            raise TrainingDiverged(f"{desc}: {bad_entry} holds NaN or inf after epoch {epoch + 1}: lower lr and train again")
        record = {"epoch": epoch + 1, "loss": totals.loss / n_train, **regularizer.metrics()}
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
    return history


# ---------------------------------------------------------------------------
# The configured run behind `l0sparse train`: read top to bottom.
# ---------------------------------------------------------------------------


def _batch_inputs(x: Tensor, pad_id: int | None) -> Tensor:
    """A batch as the model gets it: token ids without their columns of padding only (the same outputs, less compute)."""
    if pad_id is None:
        return x
    from ..hf.task import trim_padding

    return trim_padding(x, pad_id)


def _check_config_json_unedited(saved, checkpoint: dict, run: RunFolder) -> None:
    """Refuse a resume whose ``config.json`` differs from the config its checkpoint was trained with (``epochs`` aside):
    the optimizer's state would silently keep the old values (an edited ``lr``), or the model would not fit."""
    trained = checkpoint.get("config")
    if not isinstance(trained, dict):
        return  # a checkpoint written before the config was kept in it
    now = saved.to_dict()
    differing = [key for key in now if key != "epochs" and key in trained and trained[key] != now[key]]
    if differing:
        changes = ", ".join(f"{key} ({trained[key]!r} in {CHECKPOINT}, {now[key]!r} in {CONFIG_FILE})" for key in differing)
        raise ValueError(f"--resume: {run.config_path} differs from the config {CHECKPOINT} was trained with: {changes}; was it "
                         f"edited? restore those keys (the run goes on as it was trained), or start a new run")


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


def load_teacher(config, data=None) -> nn.Module:
    """The plain model of the finished run that ``config.teacher`` names, checked to fit ``config``; in eval mode.

    ``data``: the dataset, if already loaded (it is the teacher's too).
    """
    teacher_run = RunFolder(config.teacher)
    if not teacher_run.checkpoint_path.exists():
        raise FileNotFoundError(f"config key 'teacher' = {config.teacher!r}: no {CHECKPOINT} there; train the teacher first "
                                f"(a run with regularizer = 'none' of the same model and data)")
    teacher_config, teacher, _ = teacher_run.load(data=data)
    done = teacher_run.read_checkpoint()["epoch"]
    if done < teacher_config.epochs:
        raise ValueError(f"config key 'teacher' = {config.teacher!r}: that run holds epoch {done} of {teacher_config.epochs}; "
                         f"finish it first (l0sparse train --resume ... --out {teacher_run.path})")
    if (teacher_config.model, teacher_config.data, teacher_config.regularizer) != (config.model, config.data, "none"):
        raise ValueError(f"config key 'teacher' = {config.teacher!r}: that run is model {teacher_config.model!r}, data "
                         f"{teacher_config.data!r}, regularizer {teacher_config.regularizer!r}; a teacher is a dense run "
                         f"(regularizer = 'none') of model {config.model!r} on data {config.data!r}")
    return teacher


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
                 progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None, log_every: int = 50) -> list[dict]:
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

    ``progress``: a line on stderr before each slow set-up step, then per epoch a bar (on a terminal) or a
    line every ``log_every`` steps (elsewhere) with the task loss and the size kept (:class:`StepProgress`).
    """
    if not (isinstance(log_every, int) and log_every >= 1):
        raise ValueError(f"log_every must be an int >= 1 (steps between progress lines), got {log_every!r}")
    if not str(out_dir).strip():  # Path("") is the current folder: an unset $OUT would train (and --force replace) there
        raise ValueError(f"out_dir (--out) is empty ({out_dir!r}): name the run directory")
    with RankGroup() as ranks:
        out_dir = Path(out_dir)
        checkpoint = None
        if resume:
            existing = RunFolder(out_dir)
            if not existing.checkpoint_path.exists():
                raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out_dir}; is it a run directory?")
            saved = existing.read_config()
            checkpoint = existing.read_checkpoint()
            _check_config_json_unedited(saved, checkpoint, existing)
            config = _resumed_config(saved, config, check_resumable(checkpoint, existing.checkpoint_path))
            if config.epochs != saved.epochs and ranks.is_main:
                print(f"resuming with epochs = {config.epochs} ({CONFIG_FILE} said {saved.epochs}); {CONFIG_FILE} updated",
                      file=sys.stderr)
            run_dir = StagedRunFolder(out_dir, staged=False, writes=ranks.is_main, committed=True)
        else:
            check_run_directory(out_dir)
            replacing = out_dir.is_dir() and any(out_dir.iterdir())
            if replacing and not force:
                raise FileExistsError(f"run directory {out_dir} exists and is not empty: pass --force to overwrite it or --resume "
                                      "to continue it")
            if replacing:
                check_replaceable(out_dir)
            run_dir = StagedRunFolder(out_dir, staged=replacing, writes=ranks.is_main)
        if config.regularizer == "magnitude" and ranks.world_size > 1:
            raise ValueError("config key 'regularizer' = 'magnitude': the baseline does not run distributed (it restructures the "
                             "model mid-run)")
        ranks.barrier()  # every rank has checked the directory before rank 0 changes it
        try:
            run_dir.open()
            return _train_into(run_dir, config, checkpoint, threads, progress, on_epoch_end, ranks, log_every)
        except BaseException:
            run_dir.abandon()  # a no-op once the first checkpoint is in place
            raise


def _train_into(run_dir: StagedRunFolder, config: TrainConfig, checkpoint: dict | None, threads: int | None, progress: bool,
                on_epoch_end: Callable[[dict], None] | None, ranks: RankGroup, log_every: int = 50) -> list[dict]:
    """Build the run, bring it to its first epoch (from the checkpoint, or new), add the teacher's part, train the epochs."""
    configure_torch(threads)
    shown = progress and ranks.is_main  # what the user sees: one process speaks
    say = functools.partial(_say_before, shown)
    resumed = checkpoint is not None
    run, teacher = _build_run(run_dir, config, ranks, resumed, say)
    if resumed:
        _restore(run, checkpoint)
    else:
        _start(run, shown, say)
    run.teacher_logits, run.layer_distillation = _distillation(run, teacher, resumed, say, shown)
    del teacher  # the hidden-state term keeps it where it needs it; nothing else does
    return _train_epochs(run, resumed, shown, on_epoch_end, log_every)


def _say_before(shown: bool, line: str) -> None:
    """A line on stderr before a set-up step that can take more than a few seconds (MiniLM: minutes in all)."""
    if shown:
        print(f"{line} ...", file=sys.stderr, flush=True)


@dataclass
class _Run:
    """What a configured run trains, built once by :func:`_build_run`, and where it stands: the epochs it holds."""

    run_dir: StagedRunFolder
    config: TrainConfig
    ranks: RankGroup
    data: Split
    model: nn.Module
    forward: nn.Module  # what computes the logits: the model, or its DDP wrapper
    averaged: nn.Module | None  # the moving average (AveragedModel), when config.ema > 0
    evaluated: nn.Module  # what is measured, recorded and pruned: the moving average's model, else the model
    optimizer: torch.optim.Optimizer
    regularizer: Regularizer
    steps_per_epoch: int
    total_epochs: int
    teacher_logits: Tensor | None = None
    layer_distillation: LayerDistillation | None = None
    start_epoch: int = 0  # the checkpoint's epoch, for a resumed run
    history: list[dict] = field(default_factory=list)  # one record per epoch done

    @property
    def n_train(self) -> int:
        return len(self.data.x_train)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return _batch_inputs(self.data.x_train[index], self.data.pad_id), self.data.y_train[index]

    def task_loss(self, logits: Tensor, targets: Tensor, index: Tensor) -> Tensor:
        if self.teacher_logits is None:
            return F.cross_entropy(logits, targets)
        config = self.config
        loss = distillation_loss(logits, targets, self.teacher_logits[index], config.distill_weight, config.temperature)
        if self.layer_distillation is not None:  # the student's hidden states are those of the forward that gave ``logits``
            loss = loss + config.distill_hidden * self.layer_distillation(self.batch(index)[0])
        return loss

    def order(self, epoch: int) -> Tensor:
        """The indices of the training examples this process takes in epoch ``epoch`` (from 0), in order."""
        if self.ranks.world_size == 1:
            return torch.randperm(self.n_train)
        # one permutation on every rank (its own generator), each rank its slice of it: equal, disjoint shares (as
        # _build_run counts the steps), the remainder of n / world_size left out
        order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        return order[self.ranks.rank:self.n_train // self.ranks.world_size * self.ranks.world_size:self.ranks.world_size]

    def kept_epoch(self) -> int:
        """The last epoch the checkpoint holds (0: none yet)."""
        return self.history[-1]["epoch"] if self.history else self.start_epoch

    def diverged(self, epoch: int, step: int | str, what: str) -> TrainingDiverged:
        """The error for ``what`` went wrong at ``step`` of ``epoch``, saying what the run directory still holds."""
        done = self.kept_epoch()
        if done:
            kept = f"{self.run_dir.out_dir / CHECKPOINT} keeps epoch {done}, the last good one"
        elif self.run_dir.staged:
            kept = f"no checkpoint was written, and the run that was in {self.run_dir.out_dir} is untouched"
        else:
            kept = "no checkpoint was written"
        return TrainingDiverged(f"training diverged at epoch {epoch}, step {step} of {self.steps_per_epoch}: {what}; {kept}; "
                                "start a new run with a lower lr or gate_lr")

    def loss_diverged(self, epoch: int, step: int, loss: float) -> TrainingDiverged:
        return self.diverged(epoch, step, f"the loss is {loss}")


def _build_run(run_dir: StagedRunFolder, config: TrainConfig, ranks: RankGroup, resumed: bool,
               say: Callable[[str], None]) -> tuple[_Run, nn.Module | None]:
    """The data, the teacher (:func:`_teacher`), the model, its optimizer, DDP wrapper and moving average, and the
    regularizer, in the order that the seeds make reproducible. Returns the run and the teacher."""
    from .data import load_dataset

    say(f"loading the data ({config.data})")
    data = load_dataset(config.data).subset(config.train_examples, config.test_examples)
    teacher = _teacher(run_dir.folder, config, data, resumed, say)
    torch.manual_seed(config.seed)
    say(f"building the model ({config.model}, regularizer {config.regularizer})")
    model = _new_model(config, data, initial=None if resumed else teacher)
    optimizer = _optimizer_for(model, config)
    n_train = len(data.x_train)
    # under DDP each rank takes an equal, disjoint share of the epoch: the remainder of n / world_size is left out
    steps_per_epoch = math.ceil(n_train // ranks.world_size / config.batch_size)
    forward = model
    if ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model)  # broadcasts rank 0's weights; averages gradients each step
    # the paper's temporal average of every parameter (log α included): what is evaluated, recorded and pruned
    averaged = ema(model, config.ema) if config.ema > 0 else None
    evaluated = model if averaged is None else averaged.module
    regularizer = regularizer_for(config, model, evaluated, data.x_train[:2], n_train, steps_per_epoch,
                                  functools.partial(_scoring_batches, config, data), F.cross_entropy)
    run = _Run(run_dir, config, ranks, data, model, forward, averaged, evaluated, optimizer, regularizer, steps_per_epoch,
               regularizer.total_epochs(config.epochs))
    return run, teacher


def _teacher(folder: RunFolder, config: TrainConfig, data: Split, resumed: bool, say: Callable[[str], None]) -> nn.Module | None:
    """The teacher of a distilled run: a new run loads the run ``config.teacher`` names; a resumed one needs it only for the
    hidden-state term, and takes the teacher's weights as this run stored them (its logits are stored too)."""
    if config.teacher is None:
        return None
    if not resumed:
        say(f"loading the teacher ({config.teacher})")
        return load_teacher(config, data)
    if not config.distill_hidden:
        return None
    from .build import build_model

    return folder.read_teacher_weights(build_model(config.model, 0, data.num_classes, gated=False))


def _new_model(config: TrainConfig, data: Split, initial: nn.Module | None) -> nn.Module:
    """:func:`model_for`, with a model too large for memory named by its config key."""
    try:
        return model_for(config, data, initial=initial)
    except RuntimeError as error:  # torch's allocator names bytes, not the key that asked for them
        if "allocate" not in str(error):
            raise
        raise ValueError(f"config key 'hidden' = {config.hidden!r}: the {config.model} with these widths does not fit in this "
                         f"machine's memory ({' '.join(str(error).split())[:160]}); choose smaller widths") from None


def _scoring_batches(config: TrainConfig, data: Split) -> list[tuple[Tensor, Tensor]]:
    """The importance baseline's batches, from a generator of their own: the same examples on every run of a seed."""
    n_train = len(data.x_train)
    scoring = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed))[:IMPORTANCE_EXAMPLES]
    return [(_batch_inputs(data.x_train[index], data.pad_id), data.y_train[index]) for index in scoring.split(config.batch_size)]


def _restore(run: _Run, checkpoint: dict) -> None:
    """A resumed run takes its checkpoint's state (weights, optimizer, regularizer, each process's RNG) and its metrics,
    trimmed to the checkpoint's epochs; rank 0 rewrites metrics.jsonl and config.json to say what runs now."""
    folder, ranks = run.run_dir.folder, run.ranks
    run.regularizer.resume(checkpoint["epoch"])
    load_state(run.model, checkpoint["model"], folder.checkpoint_path)
    if run.averaged is not None:
        load_state(run.averaged, checkpoint["ema"], folder.checkpoint_path)
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.regularizer.load_checkpoint_state(checkpoint)
    rng_per_rank = checkpoint.get("rng_per_rank", [checkpoint["rng"]])
    if len(rng_per_rank) != ranks.world_size:
        raise ValueError(f"--resume: the checkpoint was written by {len(rng_per_rank)} process(es); resume it with as many, "
                         f"not {ranks.world_size}")
    torch.set_rng_state(rng_per_rank[ranks.rank])
    run.start_epoch = checkpoint["epoch"]
    run.history, note = reconcile_history(folder.read_metrics(), checkpoint, folder.metrics_path)
    ranks.barrier()  # every rank has read the metrics before rank 0 trims them
    if ranks.is_main:  # drop lines past the checkpoint (and a partial last line), restore lost ones; say what runs now
        if note:
            print(f"--resume: {note}", file=sys.stderr)
        folder.write_metrics(run.history)
        folder.write_config(run.config)


def _start(run: _Run, shown: bool, say: Callable[[str], None]) -> None:
    """A new run writes its config and starts its regularizer; under DDP each process then draws its own noise."""
    config, ranks = run.config, run.ranks
    if ranks.is_main:
        run.run_dir.folder.write_config(config)
    if config.regularizer == "importance":
        say(f"scoring the heads and units on {min(IMPORTANCE_EXAMPLES, run.n_train):,} training examples")
    message = run.regularizer.start()  # the importance baseline's structure, chosen once: the checkpoint keeps it
    if message and shown:
        print(message, file=sys.stderr)
    if ranks.world_size > 1:
        torch.manual_seed(config.seed + ranks.rank)  # the same initial model everywhere, then each rank its own noise


def _distillation(run: _Run, teacher: nn.Module | None, resumed: bool, say: Callable[[str], None],
                  shown: bool) -> tuple[Tensor | None, LayerDistillation | None]:
    """What a distilled run learns from: the teacher's logits for every training example and the hidden-state term.

    The logits are computed once (the teacher is fixed, and deterministic in eval mode) and kept in the run directory:
    a resumed run learns from the same numbers even if the teacher's run was changed since. The hidden-state term runs
    the teacher on every batch, so then its weights are kept there too. ``shown``: a bar over the teacher's batches on a
    terminal.
    """
    config, folder, data = run.config, run.run_dir.folder, run.data
    if config.teacher is None:
        return None, None
    if resumed:
        teacher_logits = folder.read_teacher_logits(run.n_train, data.num_classes)
    else:
        from ..hf.task import predict_logits

        say(f"the teacher's logits for the {run.n_train:,} training examples, once")
        teacher_logits = predict_logits(teacher, data.x_train, data.pad_id, progress=shown and sys.stderr.isatty())
        if run.ranks.is_main:
            folder.write_teacher_logits(teacher_logits)
            if config.distill_hidden:
                folder.write_teacher_weights(teacher)
    if not config.distill_hidden:
        return teacher_logits, None
    from ..hf.distill import LayerDistillation

    return teacher_logits, LayerDistillation(run.model, teacher, data.pad_id)


def _train_epochs(run: _Run, resumed: bool, shown: bool, on_epoch_end: Callable[[dict], None] | None,
                  log_every: int) -> list[dict]:
    """The epochs left: train, measure, write the metrics and then the checkpoint. SIGINT and SIGTERM stop the run
    with its last checkpoint in place; the hidden-state term's hooks come off however it ends."""
    from tqdm.auto import tqdm

    steps = StepProgress(run.regularizer, run.total_epochs, run.steps_per_epoch, enabled=shown, terminal=sys.stderr.isatty(),
                         every=log_every)
    with _SigtermToInterrupt():
        try:
            for epoch in range(run.start_epoch, run.total_epochs):
                record = _train_one_epoch(run, epoch, steps)
                _write_epoch(run, record)
                run.run_dir.commit()  # the first checkpoint is in place: the new run takes the old one's place
                run.history.append(record)
                if shown:
                    figures = {k: round(v, 4) for k, v in record.items() if k in ("train_loss", "test_accuracy", "expected_l0", "flops_kept")}
                    tqdm.write(f"epoch {epoch + 1}/{run.total_epochs} " + " ".join(f"{k}={v}" for k, v in figures.items()))
                if on_epoch_end is not None:
                    on_epoch_end(record)
        except KeyboardInterrupt:
            done = run.kept_epoch()
            if done or resumed:
                print(f"interrupted: {run.run_dir.out_dir / CHECKPOINT} holds epoch {done}; continue with --resume", file=sys.stderr)
            else:
                print("interrupted before the first checkpoint: nothing of this run was kept", file=sys.stderr)
            raise
        finally:
            if run.layer_distillation is not None:
                run.layer_distillation.remove()
    return run.history


def _train_one_epoch(run: _Run, epoch: int, steps: StepProgress) -> dict:
    """Epoch ``epoch`` (from 0) trained on every process and checked for divergence; its record for metrics.jsonl."""
    run.regularizer.before_epoch(epoch)
    started = time.perf_counter()
    order = run.order(epoch)
    # a single process stops before a bad step spreads into the weights; under DDP the epoch's end does
    stop = None if run.ranks.world_size > 1 else functools.partial(run.loss_diverged, epoch + 1)
    try:
        totals = train_epoch(run.model, run.optimizer, run.regularizer, steps.batches(epoch, order.split(run.config.batch_size)),
                             run.batch, run.task_loss, forward=run.forward, averaged=run.averaged, diverged=stop, on_step=steps)
    finally:
        steps.close()
    total_loss, correct, seen = run.ranks.sum([totals.loss, totals.correct, totals.examples])
    if not math.isfinite(total_loss):
        raise run.diverged(epoch + 1, totals.first_bad_step or "unknown (on another process)", "the loss is not finite")
    bad_entry = _non_finite_entry(run.model)
    if bad_entry is not None:  # the last step of the epoch can break the weights with a finite loss
        raise run.diverged(epoch + 1, totals.steps, f"{bad_entry} holds NaN or inf after the optimizer step")
    data = run.data
    record = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
              "test_accuracy": accuracy(run.evaluated, data.x_test, data.y_test, pad_id=data.pad_id),
              "seconds": time.perf_counter() - started}
    if run.averaged is not None:
        record["test_accuracy_without_ema"] = accuracy(run.model, data.x_test, data.y_test, pad_id=data.pad_id)
    if run.ranks.world_size > 1:
        record.update(_agreement_of_ranks(run, totals, seen))
    record.update(run.regularizer.metrics())
    return record


def _agreement_of_ranks(run: _Run, totals: EpochTotals, seen: float) -> dict:
    """Under DDP, what the epoch's record adds: the shares of the ranks, and whether they hold the same gates (and
    multipliers), which DDP should keep equal."""
    shared = run.regularizer.shared_values()
    mine = ([g.log_alpha.detach().flatten().tolist() for g in find_gates(run.model)], shared)
    everyone = run.ranks.gather(mine)
    return {"world_size": run.ranks.world_size, "steps": totals.steps, "examples": int(seen),
            "gates_identical_on_ranks": all(other[0] == mine[0] for other in everyone),
            **{f"{name}_identical_on_ranks": all(other[1][name] == value for other in everyone) for name, value in shared.items()}}


def _write_epoch(run: _Run, record: dict) -> None:
    """Rank 0 writes the epoch's record, then the checkpoint (a resumed run trims lines past its checkpoint); every rank
    gives its RNG state to it."""
    rng_per_rank = run.ranks.gather(torch.get_rng_state())
    if not run.ranks.is_main:
        return
    folder, averaged = run.run_dir.folder, run.averaged
    folder.write_metrics([*run.history, record])
    folder.write_checkpoint({
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        **({"ema": averaged.state_dict()} if averaged is not None else {}),
        **run.regularizer.checkpoint_state(), "epoch": record["epoch"], "rng": rng_per_rank[0], "config": run.config.to_dict(),
        "history": [*run.history, record],  # a copy of metrics.jsonl, which a resume restores if it is lost
        **({"rng_per_rank": rng_per_rank} if run.ranks.world_size > 1 else {})})
