"""The model a training config describes: built, gated and initialised as its regularizer needs, and its moving average."""

from __future__ import annotations

import copy
import warnings

import torch
from collections.abc import Sequence

from torch import Tensor, nn

from ..core.models import L0MLP, L0LeNet5, LeNet5, mlp
from ..core.sites import find_gates, gate_masks

__all__ = ["build_model", "model_for", "paper_init_", "ema"]


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


def model_for(config, data, initial: nn.Module | None = None) -> nn.Module:
    """The model ``config`` describes, gated as its regularizer needs; ``initial``: a plain model to start from (copied)."""
    from ..core.gates import PAPER_LOG_ALPHA_RANGE
    from ..core.sparsify import sparsify

    gated = config.regularizer == "l0"
    clamp = PAPER_LOG_ALPHA_RANGE if config.clamp_log_alpha else None
    if config.model == "minilm":  # pretrained: gated by heads and feed-forward units (and the hidden size), or dense
        from ..hf.rules import encoder_rules

        model = copy.deepcopy(initial) if initial is not None else build_model(config.model, 0, data.num_classes)
        if gated or config.regularizer == "importance":
            with warnings.catch_warnings():  # the embeddings, q/k/v and the classifier are meant to have no gate of their own
                warnings.filterwarnings("ignore", message="sparsify: .*(skipped by rule|no rule supports it)")
                model = sparsify(model, rules=encoder_rules(model), example_inputs=data.x_train[:2],
                                 droprate_init=config.droprate_init, clamp_log_alpha=clamp)
            if config.hidden_gate:  # and one gate over the residual stream's dimensions (classifier already in place)
                from ..hf.hidden import gate_hidden

                gate_hidden(model, data.x_train[:2], droprate_init=config.droprate_init, clamp_log_alpha=clamp)
        if config.regularizer == "importance":  # the baseline's gates are set once, by importance, and never trained
            for gate in find_gates(model):
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
            layer_gates = find_gates(model)
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


def build_model(name: str, num_features: int, num_classes: int, hidden: Sequence[int] = (300, 100), gated: bool = True,
                **gate_kwargs) -> nn.Module:
    """The model a training config names: ``"mlp"`` (flattened inputs) or ``"lenet5"``, gated or dense, or ``"minilm"`` (dense)."""
    if name == "mlp":
        sizes = (num_features, *hidden, num_classes)
        return L0MLP(sizes, **gate_kwargs) if gated else mlp(sizes)
    if name == "lenet5":
        return L0LeNet5(num_classes=num_classes, **gate_kwargs) if gated else LeNet5(num_classes=num_classes)
    if name == "minilm":  # pretrained; its gates come from sparsify (l0sparse.hf.encoder_rules)
        from ..hf.task import build_minilm

        return build_minilm(num_classes)
    raise ValueError(f"unknown model {name!r}; known: 'mlp', 'lenet5', 'minilm'")
