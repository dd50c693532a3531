"""torch_em quickstart: fit a Gaussian mixture, choose K by BIC, fit 1,000 small models at once.

Run:  python examples/quickstart.py            (writes quickstart.png when matplotlib is installed)
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import torch_em


def make_data(n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three anisotropic 2-D Gaussian clusters: X (n, 2) and the true labels (n,)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [4.0, 4.0], [-3.0, 5.0]])
    scales = torch.tensor([[[1.0, 0.0], [0.6, 0.5]], [[0.5, 0.0], [0.0, 1.2]], [[1.2, 0.0], [-0.8, 0.4]]])
    labels = torch.randint(3, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    return means[labels] + (scales[labels] @ noise.unsqueeze(-1)).squeeze(-1), labels


def save_ellipses(model: torch_em.GaussianMixture, X: torch.Tensor, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    angles = torch.linspace(0, 2 * torch.pi, 100)
    circle = torch.stack([angles.cos(), angles.sin()])  # (2, 100)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(X[:, 0], X[:, 1], c=model.predict(X), s=3, cmap="viridis", alpha=0.5)
    with torch.no_grad():
        for mean, cov in zip(model.means, model.covariances):
            chol = torch.linalg.cholesky(cov)
            for n_std in (1, 2):
                ellipse = mean[:, None] + n_std * chol @ circle
                ax.plot(ellipse[0], ellipse[1], "k", lw=1)
    ax.set_title("torch_em.GaussianMixture: 1 and 2 standard deviations")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")


def main() -> None:
    X, _ = make_data()
    model = torch_em.GaussianMixture(n_components=3, covariance_type="full", seed=0)
    model.fit(X, verbose=True)
    print(model)
    print(f"converged: {bool(model.converged_)} after {int(model.n_iter_)} iterations, "
          f"mean log-likelihood {float(model.lower_bound_):.4f}")
    print("weights:", model.weights.detach().numpy().round(3))
    print("means:\n", model.means.detach().numpy().round(3))
    print("covariances:\n", model.covariances.detach().numpy().round(3))

    # Model selection in one batched call: K = 1..6 for two covariance types, padded components masked.
    selection = torch_em.select(X, n_components=range(1, 7), covariance_type=("full", "diag"), seed=0)
    print("\nBIC, AIC and ICL per covariance type and number of components (lower is better):")
    print(selection.table)
    print(f"chosen: {selection.best_.covariance_type}, K={selection.best_.n_components} (the data have 3 clusters)")

    # The headline feature: many independent models in one set of tensor ops.
    datasets = torch.stack([make_data(500, seed=s)[0] for s in range(1000)])  # (1000, 500, 2)
    batch = torch_em.GaussianMixture(3, batch_shape=(1000,), seed=0)
    start = time.perf_counter()
    batch.fit(datasets)
    seconds = time.perf_counter() - start
    print(f"\n1000 independent 3-component fits of 500 points each: {seconds:.2f} s, "
          f"{int(batch.converged_.sum())} converged, median {int(batch.n_iter_.median())} iterations")

    save_ellipses(model, X, Path("quickstart.png"))


if __name__ == "__main__":
    main()
