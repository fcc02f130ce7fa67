"""What the benchmark scripts share."""

import json
from pathlib import Path

from l0sparse.files import atomic_write_text


def save_json(payload, path: Path) -> None:
    """Write a result file atomically (a reader never sees half of one), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=1), path)


def median_step_seconds(models: dict, x, y, steps: int, warmup: int, fused_adam: bool = False, lam: float = 0.1,
                        n_train: int = 60000) -> dict:
    """Median training-step time of each model on one batch, the models stepped in turn in one process.

    Adam (lr 1e-3) for every model; gated models add their L0 penalty, built once as a
    ``Penalty`` (λ per weight over ``n_train``), as the training harness does. ``warmup``
    steps are not timed.
    """
    import statistics

    import torch

    import l0sparse

    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None) for name, model in models.items()}
    penalties = {name: l0sparse.Penalty(model, lam, N=n_train) for name, model in models.items() if l0sparse.costs.gates(model)}
    times = {name: [] for name in models}
    for step in range(warmup + steps):
        for name, model in models.items():
            seconds = timed_step(model, optimizers[name], penalties.get(name), x, y)
            if step >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def timed_step(model, optimizer, penalty, x, y) -> float:
    """One training step (cross-entropy, plus ``penalty()`` unless it is None); its wall time in seconds."""
    import time

    import torch.nn.functional as F

    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    if penalty is not None:
        loss = loss + penalty()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start
