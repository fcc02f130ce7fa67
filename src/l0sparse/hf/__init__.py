"""Hugging Face transformers under l0sparse (the optional ``hf`` extra).

One module a purpose:

- ``rules``: where gates go, found by structure (:func:`encoder_rules`, :func:`decoder_rules`);
- ``fused``: which rows of a fused q/k/v or gate/up projection are whose (GPT-NeoX, Phi-3, GPT-2), as rules registered on import;
- ``linears``: transformers' ``Conv1D`` (GPT-2, a transposed weight) and ``FalconLinear`` as the Linear layers they are,
  rules registered on import;
- ``hidden``: the hidden-size gate of a residual stream (:func:`gate_hidden` for BERT-like encoders,
  :func:`gate_decoder_hidden` for pre-norm decoders);
- ``shapes``: a target architecture for a decoder (:class:`DecoderShape`, :class:`ShapeController`,
  :func:`prune_to_shape`);
- ``callback``: :class:`L0Callback` for a user's own ``transformers.Trainer``;
- ``distill``: layer-wise distillation from a teacher (:class:`LayerDistillation`);
- ``task``: the MiniLM sentence classifier the command trains, its tokenizer and batch helpers.

transformers itself is imported only where a function needs it.
"""

from .distill import LayerDistillation, encoder_layers
from .fused import register_fused_rules
from .linears import register_linear_rules
from .hidden import gate_decoder_hidden, gate_hidden
from .rules import decoder_rules, encoder_rules
from .shapes import DecoderShape, ShapeController, prune_to_shape
from .task import (MINILM_PACKAGE, SentenceClassifier, build_minilm, encoder_flops, load_tokenizer, minilm_path, predict_logits, token_lengths,
                   trim_padding)


__all__ = ["MINILM_PACKAGE", "minilm_path", "load_tokenizer", "SentenceClassifier", "build_minilm", "encoder_rules", "decoder_rules",
           "trim_padding", "token_lengths", "predict_logits", "encoder_layers", "LayerDistillation", "encoder_flops", "gate_hidden",
           "gate_decoder_hidden", "DecoderShape", "ShapeController", "prune_to_shape", "L0Callback"]

register_fused_rules()  # the fused q/k/v and gate/up layouts of GPT-NeoX, Phi-3 and GPT-2 (hf.fused), matched by class name
register_linear_rules()  # transformers' Conv1D (GPT-2: a transposed weight) and FalconLinear as Linear layers (hf.linears)


def __getattr__(name: str):
    """``L0Callback`` subclasses ``transformers.TrainerCallback``: made when first asked for (transformers is optional)."""
    if name == "L0Callback":
        from .callback import L0Callback
        return L0Callback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
