"""A target architecture for a decoder (Sheared-LLaMA): the shape, the per-layer controller, and pruning to a stock config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.ops import fused_head_layout, weight_widths
from .rules import decoder_attention, decoder_attention_all, decoder_feed_forward, linear_children


@dataclass(frozen=True)
class DecoderShape:
    """The shape every decoder layer is pruned to: query heads, key/value heads and feed-forward units, the residual
    stream's width and the number of layers kept whole (``None``: as the model has it). The pruned model's config then
    says it in its own keys (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``,
    ``hidden_size``, ``num_hidden_layers``), which plain ``transformers`` loads."""

    heads: int | None = None
    kv_heads: int | None = None
    intermediate_size: int | None = None
    hidden_size: int | None = None  # the residual stream's width: needs gate_decoder_hidden
    layers: int | None = None  # decoder layers kept whole: needs decoder_rules(model, blocks=True)


@dataclass
class _ShapedLayer:
    """The gates of one layer that a shape counts: a head gate (per query head or per key/value group) or a unit gate."""

    name: str
    gate: object  # l0sparse.Gate
    kind: str  # "heads", "groups" (one gate per key/value group), "units", "hidden" (the residual stream's dimensions)
    # or "layers" (every decoder layer's two block gates: a _LayerGates)
    heads: int = 0  # query heads and key/value heads of the attention module (0 for units)
    kv_heads: int = 0


def _shaped_layers(model: nn.Module) -> list[_ShapedLayer]:
    """The head and unit gates of a model gated by :func:`decoder_rules`, one record per module, in model order."""
    from ..core.stream import hidden_gate
    from ..core.ops import head_layouts
    from ..core.sites import gate_masks

    layouts = head_layouts(model)
    units = set(decoder_feed_forward(model, decoder_attention_all(model)))
    layers = []
    for name, _, _, mask in gate_masks(model):
        gate, granularity = mask.gate, getattr(mask.gate, "granularity", None)
        if granularity == "heads" and gate.owner in layouts:
            layout = layouts[gate.owner]
            heads, kv_heads = layout["heads"], layout.get("kv_heads", layout["heads"])
            kind = "heads" if gate.log_alpha.numel() == heads else "groups"
            layers.append(_ShapedLayer(gate.owner, gate, kind, heads, kv_heads))
        elif granularity == "in" and name in units:
            layers.append(_ShapedLayer(name, gate, "units"))
    hidden = hidden_gate(model)
    if hidden is not None:
        layers.append(_ShapedLayer(hidden.owner, hidden, "hidden"))
    blocks = _layer_gates(model)
    if blocks is not None:
        layers.append(_ShapedLayer(blocks.list_name, blocks, "layers"))
    return layers


class _LayerGates:
    """The block gates of every decoder layer (``decoder_rules(model, blocks=True)``: one on the attention block, one on
    the feed-forward block), read as one gate per layer, as a shape counts layers: a layer stays while both of its
    blocks do, and goes (``prune_to_shape`` drops it from the model) when both are closed."""

    def __init__(self, list_name: str, pairs: list[tuple[object, object]]) -> None:
        self.list_name, self.pairs = list_name, pairs
        self.gamma, self.zeta = pairs[0][0].gamma, pairs[0][0].zeta

    @property
    def log_alpha(self) -> Tensor:
        """Per layer, the mean log α of its two block gates (what ranks the layers)."""
        return torch.stack([(first.log_alpha.detach() + second.log_alpha.detach()).reshape(()) / 2 for first, second in self.pairs])

    def prob_nonzero(self) -> Tensor:
        """Per layer, the mean probability of its two blocks being open: its expected share of a kept layer."""
        return torch.stack([(first.prob_nonzero() + second.prob_nonzero()).reshape(()) / 2 for first, second in self.pairs])

    def is_open(self) -> Tensor:
        return torch.stack([(first.is_open() & second.is_open()).reshape(()) for first, second in self.pairs])

    def per_gate(self, keep: Tensor) -> list[tuple[object, Tensor]]:
        """(block gate, whether it stays) for both gates of every layer."""
        return [(gate, keep[index:index + 1]) for index, pair in enumerate(self.pairs) for gate in pair]


def _layer_gates(model: nn.Module) -> _LayerGates | None:
    """The decoder layers' block gates, when every layer of one ``nn.ModuleList`` has two: one on its attention block
    and one on its feed-forward block (else None: a shape cannot count layers). Found from the block gates' owners, so
    any family whose blocks ``decoder_rules(model, blocks=True)`` gates is covered."""
    from ..core.sites import gate_masks

    lists = {name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)}
    blocks: dict[tuple[str, int], list] = {}
    for _, _, _, mask in gate_masks(model):
        gate = mask.gate
        if getattr(gate, "granularity", None) != "block":
            continue
        parts = (gate.owner or "").split(".")
        layer = next(((".".join(parts[:i]), int(parts[i])) for i in range(len(parts) - 1, 0, -1)
                      if parts[i].isdigit() and ".".join(parts[:i]) in lists), None)
        if layer is not None and all(gate is not other for other in blocks.setdefault(layer, [])):
            blocks[layer].append(gate)
    list_names = {name for name, _ in blocks}
    if len(list_names) != 1:
        return None
    list_name = next(iter(list_names))
    count = len(model.get_submodule(list_name))
    if sorted(index for _, index in blocks) != list(range(count)) or any(len(gates) != 2 for gates in blocks.values()):
        return None
    return _LayerGates(list_name, [tuple(blocks[(list_name, index)]) for index in range(count)])


def _gates_to_set(layer: _ShapedLayer, keep: Tensor) -> list[tuple[object, Tensor]]:
    """(gate, which of its entries stay) for the gates that carry ``layer``'s selection."""
    return layer.gate.per_gate(keep) if layer.kind == "layers" else [(layer.gate, keep)]


def _check_shape(layers: list[_ShapedLayer], shape: DecoderShape) -> dict[str, int]:
    """The shape's targets per counted dimension (``heads``, ``kv_heads``, ``units``), checked against every layer."""
    if not isinstance(shape, DecoderShape):
        raise TypeError(f"shape must be an l0sparse.hf.DecoderShape, got {type(shape).__name__}")
    for field_name in ("heads", "kv_heads", "intermediate_size", "hidden_size", "layers"):
        value = getattr(shape, field_name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"DecoderShape.{field_name} must be a positive int or None, got {value!r}")
    attention = [layer for layer in layers if layer.kind in ("heads", "groups")]
    units = [layer for layer in layers if layer.kind == "units"]
    targets: dict[str, int] = {}
    if shape.heads is not None or shape.kv_heads is not None:
        if not attention:
            raise ValueError("the shape names heads, but the model has no head gates: gate it with sparsify(model, decoder_rules(model))")
        for layer in attention:
            heads, kv_heads = _head_targets(layer, shape)
            targets.setdefault("heads", heads)
            targets.setdefault("kv_heads", kv_heads)
    if shape.intermediate_size is not None:
        if not units:
            raise ValueError("the shape names intermediate_size, but the model has no feed-forward unit gates: gate it with "
                             "sparsify(model, decoder_rules(model))")
        widest = min(layer.gate.log_alpha.numel() for layer in units)
        if shape.intermediate_size > widest:
            raise ValueError(f"DecoderShape.intermediate_size={shape.intermediate_size} is more than the {widest} units a layer has")
        targets["units"] = shape.intermediate_size
    if shape.hidden_size is not None:
        stream = [layer for layer in layers if layer.kind == "hidden"]
        if not stream:
            raise ValueError("the shape names hidden_size, but the model has no hidden gate: attach one with "
                             "l0sparse.hf.gate_decoder_hidden(model, example_inputs)")
        if shape.hidden_size > stream[0].gate.log_alpha.numel():
            raise ValueError(f"DecoderShape.hidden_size={shape.hidden_size} is more than the stream's {stream[0].gate.log_alpha.numel()} dimensions")
        targets["hidden"] = shape.hidden_size
    if shape.layers is not None:
        targets["layers"] = _layer_target(layers, shape.layers)
    if not targets:
        raise ValueError("the shape names nothing to prune: give heads, kv_heads, intermediate_size, hidden_size or layers")
    return targets


def _layer_target(layers: list[_ShapedLayer], count: int) -> int:
    """The shape's number of layers, checked against the model's layers and their block gates."""
    blocks = [layer for layer in layers if layer.kind == "layers"]
    if not blocks:
        raise ValueError("the shape names layers, but the model's decoder layers have no block gates on both their attention "
                         "and feed-forward blocks: gate it with sparsify(model, decoder_rules(model, blocks=True))")
    if count > len(blocks[0].gate.pairs):
        raise ValueError(f"DecoderShape.layers={count} is more than the {len(blocks[0].gate.pairs)} layers of {blocks[0].name!r}")
    return count


def _head_targets(layer: _ShapedLayer, shape: DecoderShape) -> tuple[int, int]:
    """(query heads, key/value heads) that ``shape`` leaves in one attention layer, the one it does not name completed
    from the layer's grouping; refused where the layer cannot take them."""
    per_group = layer.heads // layer.kv_heads
    if shape.kv_heads is not None:
        kv_heads = shape.kv_heads
    elif per_group == 1:  # multi-head attention: a key/value head per query head
        kv_heads = shape.heads
    elif layer.kind == "groups":  # each group keeps all its query heads
        kv_heads = shape.heads // per_group if shape.heads % per_group == 0 else shape.heads / per_group
    else:  # query heads only: every group stays
        kv_heads = layer.kv_heads
    heads = shape.heads if shape.heads is not None else kv_heads * per_group
    if kv_heads > layer.kv_heads or heads > layer.heads:
        raise ValueError(f"the shape ({heads} heads, {kv_heads} key/value heads) is larger than {layer.name!r} "
                         f"({layer.heads} heads, {layer.kv_heads} key/value heads)")
    if not isinstance(kv_heads, int) or heads % kv_heads or not 1 <= heads // kv_heads <= per_group:
        raise ValueError(f"the shape's {heads} heads cannot be shared equally by {kv_heads} key/value heads of at most "
                         f"{per_group} query heads each ({layer.name!r}); give kv_heads so that heads / kv_heads is a whole "
                         f"number from 1 to {per_group}")
    if layer.kind == "groups" and heads != kv_heads * per_group:
        raise ValueError(f"{layer.name!r} has one gate per key/value group of {per_group} query heads, so {kv_heads} groups "
                         f"keep {kv_heads * per_group} heads, not {heads}: gate it with decoder_rules(model) (per query head) "
                         "to choose heads within groups")
    return heads, kv_heads


def _layer_counts(layer: _ShapedLayer, open_probability: Tensor) -> dict[str, Tensor]:
    """Heads, key/value heads or units of one layer, given each gate's probability of being open (0/1: what prune keeps
    before a shape's selection)."""
    if layer.kind in ("units", "hidden", "layers"):
        return {layer.kind: open_probability.sum()}
    per_group = layer.heads // layer.kv_heads
    if layer.kind == "groups":
        groups = open_probability.sum()
        return {"heads": groups * per_group, "kv_heads": groups}
    # a key/value head is kept while any of its query heads is; independent gates
    groups = (1 - (1 - open_probability.view(layer.kv_heads, per_group)).prod(1)).sum()
    return {"heads": open_probability.sum(), "kv_heads": groups}


class ShapeController(nn.Module):
    """Sheared-LLaMA's constraints: one multiplier pair per layer and per dimension of a :class:`DecoderShape`, steering
    each layer's expected heads, key/value heads and feed-forward units to the shape.

    ``penalty()`` is Σ λ1·(ŝ − t) + λ2·(ŝ − t)² over layers and dimensions, ŝ the layer's expected count and t the
    target (both as fractions of the layer's full count), the target moving linearly from the full count to the shape
    over ``warmup_steps``; ``step()`` moves the multipliers by gradient ascent (Adam, ``lr``), so λ1 takes either sign:
    the constraint is an equality, as in Sheared-LLaMA. A λ1 whose sign is against its gap (it integrated while the
    count was on the other side, and now pushes it further past the target) is reset to 0 (``anti_windup=False``:
    Sheared-LLaMA's plain ascent, whose counts swing far past the target: benchmarks/shape_controller.py). Add
    ``penalty()`` to the loss and call ``step()`` after the model's optimizer step; :func:`prune_to_shape` then keeps
    exactly the shape, by log α.

    Landing (``landing=True``): once the schedule has reached the shape, every ``step()`` moves the fewest log α across
    the test-time threshold so that each layer's open gates are exactly the shape's selection (prune_to_shape's). The
    expected counts alone left the test-time gates far from the shape, so that the cut closed gates the model was
    still using (held-out perplexity 3.2 before the cut, 8 to 37 after, in benchmarks/decoder_shear.py).
    """

    def __init__(self, model: nn.Module, shape: DecoderShape, warmup_steps: int = 0, lr: float = 0.01, anti_windup: bool = True,
                 landing: bool = True) -> None:
        super().__init__()
        for name, value in (("anti_windup", anti_windup), ("landing", landing)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.anti_windup, self.landing = anti_windup, landing
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self._layers = _shaped_layers(model)
        self.targets = _check_shape(self._layers, shape)
        self.shape, self.warmup_steps = shape, warmup_steps
        self._terms = [(index, dimension) for index, layer in enumerate(self._layers) for dimension in self._full(layer)
                       if dimension in self.targets]
        device = self._layers[0].gate.log_alpha.device
        self.lambda_1 = nn.Parameter(torch.zeros(len(self._terms), device=device))
        self.lambda_2 = nn.Parameter(torch.zeros(len(self._terms), device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))
        self.optimizer = torch.optim.Adam([self.lambda_1, self.lambda_2], lr=lr, maximize=True)

    @staticmethod
    def _full(layer: _ShapedLayer) -> dict[str, int]:
        if layer.kind in ("units", "hidden", "layers"):
            return {layer.kind: layer.gate.log_alpha.numel()}
        if layer.heads == layer.kv_heads:  # multi-head: one count, one constraint
            return {"heads": layer.heads}
        return {"heads": layer.heads, "kv_heads": layer.kv_heads}

    def expected_counts(self) -> list[dict[str, Tensor]]:
        """Per layer (model order), its expected heads, key/value heads or units (differentiable in log α)."""
        return [_layer_counts(layer, layer.gate.prob_nonzero()) for layer in self._layers]

    @torch.no_grad()
    def _land(self) -> None:
        """Move the fewest log α across the test-time threshold so that every layer's open gates are the shape's
        selection (:func:`prune_to_shape`'s: the top log α): the model trains on, and is cut to, the same structure."""
        for layer in self._layers:
            if not any(dimension in self.targets for dimension in self._full(layer)):
                continue
            opening = _opening(layer.gate)
            closing = opening - 2e-2  # just below the threshold: test-time gate 0
            for gate, keep in _gates_to_set(layer, _select(layer, self.targets)):
                gate.log_alpha.copy_(torch.where(keep.view_as(gate.log_alpha), gate.log_alpha.clamp(min=opening),
                                                 gate.log_alpha.clamp(max=closing)))

    @torch.no_grad()
    def deterministic_counts(self) -> list[dict[str, Tensor]]:
        """Per layer, the heads, key/value heads or units whose test-time gate (Eq. 13) is open: what prune keeps."""
        return [_layer_counts(layer, layer.gate.is_open().float()) for layer in self._layers]

    def _gaps(self) -> Tensor:
        """ŝ − t per (layer, dimension) term, as fractions of the layer's full count (ŝ the expected count)."""
        progress = 1.0 if self.warmup_steps == 0 else min(1.0, int(self.steps) / self.warmup_steps)
        counts = self.expected_counts()
        gaps = []
        for index, dimension in self._terms:
            full = self._full(self._layers[index])[dimension]
            target = 1.0 + progress * (self.targets[dimension] / full - 1.0)
            gaps.append(counts[index][dimension] / full - target)
        return torch.stack(gaps)

    def penalty(self) -> Tensor:
        """Σ λ1·gap + λ2·gap²: add it to the loss (its gradient reaches log α; the multipliers move in :meth:`step`)."""
        gaps = self._gaps()
        self._last_gaps = gaps.detach()
        return (self.lambda_1.detach() * gaps + self.lambda_2.detach() * gaps * gaps).sum()

    def step(self) -> None:
        """Gradient ascent on the multipliers by the last :meth:`penalty`'s gaps, then advance the schedule."""
        gaps = getattr(self, "_last_gaps", None)
        if gaps is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.lambda_1.grad, self.lambda_2.grad = gaps.clone(), gaps * gaps
            self.optimizer.step()
            if self.landing and int(self.steps) + 1 >= self.warmup_steps:
                self._land()
            if self.anti_windup:  # a λ1 that pushes past the target (its sign against the gap's) restarts at 0
                with torch.no_grad():
                    past = self.lambda_1 * gaps < 0
                    self.lambda_1[past] = 0.0
                    state = self.optimizer.state.get(self.lambda_1, {})
                    if "exp_avg" in state:
                        state["exp_avg"][past] = 0.0
        self.steps += 1


def _opening(gate) -> float:
    """The smallest log α whose test-time gate (Eq. 13) is above zero, plus a margin: σ(log α) > −γ / (ζ − γ)."""
    threshold = -gate.gamma / (gate.zeta - gate.gamma)
    return math.log(threshold / (1 - threshold)) + 1e-2


@torch.no_grad()
def _select(layer: _ShapedLayer, targets: dict[str, int], scores: Tensor | None = None) -> Tensor:
    """Which gates of ``layer`` stay open for the shape: the top units by log α (or ``scores``); the top key/value
    groups (by the summed log α of the query heads they would keep), and in each the top query heads."""
    log_alpha = layer.gate.log_alpha.detach() if scores is None else scores.detach().to(layer.gate.log_alpha.device).float()
    keep = torch.zeros(log_alpha.numel(), dtype=torch.bool, device=log_alpha.device)
    if layer.kind in ("units", "hidden", "layers"):
        keep[torch.topk(log_alpha, targets[layer.kind]).indices] = True
        return keep
    if layer.kind == "groups":
        keep[torch.topk(log_alpha, targets["kv_heads"]).indices] = True
        return keep
    per_group = layer.heads // layer.kv_heads
    each = targets["heads"] // targets["kv_heads"]
    grouped = log_alpha.view(layer.kv_heads, per_group)
    best = torch.topk(grouped, each, dim=1)
    for group in torch.topk(best.values.sum(1), targets["kv_heads"]).indices.tolist():
        keep[group * per_group + best.indices[group]] = True
    return keep


def prune_to_shape(model: nn.Module, example_inputs, shape: DecoderShape, scores: Mapping[str, Tensor] | None = None) -> nn.Module:
    """``model`` (gated by :func:`decoder_rules`) pruned to exactly ``shape`` in every layer, with a stock config.

    In each layer the gates with the largest log α are kept (:class:`ShapeController` trains them to the shape first)
    and the rest closed; a kept gate whose test-time value is 0 is opened just above 0 (its unit stays, nearly silent,
    for continued training). The result is ``prune`` of that selection, so its logits are those of the gated model
    with the selection's gates, and its config holds the shape (``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``intermediate_size``): ``save_pretrained`` writes it and ``AutoModelForCausalLM.from_pretrained``
    loads it without l0sparse. ``model`` is left as it was.

    ``scores`` ranks by other numbers than log α (an importance baseline): per shaped module (an attention module's
    name: one score per query head, or per group under ``decoder_rules(groups=True)``; a down projection's name: one
    per unit), the larger kept.
    """
    import copy

    from ..core.prune import prune

    layers = _shaped_layers(model)
    targets = _check_shape(layers, shape)
    scores = dict(scores or {})
    for layer in layers:
        given = scores.get(layer.name)
        if given is not None and (not isinstance(given, Tensor) or given.shape != layer.gate.log_alpha.shape):
            raise ValueError(f"scores[{layer.name!r}] must be a tensor of shape {tuple(layer.gate.log_alpha.shape)} (one per gate), "
                             f"got {getattr(given, 'shape', type(given).__name__)}")
    unknown = sorted(set(scores) - {layer.name for layer in layers})
    if unknown:
        raise ValueError(f"scores names {unknown[0]!r}, which is no gated attention module or down projection; "
                         f"they are {[layer.name for layer in layers]}")
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"prune_to_shape writes the shape into a Hugging Face config; {type(model).__name__} has none")
    # a family whose forward reads head_dim from the config (Phi-3: hf.fused) takes it written out, where it had none
    reads_head_dim = any("head_dim" in layout.get("shared", {}) for name, module in model.named_modules()
                         if (layout := fused_head_layout(name, module)) is not None)
    keys = _config_keys(config, targets, reads_head_dim)
    _check_embedding_scale(model, targets)
    work = copy.deepcopy(model)
    for layer, copied in zip(layers, _shaped_layers(work)):
        if not any(dimension in targets for dimension in ShapeController._full(layer)):
            continue
        for gate, keep in _gates_to_set(copied, _select(layer, targets, scores.get(layer.name))):
            log_alpha = gate.log_alpha.data
            log_alpha.copy_(torch.where(keep.view_as(log_alpha), log_alpha.clamp(min=_opening(gate)), torch.full_like(log_alpha, -30.0)))
    if "layers" in targets:  # before prune: a closed attention block would keep one head, where a config may share the count
        layers = _drop_closed_layers(work, layers, example_inputs)
    pruned = prune(work.eval(), example_inputs)
    widths = _pruned_widths(pruned, layers)
    for dimension, target in targets.items():
        found = {width[dimension] for width in widths if dimension in width}
        if found and found != {target}:  # the selection is uniform by construction: anything else is a bug
            raise RuntimeError(f"prune_to_shape: layers kept {sorted(found)} {dimension}, not {target}; please report it")
    for dimension, key in keys.items():
        setattr(pruned.config, key, targets[dimension] if dimension in targets else getattr(config, key, getattr(pruned.config, key, None)))
    if getattr(pruned.config, "pruned_heads", None):
        pruned.config.pruned_heads = {}  # the config's own counts now say what is left
    return pruned


def _check_embedding_scale(model: nn.Module, targets: dict[str, int]) -> None:
    """Refuse a narrower stream where the token embedding scales by √hidden_size (Gemma's ``embed_scale``) or the
    language-model head's input by ``d_model ** -0.5`` (T5's ``scale_decoder_outputs``): a stock config sets that scale
    from ``hidden_size`` when it loads, so the loaded model would compute something else."""
    table = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if "hidden" in targets and getattr(getattr(model, "config", None), "scale_decoder_outputs", False) is True:
        raise ValueError(f"{type(model).__name__} scales the language-model head's input by d_model ** -0.5 (its config's "
                         "scale_decoder_outputs), and a stock config sets d_model from hidden_size when it loads: a narrower stream "
                         "would load with another scale. Leave hidden_size out of the shape, or prune with l0sparse.prune (the "
                         "scale is kept) and reload through l0sparse.rebuild")
    if "hidden" not in targets or getattr(table, "embed_scale", None) is None:
        return
    name = next(name for name, m in model.named_modules() if m is table)
    raise ValueError(f"{name!r} ({type(table).__name__}) scales by the square root of hidden_size, which a stock config sets "
                     "from hidden_size when it loads: a narrower stream would load with another scale. Leave hidden_size out "
                     "of the shape, or prune with l0sparse.prune (the scale is kept) and reload through l0sparse.rebuild")


def _config_keys(config, targets: dict[str, int], reads_head_dim: bool = False) -> dict[str, str]:
    """The config keys a shape is written to, refused where the config cannot say it (``reads_head_dim``: the model's
    forward reads ``config.head_dim`` where the config has one, so it may be written out)."""
    keys: dict[str, str] = {}
    if "heads" in targets or "hidden" in targets:
        derived = isinstance(getattr(type(config), "head_dim", None), property)  # FalconConfig: hidden_size // num_attention_heads
        if derived or not isinstance(getattr(config, "head_dim", None), int) and not reads_head_dim:  # read as width / heads
            why = "computes head_dim from hidden_size and num_attention_heads" if derived else "has no head_dim"
            raise ValueError(f"{type(config).__name__} {why}: a stock config cannot describe fewer heads or a narrower "
                             "stream with heads of the same width; prune the feed-forward units only "
                             "(DecoderShape(intermediate_size=...)) or use l0sparse.prune")
        keys["head_dim"] = "head_dim"
    if "heads" in targets:
        keys["heads"] = "num_attention_heads"
    if "hidden" in targets:
        keys["hidden"] = "hidden_size"
    if "kv_heads" in targets:
        keys["kv_heads"] = "num_key_value_heads"
    if "layers" in targets:
        if not isinstance(getattr(config, "num_hidden_layers", None), int):
            raise ValueError(f"{type(config).__name__} has no num_hidden_layers to write the layers to")
        keys["layers"] = "num_hidden_layers"
    if "units" in targets:
        key = next((key for key in ("intermediate_size", "ffn_dim", "n_inner", "d_ff") if isinstance(getattr(config, key, None), int)), None)
        if key is None:
            raise ValueError(f"{type(config).__name__} has no intermediate_size (nor ffn_dim, n_inner, d_ff) to write the units to")
        keys["units"] = key
    return keys


def _pruned_widths(pruned: nn.Module, layers: list[_ShapedLayer]) -> list[dict[str, int]]:
    """Per shaped layer, the heads, key/value heads or units the pruned model kept."""
    widths = []
    for layer in layers:
        if layer.kind == "hidden":
            widths.append({"hidden": pruned.get_input_embeddings().embedding_dim})
            continue
        if layer.kind == "layers":
            continue  # counted when the closed layers are dropped
        module = pruned.get_submodule(layer.name)
        if layer.kind == "units":
            widths.append({"units": weight_widths(module)[1]})  # a Linear's in_features, a Conv1D's nx
            continue
        fused = fused_head_layout(layer.name, module)  # fused projections (hf.fused): the counts the pruned module's layout says
        if fused is not None:
            widths.append({"heads": fused["heads"], "kv_heads": fused["kv_heads"]})
            continue
        queries, projection = decoder_attention(module)
        head_dim = getattr(module, "head_dim", None) or queries.out_features // layer.heads
        kv = next(m for m in linear_children(module) if m is not queries and m is not projection)
        widths.append({"heads": queries.out_features // head_dim, "kv_heads": kv.out_features // head_dim})
    return widths


@torch.no_grad()
def _drop_closed_layers(work: nn.Module, layers: list[_ShapedLayer], example_inputs) -> list[_ShapedLayer]:
    """Remove from the gated copy ``work`` the decoder layers whose two blocks the selection closed, renumbering the rest:
    their place in the list, the owners their gates name, their ``layer_idx`` (the KV cache's index) and the config's
    per-layer lists. Refused where a closed layer still changes the output (an output bias): a stock config cannot keep
    a layer that is only a bias. Returns ``layers`` (the shaped records) without the dropped ones, renamed."""
    from ..core.graph import evaluating, example_tuple
    from ..core.sites import find_gates

    batch = example_tuple(example_inputs, "prune_to_shape")
    blocks = next(layer for layer in _shaped_layers(work) if layer.kind == "layers")
    kept = [index for index, is_open in enumerate(blocks.gate.is_open().tolist()) if is_open]
    owner_name, _, attribute = blocks.name.rpartition(".")
    owner, layer_list = work.get_submodule(owner_name), work.get_submodule(blocks.name)
    with evaluating(work):
        before = _logits(work(*batch, **batch.kwargs))
        setattr(owner, attribute, nn.ModuleList([layer_list[index] for index in kept]))
        for new_index, old_index in enumerate(kept):
            for module in layer_list[old_index].modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        work.config.num_hidden_layers = len(kept)
        if isinstance(getattr(work.config, "layer_types", None), list):
            work.config.layer_types = [work.config.layer_types[index] for index in kept]
        after = _logits(work(*batch, **batch.kwargs))
    if before.shape != after.shape or float((before - after).abs().max()) > 1e-4 * max(float(before.abs().max()), 1e-30):
        closed = [f"{blocks.name}.{index}" for index in range(len(layer_list)) if index not in kept]
        raise ValueError(f"prune_to_shape: the closed layers {closed} still change the output (an output bias of a closed block, "
                         f"{type(layer_list[0]).__name__}): a stock config cannot hold them; leave layers out of the shape or "
                         "use l0sparse.prune")
    renamed = {f"{blocks.name}.{old}.": f"{blocks.name}.{new}." for new, old in enumerate(kept)}

    def rename(name: str) -> str | None:  # None: inside a dropped layer
        prefix = next((prefix for prefix in renamed if name.startswith(prefix)), None)
        if prefix is not None:
            return renamed[prefix] + name[len(prefix):]
        return None if name.startswith(blocks.name + ".") else name

    for gate in find_gates(work):
        gate.owner = rename(gate.owner or "") or gate.owner
    return [_ShapedLayer(rename(layer.name), layer.gate, layer.kind, layer.heads, layer.kv_heads) for layer in layers
            if layer.kind != "layers" and rename(layer.name) is not None]


def _logits(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
