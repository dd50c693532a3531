"""Cost follows the models still running: compaction of a batched fit's working batch.

    python benchmarks/compaction.py [--reps 3] [--threads 2] [--subset 50]

1. Per-iteration cost. 1,000 problems of N=500, D=2, K=3 (``run.batched_problem``'s data), of
   which 10 have overlapping clusters (EM takes many more iterations there), fitted in one call
   with tol=1e-4. Every iteration is timed (the engine's progress hook); the table gives the
   median time of an iteration with all 1,000 models running and of one with at most 1 % (10)
   still running, with compaction (the default) and without (``em.COMPACTION_FRACTION = 0``).
   Target: at 1 % active an iteration costs at most 10 % of an all-active one.
2. The batched row with default settings: the same 1,000 problems,
   ``GaussianMixture(3, batch_shape=(1000,))`` with default tol and initialisation, one whole
   fit, against scikit-learn's ``GaussianMixture(3)`` with its defaults fitted one after the
   other to ``--subset`` problems and extrapolated linearly to 1,000; and torch_em without
   compaction, to show what compaction contributes.

Repetitions are interleaved; medians are reported. torch uses ``--threads`` threads.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (the data of the batched benchmark)

import torch_em  # noqa: E402
from torch_em import em  # noqa: E402
from torch_em.latent import MIXTURE  # noqa: E402

B, N, D, K = 1000, 500, 2, 3


class IterationClock:
    """The engine's progress hook: the time at which each iteration ended and the models that
    ran in it."""

    def __init__(self, n_models: int):
        self.times = [time.perf_counter()]
        self.running = [n_models]  # models that run in the next iteration

    def update(self, _: int) -> None:
        self.times.append(time.perf_counter())

    def set_postfix(self, *, active: int, **_) -> None:
        self.running.append(active)

    def costs(self) -> list[tuple[int, float]]:
        """(models that ran, seconds) per iteration."""
        return [(self.running[i], self.times[i + 1] - self.times[i]) for i in range(len(self.times) - 1)]


def problems() -> tuple[torch.Tensor, em.Params, torch_em.Gaussian]:
    """Data (B, N, D) float64 and the starting parameters (1, B, ...) of run.py's batched benchmark."""
    problem = run.batched_problem(2, B, N, D, K)
    weights = torch.as_tensor(problem.weights / problem.weights.sum(-1, keepdims=True))
    model = torch_em.GaussianMixture(K, batch_shape=(B,), dtype=torch.float64, weights_init=weights,
                                     means_init=torch.as_tensor(problem.means),
                                     precisions_init=torch.as_tensor(problem.precisions), n_features=D)
    return torch.as_tensor(problem.X), model._working_parameters().map(lambda value: value.detach().clone()), model.family


def per_iteration(compaction: bool) -> tuple[float, float, int]:
    """Median seconds of an all-active iteration and of a <= 1 %-active one, and the number of
    the latter, for one fit."""
    X, params, family = problems()
    saved = em.COMPACTION_FRACTION
    em.COMPACTION_FRACTION = saved if compaction else 0.0
    try:
        clock = IterationClock(B)
        data = em.Data(family, X, family.reference(X), em.default_chunk_size(B, K, family.n_statistics(D)))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            em.run_em(em.EMMap(MIXTURE, family, data), params, max_iter=300, tol=1e-4, progress=clock)
    finally:
        em.COMPACTION_FRACTION = saved
    costs = clock.costs()
    full = [t for n, t in costs if n == B]
    few = [t for n, t in costs if n <= B // 100]
    return statistics.median(full), statistics.median(few) if few else math.nan, len(few)


def default_fits(reps: int, subset: int) -> dict[str, float]:
    """Median whole-fit seconds with default settings: torch_em with and without compaction,
    scikit-learn one by one (extrapolated)."""
    from sklearn.mixture import GaussianMixture

    problem = run.batched_problem(2, B, N, D, K)
    X = torch.as_tensor(problem.X)
    times: dict[str, list[float]] = {"torch_em": [], "torch_em without compaction": [], "scikit-learn": []}
    saved = em.COMPACTION_FRACTION
    for rep in range(reps):
        for name in (list(times)[rep % 3:] + list(times)[:rep % 3]):  # rotating order
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                if name == "scikit-learn":
                    first = (rep * subset) % B
                    for index in range(first, first + subset):
                        GaussianMixture(K, random_state=index).fit(problem.X[index])
                    times[name].append((time.perf_counter() - start) * B / subset)
                else:
                    em.COMPACTION_FRACTION = saved if name == "torch_em" else 0.0
                    try:
                        torch_em.GaussianMixture(K, batch_shape=(B,), seed=rep).fit(X)
                    finally:
                        em.COMPACTION_FRACTION = saved
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--subset", type=int, default=50, help="scikit-learn fits this many problems per repetition")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.reps} repetitions, load {os.getloadavg()[0]:.2f}\n")
    rows = {True: [], False: []}
    for rep in range(args.reps):
        for compaction in ((True, False) if rep % 2 == 0 else (False, True)):
            rows[compaction].append(per_iteration(compaction))
    print(f"## Per-iteration cost, {B} problems N={N}, D={D}, K={K}, tol=1e-4, float64\n")
    print("| working batch | all-active iteration | iteration at <= 1 % active | ratio | iterations at <= 1 % |")
    print("| --- | --- | --- | --- | --- |")
    for compaction, label in ((True, "compacted (default)"), (False, "not compacted")):
        full = statistics.median(r[0] for r in rows[compaction])
        few = statistics.median(r[1] for r in rows[compaction])
        print(f"| {label} | {full * 1e3:.2f} ms | {few * 1e3:.3f} ms | **{few / full:.3f}** | {rows[compaction][0][2]} |")
    print(f"\n## Default settings (tol=1e-3, k-means++ / k-means initialisation), {B} problems, float64\n")
    fits = default_fits(args.reps, args.subset)
    print("| contender | whole fit | its time / torch_em's |")
    print("| --- | --- | --- |")
    for name, seconds in fits.items():
        note = f" (one by one, {args.subset} fitted per repetition, extrapolated to {B})" if name == "scikit-learn" else ""
        print(f"| {name}{note} | {seconds:.3f} s | {seconds / fits['torch_em']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
