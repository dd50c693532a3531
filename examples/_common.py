"""Helpers shared by the differentiable-EM examples (deep_clustering, anomaly_detection,
set_classifier): seeding, mini-batches, a small autoencoder, one warm-started EM step,
clustering scores, a results table and optional matplotlib (also used by hmm_regimes).
Not an example itself."""
from __future__ import annotations

import random
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

import torch_em


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices (batch_size,) of one shuffled pass over n items (the last batch may be smaller)."""
    yield from torch.randperm(n, generator=generator).split(batch_size)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AutoEncoder(nn.Module):
    """MLP encoder x (N, D) -> z (N, L) and mirrored decoder z -> x_hat (N, D).

    The latent code is batch-standardised (BatchNorm without a learned scale): a mixture's
    log-likelihood grows without bound when the codes shrink, and a decoder can undo any
    shrinking, so a reconstruction loss alone does not stop that collapse; a fixed overall scale
    does. (In eval mode the running mean and variance are used.)
    """

    def __init__(self, n_features: int, hidden: Sequence[int], n_latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(mlp([n_features, *hidden, n_latent]), nn.BatchNorm1d(n_latent, affine=False))
        self.decoder = mlp([n_latent, *reversed(hidden), n_features])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)  # (N, L)
        return z, self.decoder(z)  # (N, L), (N, D)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (N, L) in eval mode, no graph."""
        was_training = self.training
        self.eval()
        z = self.encoder(x)
        self.train(was_training)
        return z


def pretrain_autoencoder(
    model: AutoEncoder, X: torch.Tensor, epochs: int, batch_size: int, lr: float, generator: torch.Generator
) -> list[float]:
    """Plain reconstruction training (mean squared error); returns the loss per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        total = 0.0
        for index in minibatches(len(X), batch_size, generator):
            _, x_hat = model(X[index])
            loss = (x_hat - X[index]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(X))
    return history


def em_step(mixture: torch_em.GaussianMixture, X: torch.Tensor, n_steps: int = 1) -> None:
    """``n_steps`` EM iterations from the mixture's current parameters on detached data (N, D).

    Needs ``warm_start=True`` and ``max_iter=1``; the "did not converge" warning of a one-step fit
    is expected and silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        for _ in range(n_steps):
            mixture.fit(X.detach())


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    n = int(max(y_true.max(), y_pred.max())) + 1
    counts = np.zeros((n, n), dtype=np.int64)  # (cluster, class)
    np.add.at(counts, (y_pred, y_true), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(y_true))


def cluster_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Hungarian accuracy and normalised mutual information."""
    from sklearn.metrics import normalized_mutual_info_score

    return {"acc": cluster_accuracy(y_true, y_pred), "nmi": float(normalized_mutual_info_score(y_true, y_pred))}


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table: the first column left-aligned, numbers with 3 decimals."""
    cells = [[f"{value:.3f}" if isinstance(value, float) else str(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        return " | ".join([first.ljust(widths[0]), *(v.rjust(w) for v, w in zip(rest, widths[1:]))])

    print(f"\n{title}")
    print(line([str(h) for h in header]))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


def mean_std(values: Sequence[float]) -> str:
    """'0.712 ± 0.034' (or just the value for a single run)."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f}" if len(values) == 1 else f"{values.mean():.3f} ± {values.std():.3f}"


def pyplot():
    """matplotlib.pyplot with a file backend, or None (and a message) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    return plt
