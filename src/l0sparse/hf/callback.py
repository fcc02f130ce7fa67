"""L0Callback: gates, penalty or controller, pruning and save_pretrained inside a user's own transformers.Trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.graph import evaluating
from .shapes import DecoderShape, prune_to_shape
from .task import import_transformers


def _penalty_of(regularizer):
    """The loss term of ``regularizer``: its ``penalty()`` (TargetController, ShapeController) or its call (Penalty)."""
    if callable(getattr(regularizer, "penalty", None)):
        return regularizer.penalty
    if callable(regularizer):
        return regularizer
    raise TypeError("regularizer must have a penalty() method (l0sparse.TargetController, l0sparse.hf.ShapeController) or be "
                    f"callable (l0sparse.Penalty), got {type(regularizer).__name__}")


def _make_l0_callback():
    TrainerCallback = import_transformers().TrainerCallback

    class L0Callback(TrainerCallback):
        """Gates trained by a user's own ``transformers.Trainer``, with a few added lines::

            l0sparse.sparsify(model, l0sparse.hf.decoder_rules(model), example_inputs=batch, droprate_init=0.02)
            controller = l0sparse.hf.ShapeController(model, shape, warmup_steps=max_steps // 4)   # or TargetController, Penalty
            callback = l0sparse.hf.L0Callback(controller, example_inputs=batch, shape=shape, output_dir="pruned")
            Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
            callback.pruned_                                       # also saved with save_pretrained in output_dir

        What it does, by the Trainer's events: at the start, the gates' log α leave the weight-decay group the
        Trainer made (decay would pull log α to 0, that is to P(open) = 0.83) for its no-decay group (the Trainer's
        learning rate and schedule; for a gate learning rate of their own pass ``optimizers=(torch.optim.AdamW(
        l0sparse.param_groups(model, lr, gate_lr, weight_decay)), None)`` to the Trainer); before each optimizer step, after the model's
        gradients are accumulated (and clipped), the regularizer's penalty adds its gradient to log α, once per
        optimizer step; after each step, ``regularizer.step()`` (a controller's multipliers and schedule); in
        each log, the expected size; at the end, the model is pruned (``prune_to_shape`` with ``shape``, else
        ``prune``) into ``pruned_`` and written with ``save_pretrained`` to ``output_dir`` if given. ``fp16``
        is refused: its gradient scaler scales the loss's gradients but not the penalty's (``bf16`` is fine).
        """

        def __init__(self, regularizer, example_inputs=None, shape: DecoderShape | None = None,
                     output_dir: str | Path | None = None) -> None:
            self.penalty = _penalty_of(regularizer)
            self.regularizer = regularizer
            if shape is not None and not isinstance(shape, DecoderShape):
                raise TypeError(f"shape must be an l0sparse.hf.DecoderShape or None, got {type(shape).__name__}")
            if output_dir is not None and example_inputs is None:
                raise ValueError("output_dir needs example_inputs: prune traces the model on a batch before saving it")
            self.example_inputs, self.shape = example_inputs, shape
            self.output_dir = None if output_dir is None else Path(output_dir)
            self.pruned_ = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if getattr(args, "fp16", False):
                raise ValueError("L0Callback: fp16=True scales the loss's gradients and not the penalty's: train in bf16 or float32")
            _move_gates_out_of_weight_decay(model, optimizer)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.penalty().backward()

        def on_step_end(self, args, state, control, **kwargs):
            if callable(getattr(self.regularizer, "step", None)):
                self.regularizer.step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None:
                _log_sizes(self.regularizer, state, logs)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.example_inputs is None:
                return
            self.pruned_ = _pruned(model, self.example_inputs, self.shape)
            if self.output_dir is not None:
                self.pruned_.save_pretrained(self.output_dir)

    return L0Callback


def _move_gates_out_of_weight_decay(model, optimizer) -> None:
    """Refuse a model without gates; move the gates' log α from the optimizer's decayed groups to its no-decay group (the
    Trainer's biases and norms, with its lr and schedule): decay would pull every gate to P(open) = 0.83."""
    from ..core.sites import find_gates

    gates = {id(gate.log_alpha): gate.log_alpha for gate in find_gates(model)}
    if not gates:
        raise ValueError("L0Callback: the model has no l0sparse gates: call l0sparse.sparsify(model, ...) before the Trainer")
    if optimizer is None:
        return
    decayed = [group for group in optimizer.param_groups if group.get("weight_decay", 0.0) > 0
               and any(id(p) in gates for p in group["params"])]
    undecayed = next((group for group in optimizer.param_groups if group.get("weight_decay", 0.0) == 0), None)
    if decayed and undecayed is None:
        raise ValueError("L0Callback: every parameter group of the optimizer decays its weights, log α included (decay "
                         "pulls every gate to P(open) = 0.83): pass Trainer(..., optimizers=(torch.optim.AdamW("
                         "l0sparse.param_groups(model, lr, gate_lr, weight_decay)), None))")
    for group in decayed:
        group["params"] = [p for p in group["params"] if id(p) not in gates]
        undecayed["params"].extend(p for p in gates.values() if all(p is not q for q in undecayed["params"]))


def _log_sizes(regularizer, state, logs: dict) -> None:
    """Add to the Trainer's ``logs`` the pruned fraction (a TargetController's) and the expected heads, key/value heads
    and units, each the mean over layers (a ShapeController's)."""
    sizes = {}
    if callable(getattr(regularizer, "deterministic_fraction", None)):
        sizes["l0_pruned_fraction"] = round(float(regularizer.deterministic_fraction()), 4)
    if callable(getattr(regularizer, "expected_counts", None)):
        with torch.no_grad():
            counts = regularizer.expected_counts()
        for dimension in ("heads", "kv_heads", "units"):
            values = [float(count[dimension]) for count in counts if dimension in count]
            if values:
                sizes[f"l0_expected_{dimension}"] = round(sum(values) / len(values), 3)
    logs.update(sizes)  # for the loggers after this one (the console, TensorBoard...)
    if state.log_history and all(state.log_history[-1].get(key) == value for key, value in logs.items() if key not in sizes):
        state.log_history[-1].update(sizes)  # the Trainer recorded this entry before calling the callbacks


def _pruned(model, example_inputs, shape: DecoderShape | None):
    """The trained model pruned (to ``shape`` if given) at its test-time gates: in eval mode, then back in its own."""
    from ..core.prune import prune

    with evaluating(model):
        return prune_to_shape(model, example_inputs, shape) if shape is not None else prune(model, example_inputs)


_LAZY: dict[str, object] = {}


def __getattr__(name: str):
    """``L0Callback`` subclasses ``transformers.TrainerCallback``, so it is made when first asked for (transformers is optional)."""
    if name == "L0Callback":
        if name not in _LAZY:
            _LAZY[name] = _make_l0_callback()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
