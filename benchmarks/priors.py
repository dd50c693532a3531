"""MAP-EM on small data: failures and held-out log-likelihood with and without a prior.

    python benchmarks/priors.py [--output benchmarks/results/priors-cpu.md] [--reps 20]

1. Failures. ``GaussianMixture(10, covariance_type="full")`` on N=50, D=5 standard normal data
   (numpy's generator, one dataset per seed), 10 seeds: how many fits raise IllConditionedError,
   with the default ``reg_covar`` (1e-6) and with ``reg_covar=0``, by maximum likelihood and with
   ``prior="default"``, in float64 and float32.
2. Held-out log-likelihood. iris and wine (standardised), ``--reps`` random subsamples of
   N = 30 training points, K = 3, each covariance type: the mean and median held-out
   log-likelihood per point of the MLE fit and of the MAP fit (``prior="default"``), the median
   per-subsample gain and in how many subsamples MAP wins. Fits that raise count as failures.

No timings: quality only. Runs in about a minute on two cores.
"""
from __future__ import annotations

import warnings

import numpy as np
import report
import torch
from sklearn import datasets

import torch_em

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def failure_counts(prior, reg_covar: float, dtype: torch.dtype) -> int:
    failures = 0
    for seed in range(10):
        X = torch.tensor(np.random.default_rng(seed).normal(size=(50, 5)), dtype=dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch_em.GaussianMixture(10, covariance_type="full", reg_covar=reg_covar, seed=seed, prior=prior).fit(X)
        except torch_em.IllConditionedError:
            failures += 1
    return failures


def held_out(name: str, covariance_type: str, repeats: int) -> dict:
    X = torch.tensor(getattr(datasets, f"load_{name}")().data)
    X = (X - X.mean(0)) / X.std(0)
    rng = np.random.default_rng(0)
    scores = {None: [], "default": []}
    for repeat in range(repeats):
        order = rng.permutation(len(X))
        train, test = X[order[:30]], X[order[30:]]
        for prior in scores:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = torch_em.GaussianMixture(3, covariance_type=covariance_type, seed=repeat, prior=prior,
                                                     dtype=torch.float64).fit(train)
                scores[prior].append(float(model.score(test)))
            except torch_em.IllConditionedError:
                scores[prior].append(float("nan"))
    mle, map_ = np.array(scores[None]), np.array(scores["default"])
    both = ~np.isnan(mle) & ~np.isnan(map_)
    gain = map_[both] - mle[both]
    return {"mle_mean": np.nanmean(mle), "map_mean": np.nanmean(map_), "mle_median": np.nanmedian(mle),
            "map_median": np.nanmedian(map_), "gain_median": float(np.median(gain)) if gain.size else float("nan"),
            "wins": int((gain > 0).sum()), "compared": int(both.sum()),
            "failures": (int(np.isnan(mle).sum()), int(np.isnan(map_).sum()))}


def main() -> None:
    args = report.arguments(__doc__, reps=20)
    torch.set_num_threads(args.threads)
    lines = ["# MAP-EM on small data (`python benchmarks/priors.py`)", "",
             "## Fits that raise IllConditionedError: GaussianMixture(10, 'full'), N=50, D=5, 10 seeds", "",
             "| dtype | reg_covar | maximum likelihood | prior=\"default\" |", "| --- | --- | --- | --- |"]
    for dtype in (torch.float64, torch.float32):
        for reg in (1e-6, 0.0):
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {reg:g} | {failure_counts(None, reg, dtype)} / 10 "
                         f"| {failure_counts('default', reg, dtype)} / 10 |")
    lines += ["", f"## Held-out log-likelihood per point, N = 30 training points, K = 3, {args.reps} subsamples", "",
              "| data | covariance | MLE mean | MAP mean | MLE median | MAP median | median gain | MAP wins | "
              "failures (MLE, MAP) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("iris", "wine"):
        for kind in COVARIANCE_TYPES:
            r = held_out(name, kind, args.reps)
            lines.append(f"| {name} | {kind} | {r['mle_mean']:.4g} | {r['map_mean']:.4g} | {r['mle_median']:.4g} | "
                         f"{r['map_median']:.4g} | {r['gain_median']:+.3g} | {r['wins']} / {r['compared']} | "
                         f"{r['failures']} |")
    report.emit(lines, args.output)


if __name__ == "__main__":
    main()
