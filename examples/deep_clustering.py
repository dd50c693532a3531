"""Deep clustering of handwritten digits: an encoder and a Gaussian-mixture head trained jointly.

Data: scikit-learn's bundled digits (1,797 8x8 images, 10 classes; nothing is downloaded).

Model: an MLP autoencoder 64 -> 256 -> 128 -> L (L=10) with a ``torch_em.GaussianMixture``
(K=10, full covariances) on the latent codes. After pretraining the autoencoder, one loop
trains both:

* the encoder and decoder by gradients of ``reconstruction + weight * (-mixture.log_prob(z))``:
  the mixture term pulls each code towards the component that explains it (a clustering loss),
  the gradient flowing through ``log_prob`` into the encoder;
* the mixture by EM on the detached codes, one warm-started EM step (``warm_start=True,
  max_iter=1``) per epoch. EM owns all of its parameters, so they are frozen for the optimizer
  (``requires_grad_(False)``) and no optimizer moments go stale when EM overwrites them.

Why the regularisers: the mixture likelihood of the codes grows without bound when the codes
shrink (and a decoder can undo any shrinking), or when all codes of a cluster collapse to a
point. The codes are therefore batch-standardised (a fixed overall scale), the reconstruction
loss keeps the information within a cluster (no collapse to K points) and ``reg_covar`` bounds
each component's density.

Compared with scikit-learn's GaussianMixture (same K) on the raw pixels and on PCA features, and
with the mixture on the pretrained codes before joint training, over a few seeds. Clustering
accuracy uses the best one-to-one matching of clusters to classes (Hungarian); NMI from sklearn.

Run:  python examples/deep_clustering.py [--seeds 5] [--epochs 60] [--plot deep_clustering.png]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import torch_em

from _common import (AutoEncoder, cluster_scores, em_step, mean_std, minibatches, pretrain_autoencoder, print_table,
                     pyplot, seed_everything)  # examples/_common.py (examples/ is on sys.path when run as a script)


def load_digits() -> tuple[torch.Tensor, np.ndarray]:
    """Pixels scaled to [0, 1]: X (1797, 64) float32, labels (1797,)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return torch.tensor(digits.data / 16.0, dtype=torch.float32), digits.target


def sklearn_baselines(X: np.ndarray, y: np.ndarray, K: int, seeds: list[int], pca_dim: int) -> dict[str, list[dict]]:
    """scikit-learn GaussianMixture on raw pixels (diagonal covariances: 64-D full ones are
    singular on blank pixels) and on PCA features (full covariances), one fit per seed."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    results: dict[str, list[dict]] = {"GMM (sklearn), raw pixels, diag": [], f"GMM (sklearn), PCA-{pca_dim}, full": []}
    for seed in seeds:
        raw = GaussianMixture(K, covariance_type="diag", random_state=seed).fit(X)
        results["GMM (sklearn), raw pixels, diag"].append(cluster_scores(y, raw.predict(X)))
        features = PCA(pca_dim, random_state=seed).fit_transform(X)
        pca = GaussianMixture(K, covariance_type="full", random_state=seed).fit(features)
        results[f"GMM (sklearn), PCA-{pca_dim}, full"].append(cluster_scores(y, pca.predict(features)))
    return results


def joint_training(
    model: AutoEncoder, mixture: torch_em.GaussianMixture, X: torch.Tensor, args: argparse.Namespace,
    generator: torch.Generator,
) -> list[float]:
    """Encoder/decoder by gradients of reconstruction + weight * mixture NLL, the mixture by one
    EM step per epoch on the detached codes. Returns the mean loss per epoch."""
    mixture.requires_grad_(False)  # EM owns every mixture parameter
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []
    for _ in range(args.epochs):
        em_step(mixture, model.encode(X))  # codes (N, L) of the whole dataset, no graph
        total = 0.0
        for index in minibatches(len(X), args.batch_size, generator):
            z, x_hat = model(X[index])  # (B, L), (B, 64)
            reconstruction = (x_hat - X[index]).square().sum(-1).mean()
            nll = -mixture.log_prob(z).mean()  # gradient to z through the mixture density
            loss = reconstruction + args.cluster_weight * nll
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(X))
    em_step(mixture, model.encode(X))
    return history


def deep_clustering(X: torch.Tensor, y: np.ndarray, seed: int, args: argparse.Namespace) -> dict:
    """Pretrain, fit the mixture on the codes, train jointly; scores before and after."""
    generator = seed_everything(seed)
    model = AutoEncoder(X.shape[1], args.hidden, args.latent)
    pretrain_autoencoder(model, X, args.pretrain_epochs, args.batch_size, args.lr, generator)
    mixture = torch_em.GaussianMixture(
        args.components, covariance_type=args.covariance, reg_covar=args.reg_covar, n_init=args.n_init, seed=seed
    )
    mixture.fit(model.encode(X))  # a full EM fit on the pretrained codes
    before = cluster_scores(y, mixture.predict(model.encode(X)).numpy())
    mixture.warm_start, mixture.max_iter = True, 1  # from now on fit() is one EM step
    history = joint_training(model, mixture, X, args, generator)
    codes = model.encode(X)
    after = cluster_scores(y, mixture.predict(codes).numpy())
    return {"before": before, "after": after, "loss": history, "codes": codes, "labels": mixture.predict(codes).numpy()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs with seeds 0 .. seeds-1")
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--latent", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--covariance", default="full", choices=["full", "diag", "spherical", "tied"])
    parser.add_argument("--reg-covar", type=float, default=1e-2)
    parser.add_argument("--n-init", type=int, default=4, help="restarts of the initial mixture fit")
    parser.add_argument("--pretrain-epochs", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=60, help="joint training epochs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cluster-weight", type=float, default=0.03, help="weight of the mixture NLL")
    parser.add_argument("--pca-dim", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images (tests)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the codes (needs matplotlib)")
    return parser.parse_args(argv)


def plot_codes(codes: torch.Tensor, y: np.ndarray, clusters: np.ndarray, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    from sklearn.decomposition import PCA

    projected = PCA(2, random_state=0).fit_transform(codes.numpy())  # (N, 2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, colours, title in [(axes[0], y, "true digit"), (axes[1], clusters, "mixture component")]:
        ax.scatter(projected[:, 0], projected[:, 1], c=colours, s=4, cmap="tab10")
        ax.set_title(f"latent codes (PCA), coloured by {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    X, y = load_digits()
    if args.limit is not None:
        X, y = X[: args.limit], y[: args.limit]
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    results = sklearn_baselines(X.numpy(), y, args.components, seeds, args.pca_dim)
    runs = [deep_clustering(X, y, seed, args) for seed in seeds]
    results[f"AE + GMM (torch_em), pretrained codes, {args.covariance}"] = [run["before"] for run in runs]
    results[f"AE + GMM (torch_em), joint training, {args.covariance}"] = [run["after"] for run in runs]
    rows = [[name, mean_std([s["acc"] for s in scores]), mean_std([s["nmi"] for s in scores])]
            for name, scores in results.items()]
    print_table(f"Clustering sklearn digits (N={len(X)}, K={args.components}, {len(seeds)} seed(s), "
                f"{time.perf_counter() - start:.1f} s)", ["method", "ACC", "NMI"], rows)
    losses = [run["loss"] for run in runs]
    print(f"joint loss, first -> last epoch (seed 0): {losses[0][0]:.3f} -> {losses[0][-1]:.3f}")
    if args.plot is not None:
        plot_codes(runs[0]["codes"], y, runs[0]["labels"], args.plot)
    return {"scores": results, "losses": losses}


if __name__ == "__main__":
    main()
