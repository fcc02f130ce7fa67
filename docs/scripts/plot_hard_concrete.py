"""Draw docs/img/hard_concrete.png: the Hard Concrete density and its point masses.

Run with `make figures` (or `python docs/scripts/plot_hard_concrete.py`).
The density on (0, 1) is the derivative of l0sparse's own CDF, taken by autograd.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from l0sparse import HardConcrete

OUT = Path(__file__).resolve().parents[1] / "img" / "hard_concrete.png"


def density(dist: HardConcrete, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(dist.cdf(x).sum(), x)
    return grad


def panel(ax, settings, title):
    x = torch.linspace(1e-3, 1 - 1e-3, 800, dtype=torch.float64)
    colors = plt.cm.viridis([0.1, 0.45, 0.8])
    for (log_alpha, beta), color in zip(settings, colors):
        dist = HardConcrete(torch.tensor(log_alpha, dtype=torch.float64), beta=beta)
        p0, p1 = float(dist.prob_zero()), float(dist.prob_one())
        label = f"log α = {log_alpha:g}, β = {beta:.3g}:  P(z=0) = {p0:.2f}, P(z=1) = {p1:.2f}"
        ax.plot(x, density(dist, x.unsqueeze(0).expand(1, -1)).squeeze(0), color=color, lw=2, label=label)
        # point masses drawn as stems whose height is the probability (right axis)
        for end, mass, offset in ((0.0, p0, -0.012), (1.0, p1, 0.012)):
            ax.twin.vlines(end + offset * (settings.index((log_alpha, beta)) - 1), 0, mass, color=color, lw=4, alpha=0.85)
    ax.set_xlim(-0.06, 1.06)
    ax.set_xlabel("gate value z")
    ax.set_ylabel("density on (0, 1)")
    ax.twin.set_ylabel("point mass at 0 and at 1 (bars)")
    ax.twin.set_ylim(0, 1)
    ax.set_ylim(0, None)
    ax.set_title(title)
    ax.legend(loc="upper center", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)


def main() -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    for ax in axes:
        ax.twin = ax.twinx()
    panel(axes[0], [(-2.0, 2 / 3), (0.0, 2 / 3), (2.0, 2 / 3)], "location: larger log α opens the gate (β = 2/3)")
    panel(axes[1], [(0.0, 0.1), (0.0, 2 / 3), (0.0, 1.5)], "temperature: small β pushes mass to 0 and 1 (log α = 0)")
    for ax in axes:
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.45)  # room for the legend
    fig.suptitle("Hard Concrete (γ = -0.1, ζ = 1.1): a density inside (0, 1) plus exact masses at 0 and 1")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=130)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
