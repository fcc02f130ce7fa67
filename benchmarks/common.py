"""What the benchmark scripts share."""

import json
from pathlib import Path

from l0sparse.training.files import atomic_write_text
from l0sparse.core.sites import find_gates


def save_json(payload, path: Path) -> None:
    """Write a result file atomically (a reader never sees half of one), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=1), path)


def reuse_freed_memory() -> None:
    """Keep freed memory in the process (glibc ``mallopt``), so that a step or a forward does not page-fault
    its tensors afresh: with glibc's defaults, large freed blocks go back to the system, and timings then
    depend on what else the process allocated before (docs/sparsify.md, "Latency benchmark")."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 2**31 - 1), (m_top_pad, 1 << 28)):
        if libc.mallopt(option, value) != 1:
            raise RuntimeError(f"mallopt({option}, {value}) failed: run with --default-malloc")


def median_step_seconds(models: dict, x, y, steps: int, warmup: int, fused_adam: bool = False, lam: float = 0.1,
                        n_train: int = 60000, compile: bool = False, block: int = 10, penalties: dict | None = None) -> dict:
    """Median training-step time of each model on one batch, the models stepped in blocks in one process.

    Each model runs ``warmup`` untimed steps, then the models take turns running ``block``
    consecutive steps each; the first step of a block (which follows another model's steps,
    with that model's data in the caches) is not timed, so a model's median does not depend on
    which models share the run. Adam (lr 1e-3) for every model; gated models add their L0
    penalty, built once as a ``Penalty`` (λ per weight over ``n_train``), as the training
    harness does (``penalties`` maps model names to other penalty callables). ``compile``: the loss (forward, cross-entropy and penalty) of every model goes
    through ``torch.compile``; its backward is then compiled too.
    """
    import statistics

    import torch

    import l0sparse

    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None) for name, model in models.items()}
    if penalties is None:
        penalties = {name: l0sparse.Penalty(model, lam, N=n_train) for name, model in models.items() if find_gates(model)}
    losses = {name: training_loss(model, penalties.get(name)) for name, model in models.items()}
    if compile:
        # the losses share one code object, which dynamo caches per guard set (8 by default, then runs eager):
        # start empty so that each call's models fit
        torch._dynamo.reset()
        losses = {name: torch.compile(loss) for name, loss in losses.items()}
    for name in models:
        for _ in range(warmup):
            timed_step(losses[name], optimizers[name], x, y)
    times = {name: [] for name in models}
    while any(len(values) < steps for values in times.values()):
        for name in models:
            for index in range(block):
                seconds = timed_step(losses[name], optimizers[name], x, y)
                if index > 0:
                    times[name].append(seconds)
    return {name: statistics.median(values[:steps]) for name, values in times.items()}


def training_loss(model, penalty):
    """``loss(x, y)``: cross-entropy of the model's outputs, plus ``penalty()`` unless it is None."""
    import torch.nn.functional as F

    def loss(x, y):
        value = F.cross_entropy(model(x), y)
        return value if penalty is None else value + penalty()

    return loss


def timed_step(loss, optimizer, x, y) -> float:
    """One training step on ``loss(x, y)`` (see :func:`training_loss`); its wall time in seconds."""
    import time

    start = time.perf_counter()
    value = loss(x, y)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return time.perf_counter() - start
