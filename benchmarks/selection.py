"""Model selection: the grid K = 1..10 x four covariance types in one call, against loops.

    python benchmarks/selection.py [--reps 3] [--threads 2] [--output benchmarks/results/selection-cpu.md]

Data: N=10,000, D=8, six Gaussian clusters (scikit-learn's ``make_blobs``, ``cluster_std=2``),
float64. Three ways to fit the 40 models with default settings (tol 1e-3, k-means++
initialisation, n_init=1):

- ``torch_em.select``: one batched fit per covariance type (K a batch dimension, masked components);
- torch_em one by one: ``GaussianMixture(k, covariance_type=...).fit(X)`` in a Python loop;
- scikit-learn one by one: ``sklearn.mixture.GaussianMixture(k, ...).fit(X)`` in a loop.

Wall time of the whole grid, repetitions interleaved, median reported; torch and BLAS use
``--threads`` threads. The table also gives the BIC-chosen model of each way.
Target: select at least 5x faster than torch_em one by one.
"""
from __future__ import annotations

import statistics
import time
import warnings

import report

GRID = range(1, 11)
KINDS = ("full", "tied", "diag", "spherical")


def main() -> None:
    args = report.arguments(__doc__)
    import numpy as np
    import torch
    from sklearn.datasets import make_blobs
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    import torch_em

    torch.set_num_threads(args.threads)
    X_np, _ = make_blobs(10_000, n_features=8, centers=6, cluster_std=2.0, random_state=0)
    X = torch.tensor(X_np)

    def batched():
        result = torch_em.select(X, GRID, KINDS, seed=0)
        return result.best_.covariance_type, result.best_.n_components

    def torch_loop():
        best = (np.inf, None)
        for kind in KINDS:
            for k in GRID:
                model = torch_em.GaussianMixture(k, covariance_type=kind, seed=0).fit(X)
                best = min(best, (float(model.bic(X)), (kind, k)), key=lambda item: item[0])
        return best[1]

    def sklearn_loop():
        best = (np.inf, None)
        for kind in KINDS:
            for k in GRID:
                model = SkGaussianMixture(k, covariance_type=kind, random_state=0).fit(X_np)
                best = min(best, (float(model.bic(X_np)), (kind, k)), key=lambda item: item[0])
        return best[1]

    ways = {"torch_em.select (batched)": batched, "torch_em one by one": torch_loop, "scikit-learn one by one": sklearn_loop}
    times = {name: [] for name in ways}
    chosen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched()  # warm-up
        for _ in range(args.reps):
            for name, run in ways.items():
                start = time.perf_counter()
                chosen[name] = run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["torch_em.select (batched)"]
    lines = [f"# Model selection, K = 1..10 x {len(KINDS)} covariance types, N=10,000, D=8, float64 "
             f"(`python benchmarks/selection.py --reps {args.reps} --threads {args.threads}`)", "",
             "| way | median wall time (s) | ratio to select | chosen by BIC |", "| --- | --- | --- | --- |"]
    for name, median in medians.items():
        kind, k = chosen[name]
        lines.append(f"| {name} | {median:.2f} | {median / base:.1f}x | {kind}, K={k} |")
    report.emit(lines, args.output)


if __name__ == "__main__":
    main()
