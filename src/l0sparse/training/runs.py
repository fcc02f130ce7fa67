"""The run folder that `l0sparse train` writes, and what `prune` and `report` read from it and add to it.

One type owns the file names: ``RunFolder(path)`` reads and writes the
config, the metrics, the checkpoint and the teacher's logits (and weights), loads the
trained model, prunes it and loads the pruned one. ``StagedRunFolder`` is
where a new run writes until its first checkpoint is in place.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..core.graph import evaluating
from .files import atomic_save, atomic_write_text, read_json, regular_file, torch_load

if TYPE_CHECKING:  # annotations only: importing them here would make runs import config, data and report at start-up
    from .config import TrainConfig
    from .data import Split
    from ..core.report import Summary

__all__ = ["RunFolder", "StagedRunFolder", "load_run", "prune_run", "load_pruned", "read_metrics", "load_checkpoint",
           "check_run_directory", "prune_result", "format_prune_result", "accuracy"]

CHECKPOINT = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PRUNED_WEIGHTS = "pruned.pt"
PRUNED_SPEC = "pruned.json"
REPORT_DIR = "report"
TEACHER_LOGITS = "teacher_logits.pt"
TEACHER_WEIGHTS = "teacher.pt"
#: What `train --force` replaces in a run directory: the run's own files and what `prune` and `report` derived from them.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT, TEACHER_LOGITS, TEACHER_WEIGHTS, PRUNED_WEIGHTS, PRUNED_SPEC, REPORT_DIR)
#: A new run writes here, inside the run directory, until its first checkpoint; then it takes the old run's place.
STAGING_DIR = ".l0sparse-new"
REPLACED_DIR = ".l0sparse-old"
#: the example inputs' dtypes a pruned.json may name: images and features, or token ids
_EXAMPLE_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _say_nothing(line: str) -> None:
    """The default of every ``say``: the library is quiet unless its caller shows the steps (the command does)."""


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``; a partial last line (a write cut short by kill -9 or a full disk) is dropped."""
    path = regular_file(path)
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


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024, pad_id: int | None = None) -> float:
    """Classification accuracy in eval mode (deterministic gates); restores the model's mode.

    ``pad_id``: ``x`` holds token ids padded with it, computed in batches of similar length without their padding.
    """
    if pad_id is not None:
        from ..hf.task import predict_logits

        return float((predict_logits(model, x, pad_id, batch_size=batch_size).argmax(-1) == y).float().mean())
    with evaluating(model):
        correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``; a damaged or foreign file gives one clear error."""
    path = Path(path)
    state = torch_load(path)
    if not (isinstance(state, dict) and {"model", "epoch"} <= set(state)):
        raise ValueError(f"{path} is not an l0sparse training checkpoint (no model and epoch in it); delete it and train again")
    return state


def check_resumable(state: dict, path: Path) -> int:
    """The epoch of a checkpoint that ``--resume`` can continue; one that lacks the optimizer or the random state, or
    whose epoch is not a whole number, gives an error naming the file and what is missing (not a KeyError)."""
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"--resume: {path} holds epoch {epoch!r}, not a whole number of epochs; was it edited? restore it, or "
                         "start a new run")
    missing = [key for key in ("optimizer", "rng") if key not in state]
    if missing:
        raise ValueError(f"--resume: {path} has no {' and no '.join(missing)} (the optimizer's state and the random state that "
                         "continue the run exactly): it cannot be resumed; prune and report still read it, or start a new run")
    return epoch


def reconcile_history(records: list[dict], checkpoint: dict, path: Path) -> tuple[list[dict], str | None]:
    """The per-epoch records up to the checkpoint's epoch, and a note when ``metrics.jsonl`` (``path``) disagreed with it.

    Lines past the checkpoint (written just before a kill) are dropped; epochs missing from the file (a partial last
    line, a deleted or emptied file) are taken from the history the checkpoint keeps, where it has one; else the
    note says which records are lost."""
    epoch = checkpoint["epoch"]
    kept = [record for record in records if record["epoch"] <= epoch]
    notes = []
    if len(kept) < len(records):
        notes.append(f"{path} had records past the checkpoint's epoch {epoch} (epochs "
                     f"{', '.join(str(r['epoch']) for r in records if r['epoch'] > epoch)}): dropped")
    if [record["epoch"] for record in kept] != list(range(1, epoch + 1)):
        saved = checkpoint.get("history")
        if isinstance(saved, list) and [record.get("epoch") for record in saved[:epoch]] == list(range(1, epoch + 1)):
            kept = saved[:epoch]
            notes.append(f"{path} lacked records of epochs 1-{epoch} that the checkpoint holds: restored from it")
        else:
            lost = sorted(set(range(1, epoch + 1)) - {record["epoch"] for record in kept})
            notes.append(f"{path} has no record of epoch(s) {', '.join(map(str, lost))}, which the checkpoint holds: "
                         "that history is lost (checkpoints before issue #27 keep no copy)")
    return kept, ("; ".join(notes) or None)


def load_state(model: nn.Module, state, path: Path, described_by: str = CONFIG_FILE) -> None:
    """``model.load_state_dict(state)``; a mismatch names the file and the description it should fit."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:  # wrong keys or shapes; not a dict at all
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"{path} does not fit the model that {described_by} describes ({first}); was either edited? "
                         "restore them, or train again") from None


def check_run_directory(out_dir: Path) -> None:
    """Fail at once, before any data is loaded, if ``out_dir`` cannot hold a run: a file, or a folder this user cannot write."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"run directory {out_dir}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {out_dir}: {existing} is not writable by this user; choose another --out")


def check_replaceable(out_dir: Path) -> None:
    """``--force`` replaces a run, nothing else: refuse a folder that holds a run's file names (``config.json``,
    ``report/``...) but no ``checkpoint.pt``, whose files the replacement would delete."""
    if (out_dir / CHECKPOINT).is_file():
        return
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held:
        raise FileExistsError(f"run directory {out_dir} is not an l0sparse run (it has no {CHECKPOINT}) but holds "
                              f"{', '.join(held)}, which --force would delete: choose another --out, or move them away "
                              "(a run killed before its first checkpoint left nothing worth keeping: delete the folder)")


def _named_file(name: str) -> property:
    """A run folder's path to ``name``: one property per file the folder holds."""
    return property(lambda folder: folder.path / name, doc=f"``{name}`` in the run folder")


class RunFolder:
    """A run directory: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``teacher_logits.pt`` (a distilled
    run), ``teacher.pt`` (one that distils hidden states too), and what ``prune`` (``pruned.pt``, ``pruned.json``)
    and ``report`` (``report/``) derive from them."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    config_path = _named_file(CONFIG_FILE)
    metrics_path = _named_file(METRICS_FILE)
    checkpoint_path = _named_file(CHECKPOINT)
    teacher_logits_path = _named_file(TEACHER_LOGITS)
    teacher_weights_path = _named_file(TEACHER_WEIGHTS)
    pruned_weights_path = _named_file(PRUNED_WEIGHTS)
    pruned_spec_path = _named_file(PRUNED_SPEC)
    report_path = _named_file(REPORT_DIR)

    # -- what training writes ---------------------------------------------------------------------------------
    def read_config(self):
        """The run's ``config.json`` as a validated TrainConfig; an error names the file."""
        from .config import read_config_json

        return read_config_json(self.config_path)

    def write_config(self, config) -> None:
        atomic_write_text(json.dumps(config.to_dict(), indent=1), self.config_path)

    def read_metrics(self) -> list[dict]:
        """The per-epoch records; none when the run has not finished an epoch."""
        return read_metrics(self.metrics_path) if self.metrics_path.exists() else []

    def write_metrics(self, records: list[dict]) -> None:
        """The whole file, rewritten atomically: a kill leaves the old file or the new one, never a partial line."""
        atomic_write_text("".join(json.dumps(record) + "\n" for record in records), self.metrics_path)

    def read_checkpoint(self) -> dict:
        return load_checkpoint(self.checkpoint_path)

    def write_checkpoint(self, state: dict) -> None:
        atomic_save(state, self.checkpoint_path)

    def read_teacher_logits(self, n_train: int, num_classes: int) -> Tensor:
        """The teacher's logits this run learns from, checked to be ``n_train`` × ``num_classes``."""
        path = self.teacher_logits_path
        if not path.exists():
            raise FileNotFoundError(f"--resume: {path} is missing (the teacher's logits this run learns from); start a new run")
        logits = torch_load(path)
        if not (isinstance(logits, Tensor) and logits.shape == (n_train, num_classes)):
            raise ValueError(f"{path} does not hold {n_train} × {num_classes} logits; start a new run")
        return logits

    def write_teacher_logits(self, logits: Tensor) -> None:
        atomic_save(logits, self.teacher_logits_path)

    def read_teacher_weights(self, teacher: nn.Module) -> nn.Module:
        """``teacher`` (a plain model of the teacher's architecture) with the weights this run learns from, in eval mode."""
        path = self.teacher_weights_path
        if not path.exists():
            raise FileNotFoundError(f"--resume: {path} is missing (the teacher's weights this run learns from); start a new run")
        load_state(teacher, torch_load(path), path)
        return teacher.eval()

    def write_teacher_weights(self, teacher: nn.Module) -> None:
        atomic_save(teacher.state_dict(), self.teacher_weights_path)

    # -- what prune and report read ---------------------------------------------------------------------------
    def load(self, data=None, say: Callable[[str], None] | None = None) -> tuple:
        """(config, model with the checkpoint's weights in eval mode, dataset).

        ``data``: the run's dataset, if already loaded (it is not loaded again). ``say``: called with a line
        before the slow steps (the data, the model), once the config and the checkpoint have been read: a bad
        file is then the only line printed.
        """
        from .build import ema, model_for
        from .data import load_dataset

        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory: it has no {CHECKPOINT}")
        config = self.read_config()
        state = self.read_checkpoint()
        say = say or _say_nothing
        if data is None:
            say(f"loading the data ({config.data})")
            data = load_dataset(config.data).subset(config.train_examples, config.test_examples)
        say(f"building the model ({config.model}) with the weights of {self.checkpoint_path.name}")
        model = model_for(config, data)
        if config.regularizer == "magnitude" and state["epoch"] >= config.epochs:
            from .baselines import magnitude_prune

            magnitude_prune(model, config.target, data.x_train[:2])  # the masks' structure; their values load below
        load_state(model, state["model"], self.checkpoint_path)
        if config.ema > 0:  # the moving average is the model this run evaluated: it is the one to prune
            averaged = ema(model, config.ema)
            load_state(averaged, state["ema"], self.checkpoint_path)
            model = averaged.module
        if config.regularizer in ("l1", "group_l1"):
            from ..core.norms import threshold_

            threshold_(model, config.regularizer, config.threshold_value)  # the usual last step of an L1 run
        return config, model.eval(), data

    def prune(self, force: bool = False, round_to: int | None = None, latency: bool = True, repeats: int = 10,
              say: Callable[[str], None] | None = None) -> tuple[nn.Module, str]:
        """Prune the checkpoint's model; write ``pruned.pt`` (state_dict) and ``pruned.json`` (plan, architecture,
        summary and ``result``: what :func:`prune_result` measured).

        ``round_to`` is :func:`l0sparse.prune`'s: kept counts rounded up to a multiple of it (None: the run's
        config's ``round_to``, 1 unless the config sets it). ``latency``: time the pruned model against the
        unpruned one (``repeats`` turns each). ``say``: called with a line before each slow step (loading,
        pruning, evaluating, timing). Returns the pruned module and the text :func:`format_prune_result` makes
        of the summary table and the result; :meth:`load_pruned` loads the module back with ``weights_only=True``.
        """
        from ..core.prune import prune
        from ..core.report import architecture, summary
        from ..core.sites import find_gates

        say = say or _say_nothing
        if self.pruned_weights_path.exists() and not force:
            raise FileExistsError(f"{self.pruned_weights_path} exists: pass --force to overwrite it")
        if self.path.is_dir() and not os.access(self.path, os.W_OK | os.X_OK):  # before the model is loaded and pruned
            raise PermissionError(errno.EACCES, f"the run folder is read-only, and prune writes {PRUNED_WEIGHTS} and "
                                  f"{PRUNED_SPEC} into it: copy the run somewhere writable, or make it writable", str(self.path))
        config, model, data = self.load(say=say)
        if not find_gates(model):  # prune() would say "call l0sparse.sparsify first", which a command-line user cannot
            raise ValueError(f"{self.path} is a run without gates (regularizer = {config.regularizer!r}): there is nothing to "
                             f"prune; its {CHECKPOINT} holds the whole model (load it with l0sparse.training.runs.load_run)")
        example = data.x_train[:2]
        rounding = config.round_to if round_to is None else round_to
        say(f"pruning (widths rounded up to multiples of {rounding})" if rounding > 1 else "pruning")
        pruned, plan = prune(model, example, return_plan=True, round_to=rounding)
        table = summary(model, example, pruned=(pruned, plan))
        result = prune_result(model, pruned.eval(), table, config, data, latency=latency, repeats=repeats, say=say)
        result["round_to"] = {"value": rounding, "from": "the run's config key round_to" if round_to is None else "--round-to"}
        history = self.read_metrics()
        # prune keeps the gated model's outputs: the accuracy it measured at the run's end is the one to compare with
        result["test_accuracy_gated"] = history[-1].get("test_accuracy") if history else None
        spec = {"config": config.to_dict(), "plan": plan, "example_shape": list(example.shape[1:]),
                "example_dtype": str(example.dtype).removeprefix("torch."), "num_classes": data.num_classes,
                "architecture": architecture(model), "summary": table.to_markdown(), "result": result}
        atomic_save(pruned.state_dict(), self.pruned_weights_path)
        atomic_write_text(json.dumps(spec, indent=1), self.pruned_spec_path)
        return pruned, f"{table}\n\n{format_prune_result(result)}"

    def load_pruned(self) -> nn.Module:
        """The pruned model, rebuilt from ``pruned.json`` and loaded with ``weights_only=True``; in eval mode."""
        from .config import config_from_dict
        from .build import build_model
        from ..core.prune import rebuild

        if not self.pruned_spec_path.exists():
            raise FileNotFoundError(f"{self.path} has no {PRUNED_SPEC}: run `l0sparse prune {self.path}` first")
        spec = read_json(self.pruned_spec_path)
        config = config_from_dict(spec.get("config") if isinstance(spec, dict) else None, source=self.pruned_spec_path)
        shape, dtype = spec.get("example_shape"), _EXAMPLE_DTYPES.get(spec.get("example_dtype", "float32"))
        if dtype is None or not (isinstance(shape, list) and all(isinstance(size, int) and size > 0 for size in shape)):
            raise ValueError(f"{self.pruned_spec_path}: 'example_shape' must be a list of positive ints and 'example_dtype' one of "
                             f"{sorted(_EXAMPLE_DTYPES)}; was it edited? run `l0sparse prune --force {self.path}` again")
        example = torch.zeros(2, *shape, dtype=dtype)
        classes = spec.get("num_classes")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1 or not isinstance(spec.get("plan"), dict):
            raise ValueError(f"{self.pruned_spec_path}: 'num_classes' must be a positive int and 'plan' a prune plan; was it "
                             f"edited? run `l0sparse prune --force {self.path}` again")
        # per-weight gates sit on the plain model (sparsify), so its module names are the plain model's
        fresh = build_model(config.model, int(math.prod(shape)), classes, hidden=config.hidden,
                            gated=config.regularizer == "l0" and config.gates == "units")
        module = rebuild(fresh, spec["plan"], example)
        load_state(module, torch_load(self.pruned_weights_path), self.pruned_weights_path, described_by=PRUNED_SPEC)
        return module.eval()


def prune_result(model: nn.Module, pruned: nn.Module, table: Summary, config: TrainConfig, data: Split, latency: bool = True,
                 repeats: int = 10, say: Callable[[str], None] | None = None) -> dict:
    """What ``l0sparse prune`` reports and keeps in ``pruned.json`` under ``result``: the kept architecture (open gates
    and as saved), FLOPs, parameters, the pruned model's test accuracy and its latency beside the unpruned model's.

    FLOPs are MACs per example at the example's shape, attention's products included; for a text classifier the
    encoder's only (without the classification layer), docs/hf.md's count. The unpruned model is the gated one with
    its gates folded into the weights (:func:`l0sparse.core.prune.plain_copy`): every unit kept.
    """
    from ..core.costs import count_flops, median_latency
    from ..hf.task import SentenceClassifier, encoder_flops
    from ..core.prune import plain_copy
    from ..core.report import architecture

    say = say or _say_nothing
    dense = plain_copy(model)
    example = data.x_train[:2]
    encoder_only = isinstance(dense, SentenceClassifier)
    flops = encoder_flops if encoder_only else count_flops
    flops_before, flops_after = flops(dense, example), flops(pruned, example)
    params_before, params_after = (sum(p.numel() for p in m.parameters()) for m in (dense, pruned))
    say(f"test accuracy of the pruned model on the run's {len(data.y_test):,} test examples")
    result = {
        "architecture_open_gates": architecture(model),
        "architecture_saved": table.saved_architecture(),
        "widths": table.widths(),
        "flops": {"counted": "encoder MACs per example (attention products included, classifier excluded)" if encoder_only
                  else "MACs per example", "example_shape": list(example.shape[1:]), "tokens": data.pad_id is not None,
                  "unpruned": flops_before, "pruned": flops_after,
                  "kept": flops_after / flops_before if flops_before else None},
        "params": {"unpruned": params_before, "pruned": params_after, "kept": params_after / params_before},
        "test_accuracy": accuracy(pruned, data.x_test, data.y_test, pad_id=data.pad_id),
        "test_examples": len(data.y_test),
        "latency": None,
    }
    if latency:
        batch = data.x_test[:config.batch_size]
        say(f"timing the pruned and the unpruned model in turns: batch {tuple(batch.shape)}, {repeats} turns, "
            f"{torch.get_num_threads()} thread(s)")
        seconds = median_latency({"unpruned": dense.eval(), "pruned": pruned}, batch, repeats)
        result["latency"] = {"batch_shape": list(batch.shape), "threads": torch.get_num_threads(), "repeats": repeats,
                             "unpruned_s": seconds["unpruned"], "pruned_s": seconds["pruned"],
                             "speedup": seconds["unpruned"] / seconds["pruned"]}
    return result


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count:,}"


def _shape(sizes: list[int], tokens: bool = False) -> str:
    return f"{sizes[-1]} tokens" if tokens else "x".join(map(str, sizes))


def format_prune_result(result: dict) -> str:
    """The lines ``l0sparse prune`` prints under its table, from :func:`prune_result`'s dict (as in ``pruned.json``)."""
    rounding = result.get("round_to", {"value": 1})
    flops, params = result["flops"], result["params"]
    flops_kept = "-" if flops["kept"] is None else f"{100 * flops['kept']:.1f}%"  # None: a model without counted layers
    lines = []
    if rounding["value"] > 1:
        lines.append(f"rounded: every kept width up to a multiple of {rounding['value']} with zero units, the outputs unchanged "
                     f"(from {rounding['from']}; --round-to 1 for none)")
    lines += [
        f"kept, as saved:      {result['architecture_saved']}",
        f"kept, open gates:    {result['architecture_open_gates']}",
        f"{flops['counted']}, input {_shape(flops['example_shape'], flops.get('tokens', False))}: {_millions(flops['unpruned'])} -> "
        f"{_millions(flops['pruned'])} ({flops_kept})",
        f"parameters (all of them): {_millions(params['unpruned'])} -> {_millions(params['pruned'])} ({100 * params['kept']:.1f}%)",
        f"test accuracy of the pruned model: {100 * result['test_accuracy']:.2f}% ({result['test_examples']:,} test examples"
        + (f"; the gated model at the run's end: {100 * result['test_accuracy_gated']:.2f}%)" if result.get("test_accuracy_gated") is not None
           else ")"),
    ]
    timing = result.get("latency")
    if timing:
        lines.append(f"latency, batch {timing['batch_shape'][0]} x {_shape(timing['batch_shape'][1:], flops.get('tokens', False))}, "
                     f"{timing['threads']} thread(s), median of {timing['repeats']} turns: unpruned {1000 * timing['unpruned_s']:.3g} ms, "
                     f"pruned {1000 * timing['pruned_s']:.3g} ms (speed-up {timing['speedup']:.2f}x)")
    return "\n".join(lines)


class StagedRunFolder:
    """Where a new run writes: a staging folder inside ``out_dir`` until its first checkpoint, then ``out_dir`` itself.

    Until that checkpoint an older run in ``out_dir`` (replaced under ``force``) stays whole, and a
    failed set-up or a first epoch that diverges leaves nothing behind. Only the main process writes.
    """

    def __init__(self, out_dir: Path, staged: bool, writes: bool, committed: bool = False) -> None:
        self.out_dir, self.staged, self.writes, self.committed = Path(out_dir), staged, writes, committed
        self.folder = RunFolder(self.out_dir / STAGING_DIR if staged else self.out_dir)
        self.created = not self.out_dir.exists()

    def open(self) -> None:
        if not self.writes:
            return
        if self.staged:
            shutil.rmtree(self.folder.path, ignore_errors=True)  # left by a run killed before its first checkpoint: nothing in it counts
        self.folder.path.mkdir(parents=True, exist_ok=True)

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
            for child in self.folder.path.iterdir():
                os.replace(child, self.out_dir / child.name)
            self.folder.path.rmdir()
            shutil.rmtree(aside)
        self.folder = RunFolder(self.out_dir)

    def abandon(self) -> None:
        """Before the first checkpoint: remove what the new run wrote (the folder was empty or new, or this is the staging one)."""
        if self.committed or not self.writes:
            return
        if self.staged:
            shutil.rmtree(self.folder.path, ignore_errors=True)
            return
        for name in (CONFIG_FILE, METRICS_FILE, TEACHER_LOGITS, TEACHER_WEIGHTS):  # all a run writes before its checkpoint
            (self.out_dir / name).unlink(missing_ok=True)
        if self.created and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()


def load_run(run_dir: str | os.PathLike, data=None) -> tuple:
    """(config, model with the checkpoint's weights in eval mode, dataset) of a run directory: :meth:`RunFolder.load`."""
    return RunFolder(run_dir).load(data)


def prune_run(run_dir: str | os.PathLike, force: bool = False, round_to: int | None = None, latency: bool = True) -> tuple[nn.Module, str]:
    """Prune a run's checkpoint and write ``pruned.pt`` and ``pruned.json``: :meth:`RunFolder.prune`."""
    return RunFolder(run_dir).prune(force=force, round_to=round_to, latency=latency)


def load_pruned(run_dir: str | os.PathLike) -> nn.Module:
    """The pruned model of a run, rebuilt from ``pruned.json``: :meth:`RunFolder.load_pruned`."""
    return RunFolder(run_dir).load_pruned()
