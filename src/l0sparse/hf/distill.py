"""Layer-wise distillation from a teacher encoder (hidden states matched layer by layer)."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from .rules import attention_modules, layers_around


def encoder_layers(model: nn.Module) -> list[str]:
    """The names of a BERT-like encoder's layers, in order: the module around each attention module (found as
    :func:`encoder_rules` finds it) and its feed-forward block. ValueError when there is no attention module."""
    attention = attention_modules(model)
    if not attention:
        raise ValueError(f"encoder_layers found no attention module in {type(model).__name__} (three query/key/value "
                         "projections of one width and an output projection back to the input width)")
    return list(dict.fromkeys(layers_around(model, attention).values()))


def _first_tensor(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerDistillation:
    """A CoFi-style layer-wise distillation term: the mean squared difference between the student's and the teacher's
    hidden states after every encoder layer, over the real (non-padding) tokens.

    Forward hooks on the student's layers keep the hidden states of its last
    forward with gradients (evaluations under ``torch.no_grad`` are not
    kept); calling this object with that forward's ``input_ids`` runs the
    teacher (put in eval mode here; no gradients) and returns the mean over
    layers of Σ (h_student − h_teacher)² / (tokens × width). Layer ``i`` of
    the student is matched with layer ``i`` of the teacher, and dimension
    with dimension: both must have the same layers and the same hidden width
    (no hidden-size gate). CoFi matches layers dynamically and learns a
    projection of the student's states; neither is built here.
    :meth:`remove` takes the hooks off.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pad_id: int) -> None:
        if not isinstance(pad_id, int) or isinstance(pad_id, bool):
            raise TypeError(f"LayerDistillation: pad_id must be the padding token's id (an int), got {pad_id!r}")
        names = encoder_layers(teacher)
        if encoder_layers(student) != names:
            raise ValueError(f"LayerDistillation: the student's encoder layers {encoder_layers(student)} are not the "
                             f"teacher's {names}: layer i is matched with layer i")
        self.teacher, self.pad_id = teacher.eval(), pad_id  # a fixed target: no dropout
        self._student_states: dict[str, Tensor] = {}
        self._teacher_states: dict[str, Tensor] = {}
        self._hooks = [module.get_submodule(name).register_forward_hook(self._keeper(states, name, module is student))
                       for module, states in ((student, self._student_states), (teacher, self._teacher_states)) for name in names]
        self.layers = names

    @staticmethod
    def _keeper(states: dict[str, Tensor], name: str, only_with_grad: bool):
        def keep(module, inputs, output) -> None:
            if torch.is_grad_enabled() or not only_with_grad:  # the student's evaluations (no_grad) are not kept
                states[name] = _first_tensor(output)
        return keep

    def __call__(self, input_ids: Tensor) -> Tensor:
        if not self._student_states:
            raise RuntimeError("LayerDistillation: call it after the student's forward on the same input_ids")
        with torch.no_grad():
            self.teacher(input_ids)
        is_token = (input_ids != self.pad_id).unsqueeze(-1)
        total = 0.0
        for name in self.layers:
            student, teacher = self._student_states.pop(name), self._teacher_states.pop(name)
            if student.shape != teacher.shape:
                raise ValueError(f"LayerDistillation: layer {name!r} gives {tuple(student.shape)} in the student and "
                                 f"{tuple(teacher.shape)} in the teacher; call it with the student's last input_ids")
            squared = (student - teacher).pow(2) * is_token.to(student.dtype)
            total = total + squared.sum() / (is_token.sum().clamp_min(1) * student.shape[-1])
        return total / len(self.layers)

    def remove(self) -> None:
        """Take the hooks off both models, and drop the hidden states they kept."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._student_states.clear()
        self._teacher_states.clear()


# ---- a target shape for decoders (Sheared-LLaMA): every layer the same, so a stock config describes the pruned model
