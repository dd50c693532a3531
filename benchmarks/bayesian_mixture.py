"""Variational Bayes: torch_em's BayesianGaussianMixture against scikit-learn's, per iteration.

Run from the repository root (CPU, threads pinned to 2)::

    python benchmarks/bayesian_mixture.py
    python benchmarks/bayesian_mixture.py --quick                 # smoke test
    python benchmarks/bayesian_mixture.py --output benchmarks/results/bayesian-mixture-cpu.md

Case: full covariances, N=100,000 points, D=16 features, K=16 components, sampled from a known
mixture of 16 Gaussians (fixed seed), ``weight_concentration_prior_type="dirichlet_process"``,
the other hyperparameters at their defaults; float64 and float32 (the same data rounded).

Methodology
-----------
* Same work on both sides: both start from the same responsibilities (one-hot labels of the
  components that drew the points): torch_em as ``fit(X, resp_init=labels)``, scikit-learn
  through a subclass whose ``_initialize_parameters`` calls its own ``_initialize(X, resp)``.
* Per-iteration time: ``(T(n) - T(0)) / n``, with T(n) one whole fit of exactly n iterations
  (``tol=0``: convergence never stops it; construction, validation, the data-dependent
  hyperparameters, the initial M-step and scikit-learn's closing E-step are in both terms and
  cancel) and T(0) the same without iterations (scikit-learn ``max_iter=0``, torch_em
  ``initialize``). Median over ``--reps`` repetitions, fastest repetition in brackets.
* A check line compares the lower bounds after n iterations (float64: the same computation).
* Warm-up: every contender runs once before timing; contenders are interleaved in rotating
  order within every repetition; the garbage collector is paused during a timed fit.
* Threads: OMP/MKL/OPENBLAS set to ``--threads`` (default 2) before numpy is imported and
  ``torch.set_num_threads``; the header records the load average (a machine shared with other
  work gives indicative numbers).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hmm import threads_argument  # noqa: E402  (reads --threads before numpy is imported)

THREADS = threads_argument(sys.argv[1:])
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from sklearn.mixture import BayesianGaussianMixture as SklearnBayesianGaussianMixture  # noqa: E402

import torch_em  # noqa: E402

N, D, K = 100_000, 16, 16


def problem(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, D) float64 from a mixture of K Gaussians with random means and covariances,
    and the component of each point."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=4.0, size=(K, D))
    factors = rng.normal(size=(K, D, D)) / np.sqrt(D) + np.eye(D)
    labels = rng.integers(0, K, size=n)
    X = means[labels] + np.einsum("nd,nde->ne", rng.standard_normal((n, D)), factors[labels])
    return X, labels


def sklearn_from(resp: np.ndarray, max_iter: int) -> SklearnBayesianGaussianMixture:
    """scikit-learn's model started from ``resp`` (N, K) by its own ``_initialize``."""
    class FromResponsibilities(SklearnBayesianGaussianMixture):
        def _initialize_parameters(self, X, random_state, xp=None):
            self._initialize(X, resp.astype(X.dtype))

    return FromResponsibilities(n_components=K, covariance_type="full", max_iter=max_iter, tol=0.0, random_state=0)


def fit_sklearn(X: np.ndarray, resp: np.ndarray, n_iter: int) -> float:
    return float(sklearn_from(resp, n_iter).fit(X).lower_bound_)


def fit_torch_em(X: torch.Tensor, labels: torch.Tensor, n_iter: int) -> float:
    model = torch_em.BayesianGaussianMixture(K, covariance_type="full", max_iter=max(n_iter, 1), tol=0.0)
    if n_iter == 0:
        model.initialize(X, resp_init=labels)
        return float("nan")
    return float(model.fit(X, resp_init=labels).lower_bound_)


def timed(run) -> tuple[float, float]:
    """(seconds, result) of one call with the garbage collector paused."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = run()
        return time.perf_counter() - start, result
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="N=10,000, 3 iterations, 1 repetition")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    n_points, n_iter, reps = (10_000, 3, 1) if args.quick else (N, args.iters, args.reps)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    X64, labels = problem(n_points)
    resp = np.eye(K)[labels]
    contenders = {}
    for dtype in (np.float64, np.float32):
        X = X64.astype(dtype)
        tensor, label_tensor = torch.as_tensor(X), torch.as_tensor(labels)
        bits = 64 if dtype == np.float64 else 32
        contenders[f"scikit-learn f{bits}"] = lambda n, X=X: fit_sklearn(X, resp, n)
        contenders[f"torch_em f{bits}"] = lambda n, X=tensor, y=label_tensor: fit_torch_em(X, y, n)
    names = list(contenders)
    per_iteration = {name: [] for name in names}
    bounds = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: every fit ends "not converged"
        for name in names:  # warm-up
            contenders[name](1)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                full, bounds[name] = timed(lambda: contenders[name](n_iter))
                start, _ = timed(lambda: contenders[name](0))
                per_iteration[name].append((full - start) / n_iter)
    load_end = os.getloadavg()[0]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    lines = [
        "# BayesianGaussianMixture (variational Bayes) against scikit-learn",
        "",
        f"`python benchmarks/bayesian_mixture.py{' --quick' if args.quick else ''}"
        f"{f' --output {args.output}' if args.output else ''}`",
        "",
        f"{stamp} UTC, CPU; torch.set_num_threads({args.threads}), OMP/MKL/OPENBLAS_NUM_THREADS={THREADS}; "
        f"torch {torch.__version__}, numpy {np.__version__}, scikit-learn {sklearn.__version__}; median of {reps} "
        f"repetition(s) after a warm-up; 1-minute load average {load_start:.2f} at start, {load_end:.2f} at end"
        + (" (above the threads used: other work shared the machine, numbers indicative)."
           if max(load_start, load_end) > args.threads else "."),
        "",
        f"Full covariances, N={n_points:,}, D={D}, K={K}, `weight_concentration_prior_type=\"dirichlet_process\"`, "
        f"the same initial responsibilities on both sides. Time per iteration: (T({n_iter} iterations) - T(0)) / "
        f"{n_iter}, `tol=0`; median [fastest repetition].",
        "",
        "| dtype | scikit-learn ms/iter | torch_em ms/iter | speed-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    for bits in (64, 32):
        theirs, ours = per_iteration[f"scikit-learn f{bits}"], per_iteration[f"torch_em f{bits}"]
        lines.append(f"| float{bits} | {statistics.median(theirs) * 1e3:.1f} [{min(theirs) * 1e3:.1f}] | "
                     f"{statistics.median(ours) * 1e3:.1f} [{min(ours) * 1e3:.1f}] | "
                     f"{statistics.median(theirs) / statistics.median(ours):.1f}x |")
    lines.append("")
    for bits in (64, 32):
        theirs, ours = bounds[f"scikit-learn f{bits}"], bounds[f"torch_em f{bits}"]
        lines.append(f"- check: float{bits}, lower bound after {n_iter} iterations: torch_em {ours:.10g}, "
                     f"scikit-learn {theirs:.10g} (relative difference {abs(ours - theirs) / abs(theirs):.1e})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
