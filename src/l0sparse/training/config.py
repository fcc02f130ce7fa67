"""The training configuration: a TOML file, checked in full before anything runs."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..core.control import LANDINGS, METRICS
from .data import DATASETS
from .files import read_json, regular_file

__all__ = ["TrainConfig", "load_config", "config_from_dict", "read_config_json", "MODELS"]

MODELS = ("mlp", "lenet5", "minilm")
SEED_MAX = 2**32 - 1  # numpy's random states take [0, 2**32 - 1]; torch's generators take more
INT64_MAX = 2**63 - 1  # torch sizes are int64: a larger batch_size overflowed in torch with no key named
# a hidden width of 2**24 on the smallest input (40 features) is already 2.7 GB of float32 weights in one layer
WIDTH_MAX = 2**24
TARGET_MODES = ("exact", "ceiling")  # the controller chooses λ to land on target, or caps a fixed-λ run's size at it
INITS = ("torch", "paper")  # the weights' initialisation: torch.nn's, or the paper's code's (Kaiming normal, zero bias)
REGULARIZER_CHOICES = ("l0", "none", "magnitude", "importance", "l1", "group_l1", "l2")
# regularizer = "importance": which baseline (docs/hf.md, "The baselines"). A config.json without the key was written
# before issue #26, when "importance" was the second one: read_config_json reads it so
IMPORTANCE_CHOICES = ("taylor", "heads-magnitude-units")
# regularizer = "l0" with a target: where the gates start. "open": every gate at droprate_init (the paper's start);
# "taylor": the strong baseline's choice at the target, kept gates at droprate_init and the rest at its mirror image
# (nearly shut, free to reopen), so that L0 refines that structure instead of finding one from scratch (issue #26)
GATE_STARTS = ("open", "taylor")


@dataclass
class TrainConfig:
    """Every key a training config may set, with its default.

    ``lam`` is the paper's λ per weight; the objective divides it by N, the
    training-set size ("λ = 0.1/N" is ``lam = 0.1``). Give ``target`` (a
    fraction in (0, 1] of ``metric``) instead to let a TargetController
    choose λ; with ``target_mode = "ceiling"`` λ stays ``lam`` and the
    target is a budget: from ``delay + warmup`` of the run on, the controller keeps
    the pruned size at or under it. ``delay`` (a fraction of the run) holds
    the target at the starting size before the ``warmup`` begins: the units
    are chosen on a network that has trained for that long. ``landing``
    (``"schedule"`` or ``"target"``) is the controller's: whether it closes
    gates to follow the schedule at every step or only once the target is
    reached, leaving the warm-up to the penalty. ``regularizer = "none"`` trains the same architecture dense;
    ``"magnitude"`` trains it dense for ``epochs``, removes the units and
    channels of smallest L1 norm down to ``target`` of the FLOPs, and
    fine-tunes for ``epochs`` more (the baseline). ``"l1"``, ``"group_l1"``
    and ``"l2"`` train it dense with that penalty of strength ``lam`` (per
    weight, divided by N, as for L0). An L1 or group-L1 run ends with the
    usual thresholding: weights (group RMS) below ``threshold`` are set to
    zero; by default the threshold is ``lr``, because Adam keeps a weight
    that L1 pins at zero oscillating within about one step size of it. L2
    is not thresholded: it shrinks without zeroing. The paper's code's
    settings: ``droprate_init`` as a list (one per gated layer: the paper
    starts the MLP's input gates at 0.2, the rest at 0.5),
    ``clamp_log_alpha = true``, ``init = "paper"`` (Kaiming-normal weights
    over the fan-in, zero biases), ``per_example_noise = false`` (one
    sample per minibatch, its default) and ``ema = 0.999`` (test accuracy,
    sizes and pruning use an exponential moving average of every
    parameter, log α included). ``conditional = true``
    computes only the open units (the paper's layers; see ``L0MLP``).

    Text: ``model = "minilm"`` (all-MiniLM-L6-v2 with a classification
    layer, :mod:`l0sparse.hf`) on ``data = "wordnet"``; its gates are the
    attention heads and feed-forward units of every layer. ``teacher`` is
    the directory of a finished run of the same model and data: the new run
    starts from its weights and learns from its logits (knowledge
    distillation: ``distill_weight`` · T² · KL(teacher ‖ student at
    temperature T = ``temperature``) + (1 − ``distill_weight``) ·
    cross-entropy). ``regularizer = "importance"`` is the structured
    importance-pruning baseline for it: gates removed down to ``target`` of
    the FLOPs before training, then trained (distilled) for ``epochs``.
    ``importance`` says how they are chosen: ``"taylor"`` (the default) scores
    heads and feed-forward units alike by the loss gradient of their mask
    (the first-order Taylor term |Σ W ∂L/∂W|) and ranks all of them in one
    pool by score per MAC; ``"heads-magnitude-units"`` (the baseline before
    issue #26, which a ``config.json`` without the key ran) scores heads by
    that gradient (Michel et al., 2019) and units by weight norm, normalised
    per layer, and keeps one fraction of each kind. ``distill_hidden`` > 0 adds a CoFi-style layer-wise
    term, that weight times the mean squared difference of the student's and
    the teacher's hidden states after every encoder layer
    (:class:`l0sparse.hf.LayerDistillation`; 0, logits only, by default; not
    with ``hidden_gate``). ``train_examples`` / ``test_examples`` use
    the first that many examples of the (shuffled) dataset.

    ``hidden_gate = true`` (model ``"minilm"``, regularizer ``"l0"`` or
    ``"importance"``) also gates the encoder's hidden size, one gate per
    dimension of the residual stream (:func:`l0sparse.hf.gate_hidden`,
    after the heads and feed-forward units; docs/hf.md, "The hidden-size
    gate"). Off by default.

    ``round_to`` is what ``l0sparse prune`` rounds every kept width up to a
    multiple of (:func:`l0sparse.prune`'s ``round_to``; the command's ``--round-to``
    overrides it): 1, no rounding, by default; the MiniLM recipes set 8.
    """

    model: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [300, 100])
    data: str = "fashion-mnist"
    regularizer: str = "l0"
    importance: str = "taylor"
    gate_start: str = "open"
    # regularizer = "importance": keep the gates another run left open instead of ranking (issue #26: L0's structure
    # trained as the baseline trains, to tell a structure's share of a result from its training's)
    structure_from: str | None = None
    settle: float = 0.0  # L0 with a target: the last fraction of the steps trains the weights under gates fixed as prune keeps them
    epochs: int = 200
    batch_size: int = 100
    lr: float = 1e-3
    gate_lr: float | None = None  # None: the weights' lr (one rate for everything measured best, docs/control.md)
    lam: float = 0.1
    target: float | None = None
    target_mode: str = "exact"
    metric: str = "flops"
    warmup: float = 0.5
    delay: float = 0.0
    landing: str = "schedule"
    controller_lr: float = 0.01
    weight_decay: float = 0.0
    droprate_init: float | list[float] = 0.5
    per_example_noise: bool = True
    clamp_log_alpha: bool = False
    init: str = "torch"
    ema: float = 0.0
    conditional: bool = False
    gates: str = "units"
    threshold: float | None = None
    teacher: str | None = None
    distill_weight: float = 0.5
    temperature: float = 2.0
    distill_hidden: float = 0.0
    train_examples: int | None = None
    test_examples: int | None = None
    round_to: int = 1
    hidden_gate: bool = False
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Check every key's value (:data:`_KEY_RULES`), then the keys that only go together; return the config."""
        # every value is read before the first error: one no check can read (data = [1], unhashable) fails as TypeError
        verdicts = [(key, accepts(getattr(self, key)), allowed) for key, accepts, allowed in _KEY_RULES]
        for key, ok, allowed in verdicts:
            if not ok:
                raise ValueError(f"config key {key!r} = {getattr(self, key)!r}: must be {allowed}")
        self._check_regularizer_keys()
        self._check_model_keys()
        return self

    def _check_regularizer_keys(self) -> None:
        """The keys that need a regularizer (a target controller, the paper's layers) or a target."""
        if self.delay and (self.target is None or self.regularizer != "l0"):
            raise ValueError(f"config key 'delay' = {self.delay!r}: delays the target controller's schedule, so it needs "
                             "regularizer = 'l0' and a target (target = 0.25)")
        if self.landing != "schedule" and (self.target is None or self.regularizer != "l0"):
            raise ValueError(f"config key 'landing' = {self.landing!r}: says when the target controller closes gates, so it "
                             "needs regularizer = 'l0' and a target (target = 0.25)")
        if self.delay + self.warmup > 1:
            raise ValueError(f"config keys 'delay' = {self.delay!r} and 'warmup' = {self.warmup!r}: the target is reached after "
                             "both, so together they must be at most 1 (the whole run)")
        if self.target_mode == "ceiling" and (self.target is None or self.regularizer != "l0"):
            raise ValueError("config key 'target_mode' = 'ceiling': a ceiling caps an L0 run's size at 'target' while 'lam' "
                             "chooses the model: needs regularizer = 'l0' and a target (target = 0.13)")
        if self.regularizer == "magnitude" and (self.target is None or self.metric != "flops"):
            raise ValueError("config key 'target': regularizer 'magnitude' needs a FLOPs target (target = 0.1, metric = 'flops')")
        if isinstance(self.droprate_init, list) and (self.regularizer != "l0" or self.gates != "units"):
            raise ValueError("config key 'droprate_init' = a list: one rate per layer needs regularizer = 'l0' with gates = 'units'")
        if self.conditional and (self.regularizer != "l0" or self.gates != "units"):
            raise ValueError("config key 'conditional' = true: needs regularizer = 'l0' with gates = 'units' (the paper's layers)")

    def _check_model_keys(self) -> None:
        """The keys that need a model (MiniLM's text, LeNet-5's images) or a teacher."""
        if self.regularizer == "importance" and (self.model != "minilm" or self.target is None or self.metric != "flops"):
            raise ValueError("config key 'regularizer' = 'importance': the head/unit importance baseline needs model = 'minilm' "
                             "and a FLOPs target (target = 0.5, metric = 'flops')")
        if (self.model == "minilm") != (self.data == "wordnet"):
            raise ValueError(f"config key 'data' = {self.data!r}: model 'minilm' reads text (data = 'wordnet'), and 'wordnet' "
                             f"needs model = 'minilm' (got model = {self.model!r})")
        if self.model == "minilm" and self.regularizer not in ("l0", "none", "importance"):
            raise ValueError(f"config key 'regularizer' = {self.regularizer!r}: model 'minilm' takes 'l0', 'none' or 'importance' "
                             "(the other baselines are built for the MLP and LeNet-5)")
        if self.settle and (self.regularizer != "l0" or self.target is None or self.target_mode != "exact"
                            or self.warmup + self.delay >= 1 - self.settle):
            raise ValueError(f"config key 'settle' = {self.settle!r}: the last steps with the gates fixed need regularizer = 'l0' "
                             "with an exact target, reached before they start (delay + warmup < 1 - settle; leave L0 steps at the target "
                             "for the gates to land)")
        if self.gate_start != "open" and (self.model != "minilm" or self.regularizer != "l0" or self.target is None
                                          or self.metric != "flops" or self.teacher is None):
            raise ValueError(f"config key 'gate_start' = {self.gate_start!r}: starts the gates of model 'minilm' from the importance "
                             "baseline's choice, so it needs regularizer = 'l0' with a FLOPs target and a teacher")
        if self.structure_from is not None and self.regularizer != "importance":
            raise ValueError(f"config key 'structure_from' = {self.structure_from!r}: keeps another run's open gates in place of the "
                             f"importance baseline's ranking, so it needs regularizer = 'importance' (got {self.regularizer!r})")
        if self.regularizer == "importance" and (self.teacher is None or self.clamp_log_alpha):
            raise ValueError("config key 'teacher': the importance baseline ranks the heads of a trained model and distils from it: "
                             "name its dense run (teacher = 'runs/...'); its gates are fixed, so clamp_log_alpha must stay false")
        if self.model == "minilm" and (self.gates != "units" or self.conditional or isinstance(self.droprate_init, list) or self.init != "torch"):
            raise ValueError("model 'minilm' is pretrained and gated by heads and feed-forward units: gates = 'units', "
                             "init = 'torch', conditional = false and one droprate_init")
        if self.hidden_gate and (self.model != "minilm" or self.regularizer not in ("l0", "importance")):
            raise ValueError(f"config key 'hidden_gate' = true: gates the hidden size of model 'minilm' trained with regularizer "
                             f"'l0' or 'importance' (got model = {self.model!r}, regularizer = {self.regularizer!r})")
        defaults = TrainConfig.__dataclass_fields__
        distillation = ("distill_weight", "temperature", "distill_hidden")
        if self.teacher is None and any(getattr(self, key) != defaults[key].default for key in distillation):
            raise ValueError("config keys 'distill_weight', 'temperature' and 'distill_hidden' weigh the distillation from a "
                             "teacher: set teacher = 'runs/...' (a dense run) or leave them out")
        if self.distill_hidden and self.hidden_gate:
            raise ValueError(f"config key 'distill_hidden' = {self.distill_hidden!r}: matches the student's hidden states with the "
                             "teacher's, dimension by dimension, which a gated hidden size cannot follow: set hidden_gate = false "
                             "or distill_hidden = 0")
        if self.teacher is not None and self.model != "minilm":
            raise ValueError(f"config key 'teacher': distillation is built for model = 'minilm', not {self.model!r}")
        if self.model == "lenet5" and self.data not in ("fashion-mnist", "mnist-5k"):
            raise ValueError(f"config key 'data' = {self.data!r}: model 'lenet5' needs 28×28 images (fashion-mnist or mnist-5k)")

    def check_read(self, keys: Iterable[str] | None = None) -> TrainConfig:
        """Refuse a key of ``keys`` (default: all) set away from its default that this run would never read (issue #27:
        recorded in config.json, silently without effect). Not part of :meth:`validate`, so that older run folders load."""
        l0 = self.regularizer == "l0"
        controller = l0 and self.target is not None
        needs_controller = "it steers the target controller, which needs regularizer = 'l0' and a target (target = 0.25)"
        if controller and self.target_mode == "exact":
            lam_why = "with an exact target the controller chooses λ (target_mode = 'ceiling' keeps it)"
        else:
            lam_why = f"regularizer {self.regularizer!r} has no λ (l0, l1, group_l1 and l2 have)"
        rules = [
            ("target", self.regularizer in ("l0", "magnitude", "importance"),
             f"regularizer {self.regularizer!r} has no target (l0, magnitude and importance have)"),
            ("threshold", self.regularizer in ("l1", "group_l1"), "only an l1 or group_l1 run is thresholded"),
            ("importance", self.regularizer == "importance", "it chooses the importance baseline (regularizer = 'importance')"),
            ("controller_lr", controller, needs_controller),
            ("warmup", controller, needs_controller),
            ("metric", self.target is not None, "it says what a target counts: set a target"),
            ("lam", self.regularizer in ("l0", "l1", "group_l1", "l2") and not (controller and self.target_mode == "exact"), lam_why),
            ("gate_lr", l0, "it is the gates' learning rate, and only regularizer = 'l0' trains gates"),
            ("clamp_log_alpha", l0, "it clamps the gates' log α, and only regularizer = 'l0' trains gates"),
            ("per_example_noise", l0 and self.gates == "units" and self.model != "minilm",
             "it is the noise of the paper's layers (regularizer = 'l0', gates = 'units', not model 'minilm')"),
        ]
        defaults = TrainConfig.__dataclass_fields__
        for key, read, why in rules:
            value = getattr(self, key)
            if not read and value != defaults[key].default and (keys is None or key in keys):
                raise ValueError(f"config key {key!r} = {value!r} would never be read by this run: {why}; leave it out")
        return self

    @property
    def threshold_value(self) -> float:
        """The thresholding tolerance of an L1 / group-L1 run (``threshold``, or ``lr`` by default)."""
        return self.lr if self.threshold is None else self.threshold

    def to_dict(self) -> dict:
        return asdict(self)


#: the keys that decide which other keys a run reads (TrainConfig.check_read)
_DECIDING_KEYS = ("regularizer", "target", "target_mode", "gates", "model")


def _droprates_ok(value) -> bool:
    rates = value if isinstance(value, list) else [value]
    return bool(rates) and all(_number(rate) and 0 < rate < 1 for rate in rates)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: (key, whether a value is allowed, what is allowed) for each key, in the order validate reports them
_KEY_RULES: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("model", lambda value: value in MODELS, f"one of {MODELS}"),
    ("hidden", lambda value: isinstance(value, list) and all(_int(h) and 0 < h <= WIDTH_MAX for h in value),
     f"a list of positive ints of at most {WIDTH_MAX}"),
    ("data", lambda value: value in DATASETS, f"one of {tuple(DATASETS)}"),
    ("regularizer", lambda value: value in REGULARIZER_CHOICES, f"one of {REGULARIZER_CHOICES}"),
    ("importance", lambda value: value in IMPORTANCE_CHOICES, f"one of {IMPORTANCE_CHOICES}"),
    ("gate_start", lambda value: value in GATE_STARTS, f"one of {GATE_STARTS}"),
    ("structure_from", lambda value: value is None or (isinstance(value, str) and bool(value)),
     "a run directory whose open gates the importance baseline keeps, or none"),
    ("settle", lambda value: _number(value) and 0 <= value < 1, "a fraction of the training steps in [0, 1)"),
    ("threshold", lambda value: value is None or (_number(value) and value >= 0), "a number >= 0"),
    ("epochs", lambda value: _int(value) and value >= 1, "an int >= 1"),
    ("batch_size", lambda value: _int(value) and 1 <= value <= INT64_MAX, f"an int in [1, {INT64_MAX}]"),
    ("lr", lambda value: _number(value) and value > 0, "a number > 0"),
    ("gate_lr", lambda value: value is None or (_number(value) and value > 0), "a number > 0, or none for the weights' lr"),
    ("lam", lambda value: _number(value) and value >= 0, "a number >= 0"),
    ("target", lambda value: value is None or (_number(value) and 0 < value <= 1), "a fraction in (0, 1]"),
    ("target_mode", lambda value: value in TARGET_MODES, f"one of {TARGET_MODES}"),
    ("metric", lambda value: value in METRICS, f"one of {METRICS}"),
    ("warmup", lambda value: _number(value) and 0 <= value <= 1, "a fraction of the training steps in [0, 1]"),
    ("delay", lambda value: _number(value) and 0 <= value <= 1, "a fraction of the training steps in [0, 1]"),
    ("landing", lambda value: value in LANDINGS, f"one of {LANDINGS}"),
    ("controller_lr", lambda value: _number(value) and value > 0, "a number > 0"),
    ("weight_decay", lambda value: _number(value) and value >= 0, "a number >= 0"),
    ("droprate_init", _droprates_ok, "a number in (0, 1), or a list of them (one per gated layer, in order)"),
    ("per_example_noise", lambda value: isinstance(value, bool), "true or false"),
    ("clamp_log_alpha", lambda value: isinstance(value, bool), "true or false (the paper's clamp of log α to [log 1e-2, log 1e2])"),
    ("init", lambda value: value in INITS, f"one of {INITS}"),
    ("ema", lambda value: _number(value) and 0 <= value < 1, "a decay in [0, 1) (0: no moving average)"),
    ("conditional", lambda value: isinstance(value, bool), "true or false"),
    ("gates", lambda value: value in ("units", "weights"), "'units' (the paper's layers) or 'weights' (one gate per weight)"),
    ("teacher", lambda value: value is None or (isinstance(value, str) and bool(value)), "a run directory, or none"),
    ("distill_weight", lambda value: _number(value) and 0 <= value <= 1, "a number in [0, 1]"),
    ("temperature", lambda value: _number(value) and value > 0, "a number > 0"),
    ("distill_hidden", lambda value: _number(value) and value >= 0,
     "a number >= 0 (the weight of the layer-wise hidden-state loss; 0: logits only)"),
    ("train_examples", lambda value: value is None or (_int(value) and value >= 1), "an int >= 1, or none for all"),
    ("test_examples", lambda value: value is None or (_int(value) and value >= 1), "an int >= 1, or none for all"),
    ("round_to", lambda value: _int(value) and value >= 1, "an int >= 1 (1: prune rounds no width)"),
    ("hidden_gate", lambda value: isinstance(value, bool), "true or false (a gate on the encoder's hidden size)"),
    ("seed", lambda value: _int(value) and 0 <= value <= SEED_MAX, f"an int in [0, {SEED_MAX}] (numpy's range for a random state)"),
)


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"--set {text!r}: write key=value, e.g. --set epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Read a TOML file (or start from ``base``), apply ``key=value`` overrides, and validate every key."""
    values: dict = dict(base or {})
    from_file: set[str] = set()
    if path is not None:
        path = regular_file(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            with open(path, "rb") as handle:
                loaded = tomllib.load(handle)
            values.update(loaded)
            from_file = set(loaded)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"config file {path} is not valid TOML ({error}): fix it (the recipes/ folder has examples)") from None
    from_set = set()
    for text in overrides:
        key, value = _parse_override(text)
        values[key] = value
        from_set.add(key)
    config = config_from_dict(values)
    if base is None:  # a new run: refuse what the user set that it would never read (a resumed run keeps its keys)
        # a recipe whose regularizer (or target...) is overridden keeps its other keys quietly: only --set ones count then
        config.check_read(from_set if from_set & set(_DECIDING_KEYS) else from_set | from_file)
    return config


def config_from_dict(values: dict, source: str | Path | None = None) -> TrainConfig:
    """A validated TrainConfig from a dict of keys; every error names the key, and ``source`` (a file) if given."""
    where = f"{source}: " if source is not None else ""
    if not isinstance(values, dict):
        raise ValueError(f"{where}a config must be a table of keys, got {type(values).__name__}")
    values = dict(values)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    for key in ("target", "threshold", "gate_lr", "teacher", "train_examples", "test_examples"):
        if isinstance(values.get(key), str) and values[key].lower() == "none":
            values[key] = None
    for key in ("lr", "gate_lr", "lam", "target", "warmup", "delay", "controller_lr", "weight_decay", "droprate_init", "threshold", "ema",
                "distill_weight", "temperature", "distill_hidden"):
        if _int(values.get(key)):
            values[key] = float(values[key])  # TOML writes 1 for 1.0
    try:
        return TrainConfig(**values).validate()
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None


def read_config_json(path: str | Path) -> TrainConfig:
    """A run's ``config.json``, validated; a damaged file or a bad key gives an error that names the file.

    One with ``regularizer = "importance"`` and no ``importance`` key was written before issue #26 and ran the
    baseline of then: it reads as ``importance = "heads-magnitude-units"``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {path.parent} a run directory (written by l0sparse train)?")
    values = read_json(path)
    if isinstance(values, dict) and values.get("regularizer") == "importance" and "importance" not in values:
        values = {**values, "importance": "heads-magnitude-units"}  # written before issue #26: the baseline it ran then
    return config_from_dict(values, source=path)
