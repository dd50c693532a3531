"""A set classifier built on ``torch_em.EMLayer``: digits as point clouds, EM as the set encoder.

Data: scikit-learn's bundled digits (1,797 8x8 images; nothing is downloaded). Each image becomes
a set of points: the (x, y) coordinates of its pixels in [-1, 1]^2, weighted by their ink
(intensity / 16) through the layer's ``mask``. Blank pixels weigh 0, so every image is a set of
its own size (16 to 42 points, median 33) padded to 64.

Model: a per-point MLP embeds each point (2 -> 32 -> E, E=4); an ``EMLayer`` (K=6 Gaussian
components, full covariances, a few EM iterations from learned initial parameters) fits a
mixture to each embedded set; its weights, means and covariances (log-variances on the diagonal)
form a fixed-size description of the set that an MLP classifies. Everything trains end to end
with cross-entropy, the gradient flowing through the EM iterations into the point embedding.

The encoding does not depend on the order of the points (EM sums over them), and the
components need no sorting: every set starts EM from the same learned initial mixture, so
component k plays the same role in every set (as learned slot initialisations do).

Gradient modes: ``"unrolled"`` backpropagates through every EM iteration (memory and time grow
with n_iter; the initial mixture is learned); ``"last"`` only through the last iteration from
the detached previous state (memory independent of n_iter; the initial mixture then gets no
gradient and stays at its random start). The table reports test accuracy and seconds per
training epoch for each mode and n_iter, and a baseline MLP on the raw 64 pixels.

Run:  python examples/set_classifier.py [--epochs 30] [--modes unrolled last] [--n-iter 3 5]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import torch_em

from _common import minibatches, mlp, print_table, pyplot, seed_everything  # examples/_common.py


def digit_point_sets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Points (1797, 64, 2) on the pixel grid in [-1, 1]^2, ink weights (1797, 64) in [0, 1],
    the raw pixels (1797, 64) and the labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows, cols = np.divmod(np.arange(64), 8)
    grid = np.stack([(cols - 3.5) / 3.5, (3.5 - rows) / 3.5], -1)  # (64, 2): x right, y up
    ink = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # (1797, 64)
    points = torch.tensor(grid, dtype=torch.float32).expand(len(ink), 64, 2).contiguous()
    return points, ink, ink.clone(), digits.target


def mixture_features(state: torch_em.EMState) -> torch.Tensor:
    """(B, K * (1 + E + E(E+1)/2)): weights, means and the upper triangle of each covariance
    with its diagonal as log-variances."""
    covariances = state.covariances  # (B, K, E, E)
    E = covariances.shape[-1]
    rows, cols = torch.triu_indices(E, E)
    upper = covariances[..., rows, cols]  # (B, K, E(E+1)/2)
    upper = torch.where(rows == cols, upper.clamp_min(1e-6).log(), upper)
    return torch.cat([state.weights.unsqueeze(-1), state.means, upper], -1).flatten(1)


class EMSetClassifier(nn.Module):
    """points (B, N, 2) + mask (B, N) -> class logits (B, C) through an EM layer."""

    def __init__(self, args: argparse.Namespace, gradient: str, n_iter: int, n_classes: int = 10) -> None:
        super().__init__()
        E, K = args.embed_dim, args.components
        self.embed = mlp([2, args.hidden, E])
        family = torch_em.Gaussian("full", reg_covar=args.reg_covar)
        self.em = torch_em.EMLayer(K, E, family=family, n_iter=n_iter, gradient=gradient,
                                   prior_count=args.prior_count, seed=args.seed)
        self.head = mlp([K * (1 + E + E * (E + 1) // 2), args.hidden, n_classes])

    def forward(self, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        state = self.em(self.embed(points), mask)  # per set: a K-component mixture in E dimensions
        return self.head(mixture_features(state))


def train_and_test(model: nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor, train: np.ndarray,
                   test: np.ndarray, args: argparse.Namespace) -> dict:
    """Adam on cross-entropy; returns test accuracy, seconds per epoch and the loss per epoch.
    ``inputs`` are tensors indexed by example (points and mask, or pixels)."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history, start = [], time.perf_counter()
    for _ in range(args.epochs):
        total = 0.0
        for index in minibatches(len(train), args.batch_size, generator):
            rows = torch.as_tensor(train)[index]
            loss = nn.functional.cross_entropy(model(*(x[rows] for x in inputs)), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        history.append(total / len(train))
    seconds = (time.perf_counter() - start) / args.epochs
    with torch.no_grad():
        predicted = model(*(x[test] for x in inputs)).argmax(-1)
    return {"accuracy": float((predicted == y[test]).float().mean()), "seconds_per_epoch": seconds, "loss": history}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["unrolled", "last"], choices=["unrolled", "last", "implicit", "none"])
    parser.add_argument("--n-iter", type=int, nargs="+", default=[3, 5], help="EM iterations per forward")
    parser.add_argument("--components", type=int, default=6)
    parser.add_argument("--embed-dim", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--reg-covar", type=float, default=1e-2)
    parser.add_argument("--prior-count", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of fitted mixtures (needs matplotlib)")
    return parser.parse_args(argv)


def plot_fits(model: EMSetClassifier, points: torch.Tensor, mask: torch.Tensor, path: Path) -> None:
    """Ink weights and the responsibilities of the most probable component, for 8 digits."""
    plt = pyplot()
    if plt is None:
        return
    with torch.no_grad():
        state = model.em(model.embed(points[:8]), mask[:8])
    component = state.responsibilities.argmax(-1)  # (8, 64)
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
    for i in range(8):
        axes[0, i].imshow(mask[i].reshape(8, 8), cmap="gray_r")
        shown = np.where(mask[i].reshape(8, 8) > 0, component[i].reshape(8, 8), np.nan)
        axes[1, i].imshow(shown, cmap="tab10", vmin=0, vmax=9)
        for ax in axes[:, i]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("ink (mask)")
    axes[1, 0].set_ylabel("component")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main(argv: list[str] | None = None) -> dict:
    from sklearn.model_selection import train_test_split

    args = parse_args(argv)
    seed_everything(args.seed)
    points, mask, pixels, labels = digit_point_sets()
    if args.limit is not None:
        points, mask, pixels, labels = points[: args.limit], mask[: args.limit], pixels[: args.limit], labels[: args.limit]
    y = torch.as_tensor(labels)
    train, test = train_test_split(np.arange(len(y)), test_size=args.test_fraction, random_state=args.seed,
                                   stratify=labels if args.limit is None else None)
    results, rows, model = {}, [], None
    for n_iter in args.n_iter:
        for mode in args.modes:
            seed_everything(args.seed)
            model = EMSetClassifier(args, mode, n_iter)
            run = train_and_test(model, (points, mask), y, train, test, args)
            results[(mode, n_iter)] = run
            rows.append([f"EMLayer, gradient={mode!r}", n_iter, run["accuracy"], f"{run['seconds_per_epoch']:.2f}"])
    seed_everything(args.seed)
    baseline = train_and_test(mlp([64, 64, 10]), (pixels,), y, train, test, args)
    results["pixel MLP"] = baseline
    rows.append(["MLP on the 64 raw pixels (not a set model)", "-", baseline["accuracy"], f"{baseline['seconds_per_epoch']:.2f}"])
    print_table(f"Digits as weighted point sets (train {len(train)}, test {len(test)}, {args.epochs} epochs, seed {args.seed})",
                ["model", "n_iter", "test accuracy", "s / epoch"], rows)
    if args.plot is not None and model is not None:
        plot_fits(model, points[test], mask[test], args.plot)
    return results


if __name__ == "__main__":
    main()
