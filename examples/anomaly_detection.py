"""Anomaly detection with an autoencoder and a Gaussian-mixture energy, trained jointly (DAGMM-style).

Data: scikit-learn's bundled breast-cancer set (569 tumours, 30 standardised measurements;
nothing is downloaded). The model is trained on benign tumours only; malignant ones are the
anomalies. Each seed draws its own split: 70% of the benign cases train, the other benign cases
and all malignant ones are the test set.

Model (after Zong et al., "Deep autoencoding Gaussian mixture model", ICLR 2018): an MLP
autoencoder 30 -> 32 -> 8 whose features for the density are ``[z (8), relative reconstruction
error, cosine similarity of x and x_hat]`` (10-D); a ``torch_em.GaussianMixture`` (K=2, full
covariances) on them gives the energy ``-log p(features)``. Joint training minimises
``reconstruction + weight * mean energy``:

* the autoencoder by gradients, the energy's gradient flowing through ``log_prob`` into the
  features, so the encoder learns features in which normal data is dense;
* the mixture by one warm-started EM step per epoch on the detached features of the whole
  training set. DAGMM instead predicts memberships with an "estimation network" and takes the
  closed-form M-step on each mini-batch; EM gives that M-step its own optimal memberships and the
  statistics of all training points, with no extra network to train. EM owns every mixture
  parameter, so they are frozen for the optimizer (``requires_grad_(False)``).

As in ``deep_clustering.py``, the latent code is batch-standardised (the likelihood would
otherwise reward shrinking it) and ``reg_covar`` bounds each component's density.

Anomalies are the test points whose energy exceeds the given percentile of the training energies
(95th: about 5% of normal cases flagged). Reported: precision, recall, F1 of the anomaly class and
the threshold-free ROC-AUC, against scikit-learn's GaussianMixture density on the standardised raw
features (same K), the autoencoder's reconstruction error alone, and the mixture on the pretrained
features before joint training; mean ± std over seeds (splits).

Run:  python examples/anomaly_detection.py [--seeds 5] [--percentile 95] [--plot anomaly_detection.png]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import torch_em

from _common import (AutoEncoder, em_step, mean_std, minibatches, pretrain_autoencoder, print_table, pyplot,
                     seed_everything)  # examples/_common.py (examples/ is on sys.path when run as a script)


def load_split(seed: int, train_fraction: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Standardised (with training statistics) X_train (n, 30) of benign cases only, X_test
    (m, 30) and its labels (m,) with 1 = malignant (anomaly)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X, anomaly = data.data, (data.target == 0).astype(np.int64)  # sklearn: 0 = malignant
    rng = np.random.default_rng(seed)
    benign = rng.permutation(np.flatnonzero(anomaly == 0))
    n_train = int(train_fraction * len(benign))
    train, test = benign[:n_train], np.concatenate([benign[n_train:], np.flatnonzero(anomaly == 1)])
    mean, std = X[train].mean(0), X[train].std(0)
    as_tensor = lambda rows: torch.tensor((X[rows] - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_tensor(train), as_tensor(test), anomaly[test]


def density_features(model: AutoEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DAGMM features (N, L + 2) = [z, relative euclidean error, cosine similarity] and x_hat (N, D)."""
    z, x_hat = model(x)
    relative = (x - x_hat).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)  # (N,)
    cosine = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1)  # (N,)
    return torch.cat([z, relative[:, None], cosine[:, None]], -1), x_hat


@torch.no_grad()
def eval_features(model: AutoEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, L + 2) and squared reconstruction errors (N,) in eval mode, no graph."""
    model.eval()
    features, x_hat = density_features(model, x)
    model.train()
    return features, (x - x_hat).square().sum(-1)


def joint_training(
    model: AutoEncoder, mixture: torch_em.GaussianMixture, X: torch.Tensor, args: argparse.Namespace,
    generator: torch.Generator,
) -> list[float]:
    """Autoencoder by gradients of reconstruction + weight * energy, the mixture by one EM step
    per epoch on the detached training features. Returns the mean loss per epoch."""
    mixture.requires_grad_(False)  # EM owns every mixture parameter
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []
    for _ in range(args.epochs):
        em_step(mixture, eval_features(model, X)[0])
        total = 0.0
        for index in minibatches(len(X), args.batch_size, generator):
            features, x_hat = density_features(model, X[index])  # (B, L + 2), (B, D)
            reconstruction = (x_hat - X[index]).square().sum(-1).mean()
            energy = -mixture.log_prob(features).mean()
            loss = reconstruction + args.energy_weight * energy
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(X))
    em_step(mixture, eval_features(model, X)[0])
    return history


def detection_scores(train_scores: np.ndarray, test_scores: np.ndarray, y: np.ndarray, percentile: float) -> dict:
    """Anomaly = score above the percentile of the training scores (higher = more anomalous)."""
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    flagged = test_scores > np.percentile(train_scores, percentile)
    precision, recall, f1, _ = precision_recall_fscore_support(y, flagged, average="binary", zero_division=0)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
            "roc_auc": float(roc_auc_score(y, test_scores))}


def sklearn_baseline(X_train: torch.Tensor, X_test: torch.Tensor, y: np.ndarray, seed: int, args: argparse.Namespace) -> dict:
    """scikit-learn GaussianMixture on the standardised raw features; score = -log density."""
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(args.components, covariance_type="full", reg_covar=1e-3, random_state=seed)
    gmm.fit(X_train.numpy())
    return detection_scores(-gmm.score_samples(X_train.numpy()), -gmm.score_samples(X_test.numpy()), y, args.percentile)


def dagmm(X_train: torch.Tensor, X_test: torch.Tensor, y: np.ndarray, seed: int, args: argparse.Namespace) -> dict:
    """Pretrain the autoencoder, fit the mixture on its features, train jointly; scores of the
    reconstruction error and of the energy before and after joint training."""
    generator = seed_everything(seed)
    model = AutoEncoder(X_train.shape[1], args.hidden, args.latent)
    pretrain_autoencoder(model, X_train, args.pretrain_epochs, args.batch_size, args.lr, generator)
    train_features, train_error = eval_features(model, X_train)
    test_features, test_error = eval_features(model, X_test)
    results = {"reconstruction": detection_scores(train_error.numpy(), test_error.numpy(), y, args.percentile)}
    mixture = torch_em.GaussianMixture(args.components, covariance_type="full", reg_covar=args.reg_covar,
                                       n_init=args.n_init, seed=seed)
    mixture.fit(train_features)

    def energy_scores() -> dict:
        train_energy = -mixture.score_samples(eval_features(model, X_train)[0])
        test_energy = -mixture.score_samples(eval_features(model, X_test)[0])
        return detection_scores(train_energy.numpy(), test_energy.numpy(), y, args.percentile)

    results["before"] = energy_scores()
    mixture.warm_start, mixture.max_iter = True, 1  # from now on fit() is one EM step
    results["loss"] = joint_training(model, mixture, X_train, args, generator)
    results["after"] = energy_scores()
    results["test_energy"] = -mixture.score_samples(eval_features(model, X_test)[0]).numpy()
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="splits and runs with seeds 0 .. seeds-1")
    parser.add_argument("--train-fraction", type=float, default=0.7, help="of the benign cases")
    parser.add_argument("--components", type=int, default=2)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32])
    parser.add_argument("--reg-covar", type=float, default=1e-3)
    parser.add_argument("--n-init", type=int, default=4, help="restarts of the initial mixture fit")
    parser.add_argument("--pretrain-epochs", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=100, help="joint training epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--energy-weight", type=float, default=0.1, help="weight of the mean energy")
    parser.add_argument("--percentile", type=float, default=95.0, help="threshold: percentile of training energies")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the test energies (needs matplotlib)")
    return parser.parse_args(argv)


def plot_energies(energy: np.ndarray, y: np.ndarray, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(energy.min(), np.percentile(energy, 99), 40)
    ax.hist(energy[y == 0], bins=bins, alpha=0.6, label="benign (normal)")
    ax.hist(energy[y == 1], bins=bins, alpha=0.6, label="malignant (anomaly)")
    ax.set_xlabel("energy = -log p(features)")
    ax.set_ylabel("test cases")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    scores: dict[str, list[dict]] = {name: [] for name in (
        f"GMM (sklearn), raw features, K={args.components}", "autoencoder, reconstruction error",
        f"AE features + GMM, pretrained, K={args.components}", f"DAGMM-style joint training, K={args.components}")}
    names = list(scores)
    losses, last = [], None
    for seed in range(args.seeds):
        X_train, X_test, y = load_split(seed, args.train_fraction)
        scores[names[0]].append(sklearn_baseline(X_train, X_test, y, seed, args))
        run = dagmm(X_train, X_test, y, seed, args)
        for name, key in zip(names[1:], ["reconstruction", "before", "after"]):
            scores[name].append(run[key])
        losses.append(run["loss"])
        last = (run["test_energy"], y) if last is None else last
    columns = ["precision", "recall", "f1", "roc_auc"]
    rows = [[name, *(mean_std([s[c] for s in runs]) for c in columns)] for name, runs in scores.items()]
    print_table(f"Breast cancer, malignant = anomaly (train: {len(X_train)} benign, test: {int((y == 0).sum())} benign + "
                f"{int(y.sum())} malignant; threshold: {args.percentile:g}th percentile of training scores; "
                f"{args.seeds} seed(s), {time.perf_counter() - start:.1f} s)", ["method", *columns], rows)
    print(f"joint loss, first -> last epoch (seed 0): {losses[0][0]:.3f} -> {losses[0][-1]:.3f}")
    if args.plot is not None:
        plot_energies(*last, args.plot)
    return {"scores": scores, "losses": losses}


if __name__ == "__main__":
    main()
