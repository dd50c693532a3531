"""float32 accuracy of Gaussian-mixture log-densities: torch_em against scikit-learn.

For every dataset bundled with scikit-learn (iris, wine, breast_cancer, digits; raw and
standardised), covariance type and K, a float64 scikit-learn fit gives the parameters. Each library
then evaluates ``score_samples`` in float32 from those parameters rounded to float32, and its error
is measured against a float64 evaluation of exactly the parameters it holds (scikit-learn's float64
formula applied to the library's own float32 parameters, cast up): the error of the evaluation
alone, max over points, in nats.

    python benchmarks/float32_accuracy.py [--out benchmarks/results/float32-accuracy.md]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

import torch_em

DATASETS = ("iris", "wine", "breast_cancer", "digits")
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
COMPONENTS = (2, 3, 5, 10)


def load(name: str, standardise: bool) -> np.ndarray:
    from sklearn import datasets

    X = getattr(datasets, f"load_{name}")().data.astype(np.float64)
    if standardise:
        scale = X.std(0)
        X = (X - X.mean(0)) / np.where(scale > 0, scale, 1.0)
    return X


def two_constant_clusters(offset: float = 0.0) -> np.ndarray:
    """Two clusters in 3-D, the last feature constant within each (at ``offset`` and ``offset + 1``)."""
    rng = np.random.default_rng(0)
    a = np.c_[rng.normal(size=(200, 2)), np.full(200, offset)]
    b = np.c_[rng.normal(size=(200, 2)) + 4, np.full(200, offset + 1.0)]
    return np.concatenate([a, b])


def sklearn_log_prob(X, weights, means, precisions_cholesky, covariance_type) -> np.ndarray:
    """scikit-learn's own formula in the dtype of its arguments: (N,)."""
    from scipy.special import logsumexp
    from sklearn.mixture._gaussian_mixture import _estimate_log_gaussian_prob

    log_joint = _estimate_log_gaussian_prob(X, means, precisions_cholesky, covariance_type) + np.log(weights)
    return logsumexp(log_joint, axis=1)


@dataclass
class Case:
    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str


def reference_fit(X: np.ndarray, covariance_type: str, n_components: int, seed: int = 0, max_iter: int = 200) -> Case:
    """Parameters of a float64 scikit-learn fit (converged or not: any realistic parameters do)."""
    import warnings

    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fit stopped at max_iter
        fit = GaussianMixture(n_components, covariance_type=covariance_type, random_state=seed,
                              max_iter=max_iter).fit(X)
    return Case(fit.weights_, fit.means_, fit.precisions_cholesky_, covariance_type)


def torch_em_reference_fit(X: np.ndarray, covariance_type: str, n_components: int, seed: int = 0,
                           max_iter: int = 10) -> Case:
    """Parameters of a float64 torch_em fit (faster than scikit-learn's on 64-D data; the tests use it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = torch_em.GaussianMixture(n_components, covariance_type=covariance_type, seed=seed, max_iter=max_iter,
                                       dtype=torch.float64).fit(X)
    return Case(*(value.detach().numpy() for value in (fit.weights, fit.means, fit.precisions_cholesky)),
                covariance_type)


def sklearn_float32_error(X: np.ndarray, case: Case) -> float:
    w, mu, P = (np.asarray(a, np.float32) for a in (case.weights, case.means, case.precisions_cholesky))
    approx = sklearn_log_prob(X.astype(np.float32), w, mu, P, case.covariance_type)
    exact = sklearn_log_prob(X, w.astype(np.float64), mu.astype(np.float64), P.astype(np.float64), case.covariance_type)
    return float(np.abs(approx.astype(np.float64) - exact).max())


def torch_em_model(case: Case, dtype: torch.dtype) -> torch_em.GaussianMixture:
    """A GaussianMixture holding the case's parameters in ``dtype``: the precision Cholesky
    factor written directly into the unconstrained parameter (log diagonal)."""
    from torch_em.families.gaussian import pack_raw_triangular

    K, D = case.means.shape
    model = torch_em.GaussianMixture(K, D, covariance_type=case.covariance_type, dtype=dtype)
    P = torch.as_tensor(case.precisions_cholesky, dtype=dtype)
    raw = pack_raw_triangular(P) if case.covariance_type in ("full", "tied") else P.log()
    with torch.no_grad():
        model.logits.copy_(torch.as_tensor(np.log(case.weights), dtype=dtype))
        model.loc.copy_(torch.as_tensor(case.means, dtype=dtype))
        model.raw_precision_cholesky.copy_(raw)
    return model


def torch_em_float32_error(X: np.ndarray, case: Case) -> float:
    model = torch_em_model(case, torch.float32)
    approx = model.score_samples(torch.as_tensor(X, dtype=torch.float32)).double().numpy()
    # The float64 reference evaluates exactly the parameters the float32 model holds.
    with torch.no_grad():
        held = model.double()
        P = held.precisions_cholesky.numpy()
        exact = sklearn_log_prob(X, held.weights.numpy(), held.means.numpy(), P, case.covariance_type)
    return float(np.abs(approx - exact).max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = ["| data | covariance | K | torch_em float32 | scikit-learn float32 | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    worst = 0.0
    cases = [(f"{name} {'std' if std else 'raw'}", load(name, std)) for name in DATASETS for std in (False, True)]
    cases.append(("two clusters, constant feature", two_constant_clusters()))
    for label, X in cases:
        for covariance_type in COVARIANCE_TYPES:
            for K in COMPONENTS:
                case = reference_fit(X, covariance_type, K)
                ours, theirs = torch_em_float32_error(X, case), sklearn_float32_error(X, case)
                ratio = ours / max(theirs, 1e-12)
                worst = max(worst, ratio)
                rows.append(f"| {label} | {covariance_type} | {K} | {ours:.2e} | {theirs:.2e} | {ratio:.2f} |")
                print(rows[-1], flush=True)
    rows.append(f"\nworst ratio torch_em / scikit-learn: {worst:.2f}")
    print(rows[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
