"""The sparse-regression design of DESIGN.md §5: Toeplitz ρ = 0.5, k equally spaced unit coefficients."""

import numpy as np


def make_toeplitz_regression(n: int, p: int, k: int = 10, rho: float = 0.5, snr: float = 1.0, seed: int = 0, n_test: int = 1000):
    """Return X, y, X_test, y_test, support (indices of the true features).

    Rows are AR(1) in the feature index, so corr(x_i, x_j) = ρ^|i-j|; the noise
    variance is Var(Xβ) / SNR with Var(Xβ) = βᵀΣβ.
    """
    rng = np.random.default_rng(seed)
    support = np.unique(np.round(np.linspace(0, p - 1, k)).astype(int))
    beta = np.zeros(p)
    beta[support] = 1.0

    def draw(rows: int) -> np.ndarray:
        x = np.empty((rows, p))
        x[:, 0] = rng.standard_normal(rows)
        innovations = rng.standard_normal((rows, p)) * np.sqrt(1 - rho**2)
        for j in range(1, p):
            x[:, j] = rho * x[:, j - 1] + innovations[:, j]
        return x

    gaps = np.abs(support[:, None] - support[None, :])
    signal_variance = float((rho**gaps).sum())
    sigma = np.sqrt(signal_variance / snr)
    x_train, x_test = draw(n), draw(n_test)
    y_train = x_train @ beta + sigma * rng.standard_normal(n)
    y_test = x_test @ beta + sigma * rng.standard_normal(n_test)
    return x_train, y_train, x_test, y_test, support


def make_equicorrelated_regression(n: int, p: int, k: int = 10, rho: float = 0.5, snr: float = 5.0, seed: int = 0,
                                   n_test: int = 1000):
    """As :func:`make_toeplitz_regression`, with every pair of features correlated ρ (one common factor):
    x_j = √ρ·w + √(1-ρ)·e_j, so corr(x_i, x_j) = ρ for all i ≠ j and Var(Xβ) = βᵀΣβ = k + k(k-1)ρ."""
    rng = np.random.default_rng(seed)
    support = np.unique(np.round(np.linspace(0, p - 1, k)).astype(int))
    beta = np.zeros(p)
    beta[support] = 1.0

    def draw(rows: int) -> np.ndarray:
        return np.sqrt(rho) * rng.standard_normal((rows, 1)) + np.sqrt(1 - rho) * rng.standard_normal((rows, p))

    k = len(support)
    sigma = np.sqrt((k + k * (k - 1) * rho) / snr)
    x_train, x_test = draw(n), draw(n_test)
    y_train = x_train @ beta + sigma * rng.standard_normal(n)
    y_test = x_test @ beta + sigma * rng.standard_normal(n_test)
    return x_train, y_train, x_test, y_test, support
