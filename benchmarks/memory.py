"""Peak memory of a diagonal-covariance fit on a large tensor (issue target: growth below 1 GiB).

Run:  python benchmarks/memory.py [N]        (default N=10,000,000; D=16, K=64, float32, 3 iterations)

Reports the process's peak resident memory before and after the fit; their difference is what
the fit itself needed beyond the data.
"""
from __future__ import annotations

import resource
import sys
import time
import warnings

import torch

import torch_em


def main() -> None:
    n_points = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n_points, 16, generator=generator)
    X[: n_points // 2] += 3
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch_em.ConvergenceWarning)
        torch_em.GaussianMixture(64, covariance_type="diag", max_iter=3, tol=0.0, seed=0).fit(X)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"N={n_points:,}: X {X.numel() * X.element_size() / 2**30:.2f} GiB; peak RSS {before:.2f} GiB before the fit, "
          f"{after:.2f} GiB after: the fit needed {after - before:.2f} GiB ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
