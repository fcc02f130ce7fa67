"""scikit-learn estimators that select features with Hard Concrete input gates.

``L0Regressor`` and ``L0Classifier`` put one gate on each input feature in
front of a linear model (the default) or a small MLP (``hidden_layer_sizes``),
and train gates and weights together on ``mean loss + lam · Σ_j P(z_j ≠ 0)`` (a :class:`~l0sparse.Penalty`).

How λ is chosen when ``lam`` is not given (documented choices):

- **Linear models: a regularization path scored by the extended BIC.** The
  gates are trained along an increasing grid of ``n_lambdas`` values of λ,
  each stage warm-started from the last (gates that close early cannot
  reopen, so the path goes from dense to sparse). Every stage's support is
  refitted without penalty (least squares, or a logistic regression with
  C=1e4) and scored by EBIC = deviance + k·log n + 2γ·log C(p, k) with
  γ = 1 (Chen & Chen 2008). Each stage proposes its own support and the
  nested ones up to two ranks smaller and larger in its log α ranking; only
  supports up to n / log n features are scored. For regression, each candidate support is first polished by a
  splicing exchange (Zhu et al. 2020): the least useful selected feature is
  swapped for the most useful unselected one while that lowers the residual
  sum of squares. Where the path jumps between two stages (on an
  equicorrelated design, from 81 open gates to 4), regression also walks the
  sizes in between: grow the smaller stage's support by its best forward
  feature, polish, score, and stop after three sizes without improvement.
  The support with the lowest EBIC wins.
- **MLPs: a validation split.** ``validation_fraction`` of the rows is held
  out; along the same path the gated network is scored by its validation
  loss, and the sparsest stage whose loss is within one standard error of the
  best is kept (the one-standard-error rule).

``lam=`` fixes λ (the path still runs up to it, for the warm start).
``n_features_to_select=k`` takes the first stage of the path with at most k
open gates (the last stage if none has), keeps the k features with the
largest log α there and, for linear regression, polishes them by splicing;
this is a search along the path, not the target controller. ``lam`` is the
coefficient beside the *mean* loss, like scikit-learn's ``alpha``: it equals
the library's per-weight λ divided by N (``l0sparse.penalty``), charged once
per feature.

Inputs are standardized internally (each column to mean 0 and variance 1,
and the regression target too), so that one λ grid fits every problem and
the gates compete on equal terms; ``coef_`` and ``intercept_`` are reported
on the original scale. Linear models are refitted on the selected support
(``refit=True``), because the gates shrink the coefficients they keep.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from .core.costs import Penalty
from .core.gates import Gate, is_positive_int
from .core.layers import L0Linear

__all__ = ["L0Regressor", "L0Classifier"]

_CLOSED_LOG_ALPHA = -50.0  # P(z ≠ 0) = sigmoid(-48.4): closed for good
# A gate with P(z ≠ 0) below this is left out of a stage's computation: its
# samples are almost surely 0, so its feature and weights contribute nothing.
_DEAD_PROB_NONZERO = 1e-2
# The EBIC search also scores the supports this many ranks smaller and larger than each stage's own.
_NEIGHBOURS = 2
# A linear stage stops when its open set has not changed for this many checks (10 steps each).
_STEADY_CHECKS = 5
# "auto" settings, measured on the benchmarks (docs/sklearn.md): full-batch Adam at 0.05 for the
# linear model; mini-batches of 128 at 0.01 for the MLP (at 0.05 or full batch it lost Friedman's x2).
_LINEAR_LEARNING_RATE = 0.05
_MLP_LEARNING_RATE = 0.01
_MLP_BATCH = 128
# EBIC's γ: 1 is consistent whatever the growth of p (Chen & Chen 2008); the milder
# γ = 1 - log n / (2 log p) let the best of ~1000 noise features in at n = 500.
_EBIC_GAMMA = 1.0


class _GatedNetwork(nn.Module):
    """Input gates followed by a linear layer or an MLP: the first layer is an ``L0Linear``, whose gates
    :class:`~l0sparse.Penalty` charges, computed here on the columns still alive."""

    def __init__(self, n_features: int, n_outputs: int, hidden_layer_sizes, gate_kwargs: dict) -> None:
        super().__init__()
        widths = [n_features, *hidden_layer_sizes, n_outputs]
        layers: list[nn.Module] = [L0Linear(widths[0], widths[1], **gate_kwargs)]
        for fan_in, fan_out in zip(widths[1:-1], widths[2:]):
            layers += [nn.ReLU(), nn.Linear(fan_in, fan_out)]
        self.body = nn.Sequential(*layers)
        self.linear = not hidden_layer_sizes
        if self.linear:  # start from zero so that no feature is favoured before it earns it
            nn.init.zeros_(self.body[0].weight)
            nn.init.zeros_(self.body[0].bias)

    @property
    def gate(self) -> Gate:
        return self.body[0].gate

    def feature_penalty(self, lam: float) -> Penalty:
        """``lam`` · Σ_j P(z_j ≠ 0): λ once per feature (not per weight), whatever the first layer's width."""
        return Penalty(self, lam, cost_weights={id(self.gate): torch.ones(self.gate.shape)})

    def forward(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """``columns``: indices of the features present in ``x`` (the others are treated as closed)."""
        distribution = self.gate.distribution(columns)
        first = self.body[0]
        weight = first.weight if columns is None else first.weight[:, columns]
        if not self.training:
            hidden = F.linear(x, weight * distribution.deterministic(), first.bias)
        elif self.linear:  # one shared sample, folded into the weight: cheaper than scaling every row of x
            hidden = F.linear(x, weight * distribution.rsample(), first.bias)
        else:  # per-example noise: lower gradient variance for the MLP
            hidden = F.linear(x * distribution.rsample(x.shape[:1]), weight, first.bias)
        return self.body[1:](hidden)


def _mean_and_scale(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation along axis 0 (scale 1 where constant), safe for data near 1e±200.

    Each column is first divided by its largest magnitude: squaring 1e200 overflows and squaring 1e-200
    underflows, and either way every feature looked constant and none was selected.
    """
    magnitude = np.abs(values).max(0)
    magnitude = np.where(magnitude > 0, magnitude, 1.0)
    unit = values / magnitude
    mean, scale = unit.mean(0) * magnitude, unit.std(0) * magnitude
    return mean, np.where(scale > 0, scale, 1.0)


def _hidden_sizes(hidden_layer_sizes) -> tuple[int, ...]:
    """``hidden_layer_sizes`` as a tuple of positive ints (empty: a linear model); 2.5 is refused, not truncated."""
    values = tuple(np.ravel(np.asarray(hidden_layer_sizes)).tolist())
    if not all(is_positive_int(v) for v in values):
        raise ValueError(f"hidden_layer_sizes must be a sequence of positive ints (the widths of the hidden layers; "
                         f"() for a linear model), got {hidden_layer_sizes!r}")
    return values


def _log_binomial(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _least_squares(x: np.ndarray, y: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """OLS with intercept on standardized data restricted to ``support``: (coef, intercept, residual)."""
    design = np.column_stack([x[:, support], np.ones(len(y))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    return solution[:-1], float(solution[-1]), y - design @ solution


def _forward_gains(x: np.ndarray, residual: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Per feature, the residual sum of squares its addition would remove, (xᵀr)²/‖x‖² (approximate: x is not
    projected off the support); -inf for the features already in ``support``."""
    gains = (x.T @ residual) ** 2 / np.maximum((x * x).sum(0), 1e-300)
    gains[support] = -np.inf
    return gains


def _splice(x: np.ndarray, y: np.ndarray, support: np.ndarray, max_exchanges: int = 50) -> np.ndarray:
    """Swap one selected feature for one unselected while that lowers the residual sum of squares."""
    support = np.sort(support)
    if support.size == 0 or support.size >= min(x.shape[1], len(y) - 2):
        return support
    coef, _, residual = _least_squares(x, y, support)
    rss = float(residual @ residual)
    for _ in range(max_exchanges):
        design = x[:, support] - x[:, support].mean(0)
        inverse_diagonal = np.diag(np.linalg.pinv(design.T @ design))
        backward = coef**2 / np.maximum(inverse_diagonal, 1e-300)  # RSS increase if dropped
        forward = _forward_gains(x, residual, support)  # RSS decrease if added
        candidate = support.copy()
        candidate[np.argmin(backward)] = int(np.argmax(forward))
        candidate = np.sort(candidate)
        new_coef, _, new_residual = _least_squares(x, y, candidate)
        new_rss = float(new_residual @ new_residual)
        if new_rss >= rss * (1 - 1e-12):
            break
        support, coef, residual, rss = candidate, new_coef, new_residual, new_rss
    return support


class _L0Selector(SelectorMixin, BaseEstimator):
    """Shared machinery of :class:`L0Regressor` and :class:`L0Classifier`."""

    _parameter_constraints: dict = {
        "lam": [None, Interval(numbers.Real, 0, None, closed="left")],
        "n_features_to_select": [None, Interval(numbers.Integral, 1, None, closed="left"), Interval(numbers.Real, 0, 1, closed="right")],
        "hidden_layer_sizes": ["array-like"],
        "beta": [Interval(numbers.Real, 0, None, closed="neither")],
        "gamma": [Interval(numbers.Real, None, 0, closed="neither")],
        "zeta": [Interval(numbers.Real, 1, None, closed="neither")],
        "droprate_init": [Interval(numbers.Real, 0, 1, closed="neither")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "batch_size": [None, StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"auto"}), Interval(numbers.Real, 0, None, closed="neither")],
        "n_lambdas": [Interval(numbers.Integral, 2, None, closed="left")],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "refit": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        lam=None,
        n_features_to_select=None,
        hidden_layer_sizes=(),
        beta=2.0 / 3.0,
        gamma=-0.1,
        zeta=1.1,
        droprate_init=0.2,
        max_iter=400,
        tol=1e-4,
        batch_size="auto",
        learning_rate="auto",
        n_lambdas=13,
        validation_fraction=0.2,
        refit=True,
        random_state=None,
        verbose=0,
    ):
        self.lam = lam
        self.n_features_to_select = n_features_to_select
        self.hidden_layer_sizes = hidden_layer_sizes
        self.beta = beta
        self.gamma = gamma
        self.zeta = zeta
        self.droprate_init = droprate_init
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.n_lambdas = n_lambdas
        self.validation_fraction = validation_fraction
        self.refit = refit
        self.random_state = random_state
        self.verbose = verbose

    # -- hooks for the two estimators ----------------------------------------
    def _encode_targets(self, y):  # returns (targets for torch, n_outputs)
        raise NotImplementedError

    def _loss(self, output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        raise NotImplementedError

    def _df_per_feature(self) -> int:
        """Free coefficients one selected feature adds to the linear model."""
        return 1

    def _refit_linear(self, x: np.ndarray, y: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(coef (n_outputs, k), intercept (n_outputs,), deviance) on standardized data."""
        raise NotImplementedError

    # -- fitting ----------------------------------------------------------------
    def _lambda_grid(self) -> np.ndarray:
        grid = np.logspace(-3.0, 0.0, self.n_lambdas)
        if self.lam is None:
            return grid
        return np.append(grid[grid < self.lam], self.lam)

    def _train_stage(self, network, x, target, lam, generator_seed) -> None:
        optimizer = self._optimizer
        n = len(x)
        batch = self.batch_size
        if batch == "auto":
            batch = None if network.linear else _MLP_BATCH
        batch = n if batch is None else min(batch, n)
        generator = torch.Generator().manual_seed(generator_seed)
        check_every, best, stall, steady = 10, math.inf, 0, 0
        recent, last_active = 0.0, network.gate.is_open()
        penalty = network.feature_penalty(lam)
        network.train()
        # compute only with the features whose gates are still alive
        columns = torch.nonzero(network.gate.prob_nonzero().detach() >= _DEAD_PROB_NONZERO).flatten()
        x = x[:, columns]
        for step in range(1, self.max_iter + 1):
            index = torch.randperm(n, generator=generator)[:batch] if batch < n else slice(None)
            loss = self._loss(network(x[index], columns), target[index]) + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent += float(loss.detach())
            if step % check_every == 0:
                recent /= check_every
                stall = stall + 1 if recent > best - self.tol * abs(best) else 0
                best = min(best, recent)
                recent = 0.0
                active = network.gate.is_open()
                steady = steady + 1 if torch.equal(active, last_active) else 0
                last_active = active
                # a linear stage only proposes a support (refitted later): stop once it has settled
                if stall >= 2 or (network.linear and steady >= _STEADY_CHECKS):
                    break

    def fit(self, X, y):
        """Select features and fit the model. ``X``: (n_samples, n_features); ``y``: (n_samples,)."""
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=isinstance(self, RegressorMixin), ensure_min_samples=2)
        targets, n_outputs = self._encode_targets(y)
        n_samples, n_features = X.shape
        hidden = _hidden_sizes(self.hidden_layer_sizes)
        self._x_mean, self._x_scale = _mean_and_scale(X)
        x_std = (X - self._x_mean) / self._x_scale

        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        train_rows, validation_rows = self._split_rows(rng, n_samples, hidden)
        x_torch = torch.as_tensor(x_std, dtype=torch.float32)
        gate_kwargs = {"beta": float(self.beta), "gamma": float(self.gamma), "zeta": float(self.zeta), "droprate_init": float(self.droprate_init)}
        learning_rate = self.learning_rate
        if learning_rate == "auto":
            learning_rate = _MLP_LEARNING_RATE if hidden else _LINEAR_LEARNING_RATE
        grid = self._lambda_grid()
        with torch.random.fork_rng(devices=[]):  # leave the caller's torch RNG untouched
            torch.manual_seed(seed)
            network = _GatedNetwork(n_features, n_outputs, hidden, gate_kwargs)
            stages = self._fit_path(network, x_torch[train_rows], targets[train_rows], grid, learning_rate, seed)
        if self.lam is None and len(grid) > 1 and stages[0]["support"].size == 0:
            # the weakest λ of the path closed everything: the gates were not learned, so the path chose nothing
            warnings.warn(f"{type(self).__name__}: every gate closed at the smallest lam of the path ({stages[0]['lam']:.3g}), so "
                          f"the selection rests on the gates' ranking alone; learning_rate={learning_rate!r} is likely too "
                          "large for the gates (try 'auto'), or give lam", UserWarning, stacklevel=2)

        if hidden:
            chosen = self._choose_mlp(stages, network, x_torch, targets, validation_rows)
        else:
            chosen = self._choose_linear(stages, x_std, y)
        support = self._keep_chosen(chosen, stages, network, n_features)
        if not hidden:
            self._set_linear_coefficients(x_std, y, support, network)
        if support.size == 0:
            warnings.warn(f"{type(self).__name__} selected no feature: every gate closed, so predictions ignore X; "
                          "give a smaller lam or n_features_to_select", UserWarning, stacklevel=2)
        return self

    def _split_rows(self, rng: np.random.RandomState, n_samples: int, hidden: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """(training rows, validation rows): an MLP whose λ is to be chosen holds out ``validation_fraction`` of the rows
        (from 10 samples on); otherwise every row trains."""
        if hidden and self.lam is None and n_samples >= 10:
            order = rng.permutation(n_samples)
            n_validation = max(1, int(round(self.validation_fraction * n_samples)))
            return order[n_validation:], order[:n_validation]
        return np.arange(n_samples), None

    def _fit_path(self, network: _GatedNetwork, x: torch.Tensor, target: torch.Tensor, grid: np.ndarray, learning_rate: float,
                  seed: int) -> list[dict]:
        """Train ``network`` along the increasing λ of ``grid``, each stage warm-started from the last: a record per stage
        (its λ, open features, log α and weights), up to the first that closes every gate when ``lam`` is not given."""
        # fused: one kernel for all parameters; the per-tensor loop is a fifth of a linear step at this size
        self._optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, fused=True)
        stages = []
        if not network.linear:  # fit the MLP without penalty first, so that slow-to-learn features are in use before λ acts
            self._train_stage(network, x, target, 0.0, seed - 1)
        for stage, lam in enumerate(grid):
            self._train_stage(network, x, target, float(lam), seed + stage)
            support = np.flatnonzero(network.gate.is_open().numpy())
            stages.append({"lam": float(lam), "support": support, "log_alpha": network.gate.log_alpha.detach().numpy().copy(),
                           "state": copy.deepcopy(network.state_dict())})
            if self.verbose:
                print(f"[{type(self).__name__}] lam={lam:.4g}: {support.size} features open")
            if support.size == 0 and self.lam is None:
                break
        del self._optimizer
        return stages

    def _keep_chosen(self, chosen: dict, stages: list[dict], network: _GatedNetwork, n_features: int) -> np.ndarray:
        """Record the chosen stage (``lam_``, ``path_``, ``n_iter_``, ``support_``) and set ``network`` to it in eval mode as
        ``network_``, with the unselected features closed for good; returns the selected features' indices."""
        self.lam_ = chosen["lam"]
        self.path_ = [{"lam": s["lam"], "n_selected": int(s["support"].size)} for s in stages]
        self.n_iter_ = len(stages)
        support = np.sort(np.asarray(chosen["support"], dtype=int))
        self.support_ = np.zeros(n_features, dtype=bool)
        self.support_[support] = True

        network.load_state_dict(chosen["state"])
        with torch.no_grad():  # unselected features closed for good, selected ones at their learned log α
            closed = torch.as_tensor(~self.support_)
            network.gate.log_alpha[closed] = _CLOSED_LOG_ALPHA
        network.eval()
        self.network_ = network
        return support

    def _choose_linear(self, stages, x_std, y):
        if self.n_features_to_select is not None:
            return self._select_k(stages, x_std.shape[1], x_std, y)
        if self.lam is not None:
            return stages[-1]
        n_samples, n_features = x_std.shape
        # supports larger than n / log n are not scored: their near-interpolating fits make any criterion unreliable
        max_size = max(1, int(n_samples / math.log(max(n_samples, 3))))
        best, best_score, seen, polished = None, math.inf, set(), {}

        def ebic(support: np.ndarray) -> float:
            _, _, deviance = self._refit_linear(x_std, y, support)
            return (deviance + support.size * self._df_per_feature() * math.log(n_samples)
                    + 2 * _EBIC_GAMMA * _log_binomial(n_features, support.size))

        for stage in stages:
            # each stage proposes its own support and the nested ones next to it in its log α ranking
            ranking = np.argsort(-stage["log_alpha"], kind="stable")
            size = stage["support"].size
            for candidate_size in range(max(size - _NEIGHBOURS, 0), min(size + _NEIGHBOURS, max_size) + 1):
                proposal = tuple(np.sort(ranking[:candidate_size]))
                if proposal not in polished:
                    polished[proposal] = self._polish(x_std, y, np.asarray(proposal, dtype=int))
                support = polished[proposal]
                key = tuple(support)
                if key in seen:
                    continue
                seen.add(key)
                score = ebic(support)
                if score < best_score:
                    best, best_score = {**stage, "support": support}, score
        for larger, smaller in zip(stages, stages[1:]):
            # where the path jumps (81 open gates, then 4, on an equicorrelated design, whose true features share a
            # common factor that a few of them already carry) no stage proposes the sizes in between: walk them
            low, high = smaller["support"].size + _NEIGHBOURS + 1, min(larger["support"].size - _NEIGHBOURS - 1, max_size)
            if low <= high:
                support, score = self._size_walk(x_std, y, polished, smaller["support"], low, high, ebic)
                if score < best_score:
                    best, best_score = {**smaller, "support": support}, score
        self.criterion_ = best_score
        return best if best is not None else stages[-1]

    def _size_walk(self, x_std, y, polished: dict, start: np.ndarray, low: int, high: int, score) -> tuple[np.ndarray, float]:
        """Supports of sizes ``low`` … ``high``, each grown from the last by its best forward feature and polished
        (abess's warm-started size path), scored by ``score``; stops once ``_NEIGHBOURS + 1`` sizes in a row
        have not improved on the best. Returns the best support and its score."""
        support = np.sort(np.asarray(start, dtype=int))
        best, best_score, worse = support, math.inf, 0
        while support.size < high and worse <= _NEIGHBOURS:
            support = self._grow(x_std, y, support)
            if support is None:  # no size walk for this estimator
                break
            if support.size < low:
                continue
            key = tuple(support)
            if key not in polished:
                polished[key] = self._polish(x_std, y, support)
            support = polished[key]
            value = score(support)
            best, best_score, worse = (support, value, 0) if value < best_score else (best, best_score, worse + 1)
        return best, best_score

    def _polish(self, x_std, y, support):
        return support

    def _grow(self, x_std, y, support) -> np.ndarray | None:
        """``support`` plus the feature that most improves the fit, for the size walk (None: no walk)."""
        return None

    def _select_k(self, stages, n_features: int, x_std=None, y=None):
        """The k features to keep; ``x_std`` and ``y`` (linear models) let the regressor polish them."""
        k = self.n_features_to_select
        k = k if isinstance(k, numbers.Integral) else max(1, int(round(k * n_features)))
        if k > n_features:
            raise ValueError(f"n_features_to_select={k} exceeds the number of features ({n_features})")
        # the first stage of the path whose support is no larger than k, else the last; then its top-k log α
        stage = next((s for s in stages if s["support"].size <= k), stages[-1])
        top = np.sort(np.argsort(-stage["log_alpha"], kind="stable")[:k])
        if x_std is not None and y is not None:
            top = self._polish(x_std, y, top)
        return {**stage, "support": top}

    def _choose_mlp(self, stages, network, x_torch, targets, validation_rows):
        if self.n_features_to_select is not None:
            return self._select_k(stages, x_torch.shape[1])
        if validation_rows is None:
            return stages[-1]
        x_val, t_val = x_torch[validation_rows], targets[validation_rows]
        scores = []
        network.eval()
        for stage in stages:
            network.load_state_dict(stage["state"])
            with torch.no_grad():
                losses = self._loss(network(x_val), t_val, reduction="none").double()
            scores.append((float(losses.mean()), float(losses.std() / math.sqrt(len(losses)))))
        best = int(np.argmin([s[0] for s in scores]))
        threshold = scores[best][0] + scores[best][1]
        # the sparsest stage within one standard error of the best (stages grow sparser along the path)
        eligible = [i for i, (loss, _) in enumerate(scores) if loss <= threshold and stages[i]["support"].size > 0]
        chosen = max(eligible) if eligible else best
        self.validation_scores_ = [s[0] for s in scores]
        return stages[chosen]

    def _set_linear_coefficients(self, x_std, y, support, network):
        n_outputs = network.body[0].out_features
        coef_std = np.zeros((n_outputs, x_std.shape[1]))
        if self.refit:
            coef_support, intercept_std, _ = self._refit_linear(x_std, y, support)
            coef_std[:, support] = coef_support
        else:
            with torch.no_grad():
                z_hat = network.gate.deterministic().double().numpy()
                coef_std = network.body[0].weight.detach().double().numpy() * z_hat
                intercept_std = network.body[0].bias.detach().double().numpy()
        self._set_original_scale(coef_std, np.asarray(intercept_std, dtype=float).reshape(n_outputs))

    def _set_original_scale(self, coef_std, intercept_std):
        raise NotImplementedError

    def _get_support_mask(self):
        check_is_fitted(self, "support_")
        return self.support_

    def _network_output(self, X) -> torch.Tensor:
        check_is_fitted(self, "support_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        x_std = torch.as_tensor((X - self._x_mean) / self._x_scale, dtype=torch.float32)
        with torch.no_grad():
            return self.network_(x_std).double()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


class L0Regressor(RegressorMixin, _L0Selector):
    """Least-squares regression with L0-gated input features; a feature selector too.

    Parameters
    ----------
    lam : float or None
        Penalty per open feature beside the mean squared error (of the
        standardized target). ``None``: chosen along a path by EBIC (linear)
        or a validation split (MLP); see the module docstring.
    n_features_to_select : int, float or None
        Keep exactly this many features (a float in (0, 1] is a fraction).
    hidden_layer_sizes : tuple of int
        ``()`` for a linear model (default), else the widths of an MLP.
    beta, gamma, zeta : float
        Hard Concrete temperature and stretch limits (defaults of the paper).
    droprate_init : float
        Initial drop rate of the gates (log α₀ = log(1-p) - log p).
    max_iter : int
        Adam steps per stage of the λ path (fewer if the loss stalls or, for
        a linear model, the open set settles).
    tol : float
        Relative improvement of the 10-step mean loss below which a stage stops.
    batch_size : int, None or "auto"
        Rows per step; ``None`` uses the whole training set; ``"auto"``: the
        whole set for a linear model, 128 for an MLP.
    learning_rate : float or "auto"
        Adam's learning rate; ``"auto"``: 0.05 linear, 0.01 MLP.
    n_lambdas : int
        Points of the λ grid, log-spaced over [1e-3, 1].
    validation_fraction : float
        Share of rows held out to choose λ for an MLP.
    refit : bool
        Refit the linear model by least squares on the selected support.
    random_state : int, RandomState or None
    verbose : int

    Attributes
    ----------
    coef_, intercept_ : linear models only, on the original scale.
    support_ : boolean mask of the selected features.
    lam_ : the λ of the chosen stage.
    path_ : list of ``{"lam", "n_selected"}`` along the path.
    n_features_in_, feature_names_in_ : as in scikit-learn.
    """

    def _encode_targets(self, y):
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):  # strings: a numpy UFuncTypeError further on
            raise ValueError(f"L0Regressor needs numeric targets y, got dtype {y.dtype} (e.g. {y.flat[0]!r}); for class "
                             "labels use L0Classifier")
        mean, scale = _mean_and_scale(y)
        self._y_mean, self._y_scale = float(mean), float(scale)
        return torch.as_tensor((y - self._y_mean) / self._y_scale, dtype=torch.float32).unsqueeze(1), 1

    def _loss(self, output, target, reduction="mean"):
        losses = 0.5 * (output - target).pow(2).sum(1)
        return losses.mean() if reduction == "mean" else losses

    def _refit_linear(self, x, y, support):
        y_std = (y - self._y_mean) / self._y_scale
        coef, intercept, residual = _least_squares(x, y_std, support)
        rss = max(float(residual @ residual), np.finfo(float).tiny)
        deviance = len(y) * math.log(rss / len(y))
        return coef.reshape(1, -1), np.array([intercept]), deviance

    def _polish(self, x_std, y, support):
        return _splice(x_std, (y - self._y_mean) / self._y_scale, support)

    def _grow(self, x_std, y, support):
        _, _, residual = _least_squares(x_std, (y - self._y_mean) / self._y_scale, support)
        return np.sort(np.append(support, int(np.argmax(_forward_gains(x_std, residual, support)))))

    def _set_original_scale(self, coef_std, intercept_std):
        coef = coef_std[0] * self._y_scale / self._x_scale
        self.coef_ = coef
        self.intercept_ = float(self._y_mean + self._y_scale * intercept_std[0] - coef @ self._x_mean)

    def predict(self, X):
        """Predicted targets, shape (n_samples,)."""
        check_is_fitted(self, "support_")
        if hasattr(self, "coef_"):
            X = validate_data(self, X, dtype=np.float64, reset=False)
            return X @ self.coef_ + self.intercept_
        return self._y_mean + self._y_scale * self._network_output(X)[:, 0].numpy()


class L0Classifier(ClassifierMixin, _L0Selector):
    """Logistic (or MLP) classification with L0-gated input features; a feature selector too.

    Binary and multiclass. Parameters and attributes as in
    :class:`L0Regressor`, with the cross-entropy in place of the squared
    error; ``coef_`` has shape (1, n_features) for two classes and
    (n_classes, n_features) otherwise, and ``classes_`` lists the labels.
    """

    def _encode_targets(self, y):
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"L0Classifier needs samples of at least 2 classes in y; got only class {self.classes_[0]!r}")
        self._encoded_y = encoded
        if len(self.classes_) == 2:
            return torch.as_tensor(encoded, dtype=torch.float32).unsqueeze(1), 1
        return torch.as_tensor(encoded, dtype=torch.long), len(self.classes_)

    def _loss(self, output, target, reduction="mean"):
        if output.shape[1] == 1:
            losses = F.binary_cross_entropy_with_logits(output[:, 0], target[:, 0], reduction="none")
        else:
            losses = F.cross_entropy(output, target, reduction="none")
        return losses.mean() if reduction == "mean" else losses

    def _df_per_feature(self):
        return max(1, len(self.classes_) - 1)  # a multinomial model has K - 1 free coefficients per feature

    def _refit_linear(self, x, y, support):
        encoded = self._encoded_y
        n_outputs = 1 if len(self.classes_) == 2 else len(self.classes_)
        if support.size == 0:
            counts = np.bincount(encoded, minlength=len(self.classes_)) / len(encoded)
            counts = np.clip(counts, 1e-12, None)
            deviance = -2 * float(np.sum(np.log(counts[encoded])))
            intercept = np.log(counts[1] / counts[0]).reshape(1) if n_outputs == 1 else np.log(counts)
            return np.zeros((n_outputs, 0)), intercept, deviance
        model = LogisticRegression(C=1e4, max_iter=1000).fit(x[:, support], encoded)
        probabilities = np.clip(model.predict_proba(x[:, support]), 1e-12, None)
        deviance = -2 * float(np.sum(np.log(probabilities[np.arange(len(encoded)), encoded])))
        return model.coef_, model.intercept_, deviance

    def _set_original_scale(self, coef_std, intercept_std):
        coef = coef_std / self._x_scale
        self.coef_ = coef
        self.intercept_ = intercept_std - coef @ self._x_mean

    def decision_function(self, X):
        """Logits: shape (n_samples,) for two classes, (n_samples, n_classes) otherwise."""
        check_is_fitted(self, "support_")
        if hasattr(self, "coef_"):
            X = validate_data(self, X, dtype=np.float64, reset=False)
            scores = X @ self.coef_.T + self.intercept_
        else:
            scores = self._network_output(X).numpy()
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X):
        scores = self.decision_function(X)
        if scores.ndim == 1:
            positive = 1 / (1 + np.exp(-scores))
            return np.column_stack([1 - positive, positive])
        scores = scores - scores.max(1, keepdims=True)
        exp = np.exp(scores)
        return exp / exp.sum(1, keepdims=True)

    def predict(self, X):
        probabilities = self.predict_proba(X)
        return self.classes_[np.argmax(probabilities, axis=1)]
