import numpy as np
import pytest
from sklearn.datasets import make_classification, make_friedman1
from sklearn.feature_selection import SelectFromModel
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from l0sparse.sklearn import L0Classifier, L0Regressor


@pytest.mark.slow
@parametrize_with_checks(
    [L0Regressor(max_iter=30, n_lambdas=4, random_state=0), L0Classifier(max_iter=30, n_lambdas=4, random_state=0),
     L0Regressor(hidden_layer_sizes=(8,), max_iter=30, n_lambdas=4, random_state=0)]
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def sparse_linear_problem(n=300, p=60, k=5, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) * rng.uniform(0.5, 5, p) + rng.uniform(-3, 3, p)  # unequal scales and offsets
    support = np.sort(rng.choice(p, k, replace=False))
    coef = np.zeros(p)
    coef[support] = rng.choice([-1, 1], k) * rng.uniform(1, 2, k) / x[:, support].std(0)
    y = x @ coef + 3.0 + noise * rng.standard_normal(n)
    return x, y, support, coef


def test_regressor_recovers_support_and_coefficients_by_default():
    x, y, support, coef = sparse_linear_problem()
    model = L0Regressor(random_state=0).fit(x, y)
    assert np.array_equal(np.flatnonzero(model.support_), support)
    assert np.array_equal(model.get_support(indices=True), support)
    # refitted least squares on the true support: coefficients within 5 standard errors of the truth
    design = np.column_stack([x[:, support], np.ones(len(y))])
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    sigma2 = residual @ residual / (len(y) - len(support) - 1)
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))[:-1]
    assert np.all(np.abs(model.coef_[support] - coef[support]) <= 5 * se)
    assert np.all(model.coef_[np.setdiff1d(np.arange(x.shape[1]), support)] == 0)
    assert model.transform(x).shape == (len(y), len(support))
    assert model.score(x, y) > 0.9


@pytest.mark.slow
def test_n_features_to_select_is_exact():
    x, y, support, _ = sparse_linear_problem(seed=1)
    for k in (1, 3, 5, 8):
        model = L0Regressor(n_features_to_select=k, random_state=0).fit(x, y)
        assert model.support_.sum() == k
    assert set(L0Regressor(n_features_to_select=5, random_state=0).fit(x, y).get_support(indices=True)) == set(support)
    assert L0Regressor(n_features_to_select=0.1, random_state=0).fit(x, y).support_.sum() == 6


def test_fixed_lam_overrides_the_path():
    x, y, _, _ = sparse_linear_problem(seed=2)
    weak = L0Regressor(lam=1e-3, random_state=0).fit(x, y)
    strong = L0Regressor(lam=0.5, random_state=0).fit(x, y)
    assert weak.lam_ == 1e-3 and strong.lam_ == 0.5
    assert strong.support_.sum() < weak.support_.sum()


@pytest.mark.slow
def test_classifier_binary_and_multiclass():
    for n_classes in (2, 3):
        x, y = make_classification(n_samples=400, n_features=30, n_informative=4, n_redundant=0, n_repeated=0,
                                   n_classes=n_classes, n_clusters_per_class=1, shuffle=False, class_sep=1.5, random_state=0)
        model = L0Classifier(random_state=0).fit(x, y)
        informative = set(range(4))
        chosen = set(model.get_support(indices=True))
        assert len(chosen & informative) >= 3 and len(chosen - informative) <= 1
        assert model.coef_.shape == ((1, 30) if n_classes == 2 else (n_classes, 30))
        assert model.score(x, y) > 0.85
        proba = model.predict_proba(x)
        assert proba.shape == (400, n_classes) and np.allclose(proba.sum(1), 1)


@pytest.mark.slow
def test_pipeline_and_select_from_model():
    x, y, support, _ = sparse_linear_problem(seed=3)
    pipeline = make_pipeline(L0Regressor(random_state=0), LinearRegression()).fit(x, y)
    assert pipeline.score(x, y) > 0.9
    selector = SelectFromModel(L0Regressor(random_state=0), threshold=1e-12).fit(x, y)
    assert set(selector.get_support(indices=True)) == set(support)


@pytest.mark.slow
def test_mlp_selects_friedman_features():
    x, y = make_friedman1(n_samples=600, n_features=20, noise=0.5, random_state=0)
    model = L0Regressor(hidden_layer_sizes=(32,), random_state=0).fit(x, y)
    assert set(model.get_support(indices=True)) >= {0, 1, 3, 4}  # x2 enters only through (x2 - 0.5)^2, the weakest term
    assert model.support_.sum() <= 7
    assert not hasattr(model, "coef_")


def test_feature_names_are_kept():
    import pandas as pd
    x, y, support, _ = sparse_linear_problem(p=12, seed=4)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(12)])
    model = L0Regressor(random_state=0).fit(frame, y)
    assert list(model.feature_names_in_) == list(frame.columns)
    assert list(model.get_feature_names_out()) == [f"f{i}" for i in support]


@pytest.mark.parametrize("kwargs, name", [({"lam": -1.0}, "lam"), ({"beta": 0.0}, "beta"), ({"gamma": 0.1}, "gamma"),
                                          ({"zeta": 1.0}, "zeta"), ({"max_iter": 0}, "max_iter"),
                                          ({"hidden_layer_sizes": (0,)}, "hidden_layer_sizes")])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    x, y, _, _ = sparse_linear_problem(n=40, p=5)
    with pytest.raises(ValueError, match=name):
        L0Regressor(**kwargs).fit(x, y)


def test_single_class_and_bad_values_are_rejected():
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match="2 classes"):
        L0Classifier().fit(x, np.zeros(20))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        L0Regressor().fit(bad, np.zeros(20))


@pytest.mark.slow
def test_ebic_walks_the_sizes_where_the_path_jumps():
    """On an equicorrelated design (every pair of features correlated 0.5; n = 500, p = 1000, k = 10, SNR 5) the
    gates' path went from 81 open features to 3 (here from 30, for a shorter test): the sizes in between are walked
    (grown one feature at a time, polished by splicing) and scored by EBIC, and the support chosen lies strictly
    between the two stages' sizes and their two neighbours on each side, where the proposals of the stages alone
    were (≤ 5 or ≥ 28 features)."""
    rng = np.random.default_rng(1)
    n, p, rho = 500, 1000, 0.5
    truth = np.round(np.linspace(0, p - 1, 10)).astype(int)
    x = np.sqrt(rho) * rng.standard_normal((n, 1)) + np.sqrt(1 - rho) * rng.standard_normal((n, p))
    y = x[:, truth].sum(1) + np.sqrt((10 + 90 * rho) / 5) * rng.standard_normal(n)
    model = L0Regressor()
    model._encode_targets(y)
    x_std = (x - x.mean(0)) / x.std(0)
    wide = np.full(p, -5.0)
    wide[rng.choice(p, 30, replace=False)] = 1.0  # 30 open gates, in an arbitrary order
    narrow = np.full(p, -5.0)
    narrow[truth[:3]] = 1.0  # then 3 of the true features
    stages = [{"lam": lam, "support": np.flatnonzero(log_alpha > 0), "log_alpha": log_alpha, "state": None}
              for lam, log_alpha in ((0.03, wide), (0.06, narrow))]
    chosen = np.sort(model._choose_linear(stages, x_std, y)["support"])
    assert 5 < chosen.size < 28
    assert set(chosen) <= set(truth) and chosen.size >= 8  # true features only, at most two of them missed
