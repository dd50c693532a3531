"""SQUAREM against plain EM: EM-map evaluations to convergence, final objective, batched wall time.

    python benchmarks/acceleration.py [--threads 2] [--reps 3] [--output benchmarks/results/acceleration-cpu.md]

Problems (float64, tol 1e-10 on the mean log-likelihood, at most 20,000 evaluations):

1. Hasselblad's Poisson mixture: deaths per day (frequencies of 0..9), two components, from
   weights (0.3, 0.7) and rates (1.0, 2.5).
2. An overlapping 1-D two-component Gaussian mixture: N=1,000, N(0, 1) and N(1, 1), from
   means (-0.5, 1.5), unit variances.
3. A 2-D three-component Gaussian mixture (full covariances): N=1,500, centres (0, 0), (2, 0),
   (1, 2), unit covariances, k-means++ initialisation (seed 0).
4. Batched: 1,000 datasets of problem 2's kind (N=200 each, the second centre at 1.0 + 0.001 i),
   one call, wall time (median of ``--reps``) and total evaluations.

Targets: >= 20x fewer evaluations on 1 and 2, >= 5x on 3, never a worse final objective,
>= 3x less wall time in batched mode.
"""
from __future__ import annotations

import statistics
import time
import warnings

import report


def main() -> None:
    args = report.arguments(__doc__)
    import torch

    import torch_em

    torch.set_num_threads(args.threads)
    F64 = torch.float64
    options = dict(tol=1e-10, max_iter=20_000, dtype=F64)

    def hasselblad(accelerate):
        counts = torch.arange(10, dtype=F64)[:, None]
        frequencies = torch.tensor([162, 267, 271, 185, 111, 61, 27, 8, 3, 1], dtype=F64)
        family = torch_em.Poisson(rates_init=torch.tensor([[1.0], [2.5]]))
        model = torch_em.Mixture(family, 2, weights_init=torch.tensor([0.3, 0.7]), accelerate=accelerate, **options)
        return model.fit(counts, sample_weight=frequencies), frequencies.sum()

    g = torch.Generator().manual_seed(0)
    one_d = torch.cat([torch.randn(500, 1, generator=g, dtype=F64), 1.0 + torch.randn(500, 1, generator=g, dtype=F64)])
    start_1d = dict(means_init=[[-0.5], [1.5]], weights_init=[0.5, 0.5], precisions_init=[[[1.0]], [[1.0]]])

    def overlapping(accelerate):
        return torch_em.GaussianMixture(2, accelerate=accelerate, **start_1d, **options).fit(one_d), len(one_d)

    centres = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]], dtype=F64)
    two_d = centres[torch.arange(1500) % 3] + torch.randn(1500, 2, generator=g, dtype=F64)

    def three(accelerate):
        return torch_em.GaussianMixture(3, accelerate=accelerate, seed=0, **options).fit(two_d), len(two_d)

    rows = ["| problem | plain EM evaluations | SQUAREM evaluations | ratio | final log-likelihood plain | "
            "final log-likelihood SQUAREM |", "| --- | --- | --- | --- | --- | --- |"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, problem in [("Hasselblad Poisson mixture", hasselblad), ("1-D overlapping GMM, K=2", overlapping),
                              ("2-D GMM, K=3, full", three)]:
            (plain, n), (fast, _) = problem(None), problem("squarem")
            rows.append(f"| {name} | {int(plain.n_iter_)} | {int(fast.n_iter_)} | "
                        f"{int(plain.n_iter_) / int(fast.n_iter_):.1f}x | {float(plain.lower_bound_) * n:.6f} | "
                        f"{float(fast.lower_bound_) * n:.6f} |")
        datasets = torch.stack([torch.cat([torch.randn(100, 1, generator=g, dtype=F64),
                                           1.0 + 0.001 * i + torch.randn(100, 1, generator=g, dtype=F64)])
                                for i in range(1000)])
        batched = {}
        for accelerate in (None, "squarem"):
            times, evaluations = [], 0
            for _ in range(args.reps):
                model = torch_em.GaussianMixture(2, batch_shape=(1000,), accelerate=accelerate, **start_1d,
                                                 tol=1e-8, max_iter=5000, dtype=F64)
                start = time.perf_counter()
                model.fit(datasets)
                times.append(time.perf_counter() - start)
                evaluations = int(model.n_iter_.sum())
            batched[accelerate] = (statistics.median(times), evaluations, float(model.lower_bound_.mean()))
    (t0, e0, l0), (t1, e1, l1) = batched[None], batched["squarem"]
    lines = [f"# SQUAREM vs plain EM (`python benchmarks/acceleration.py --threads {args.threads} --reps {args.reps}`)", "",
             *rows, "", "## Batched: 1,000 overlapping 1-D two-component mixtures (N=200 each), one call, tol 1e-8", "",
             "| | wall time (s, median) | total evaluations | mean lower bound |", "| --- | --- | --- | --- |",
             f"| plain EM | {t0:.2f} | {e0} | {l0:.6f} |", f"| SQUAREM | {t1:.2f} | {e1} | {l1:.6f} |",
             f"| ratio | {t0 / t1:.1f}x | {e0 / e1:.1f}x | |"]
    report.emit(lines, args.output)


if __name__ == "__main__":
    main()
