"""Streaming with torch_em: exact EM over data that never sits in memory, and online EM that
tracks a drifting stream.

Run:  python examples/streaming.py [--points 10000000]   (writes streaming.png with matplotlib)
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Iterator

import torch

import torch_em

TRUE_MEANS = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-4.0, 6.0]])


def batches(n_points: int, batch_size: int = 500_000, seed: int = 0) -> Iterator[torch.Tensor]:
    """The same pseudo-random stream on every pass (seeded): batches (n, 2) of three clusters."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n_points, batch_size):
        n = min(batch_size, n_points - start)
        labels = torch.randint(3, (n,), generator=generator)
        yield TRUE_MEANS[labels] + torch.randn(n, 2, generator=generator)


def exact_em_over_a_stream(n_points: int) -> None:
    print(f"Exact EM over {n_points:,} generated points (one pass per iteration, never all in memory)")
    start = time.perf_counter()
    model = torch_em.GaussianMixture(3, seed=0, tol=1e-4).fit(lambda: batches(n_points), verbose=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  {int(model.n_iter_)} iterations in {time.perf_counter() - start:.1f} s, peak memory {peak:.2f} GiB "
          f"(the data would take {n_points * 2 * 4 / 2**30:.2f} GiB)")
    print("  means:", model.means.detach().numpy().round(3).tolist())


def track_a_drifting_stream(steps: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two clusters drift; online EM with a constant step size follows them, a decaying one lags."""
    generator = torch.Generator().manual_seed(1)
    constant = torch_em.GaussianMixture(2, seed=0, step_size=0.2)
    decaying = torch_em.GaussianMixture(2, seed=0)  # rho_t = (t + 10) ** -0.7
    truth, tracked_constant, tracked_decaying = [], [], []
    for t in range(steps):
        centre = torch.tensor([[0.04 * t, 0.0], [0.04 * t, 6.0]])
        labels = torch.randint(2, (300,), generator=generator)
        batch = centre[labels] + 0.5 * torch.randn(300, 2, generator=generator)
        constant.partial_fit(batch)
        decaying.partial_fit(batch)
        truth.append(centre[0, 0])
        tracked_constant.append(constant.means[:, 0].detach().mean())
        tracked_decaying.append(decaying.means[:, 0].detach().mean())
    print(f"Drifting stream after {steps} batches: true x {float(truth[-1]):.2f}, constant step "
          f"{float(tracked_constant[-1]):.2f}, decaying step {float(tracked_decaying[-1]):.2f}")
    return torch.stack(truth), torch.stack(tracked_constant), torch.stack(tracked_decaying)


def plot(truth, constant, decaying, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(truth, "k", label="true mean (x)")
    ax.plot(constant, label="online EM, constant step 0.2")
    ax.plot(decaying, label="online EM, decaying step")
    ax.set_xlabel("batch")
    ax.set_ylabel("x of the cluster means")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=10_000_000)
    args = parser.parse_args()
    exact_em_over_a_stream(args.points)
    plot(*track_a_drifting_stream(), Path("streaming.png"))


if __name__ == "__main__":
    main()
