"""Deterministic annealing EM against plain EM and against restarts at equal wall time.

    python benchmarks/annealing.py [--threads 2] [--seeds 30] [--annealing 0.3 0.5] [--reference-starts 200]
        [--tol 1e-5] [--problems synthetic digits] [--output benchmarks/results/annealing-cpu.md]

Problems (float64, full covariances, ``tol`` on the mean log-likelihood, at most 2,000 EM
iterations per fit; k-means++ initialisation, the default):

1. synthetic: K = 10 Gaussian components in D = 2, N = 5,000 points (equal weights), unit
   covariances, means drawn uniformly in the square [0, 10]^2 (data seed 0), so that
   neighbouring components overlap.
2. digits: scikit-learn's 8x8 digits (N = 1,797) projected onto their first 10 principal axes,
   K = 10.

Methods, each fitted once per seed 0..seeds-1 (``seed=s``: restart 0 of every method starts from
the same k-means++ draw), one model per fit, timed one by one:

(a) plain EM, n_init=1; then for every ``beta_0`` of ``--annealing``: (b) annealing
(``annealing=beta_0``), n_init=1; (c) plain EM with ``n_init = max(1, round(t_b / t_a))`` where
t_a and t_b are the median wall times of (a) and (b): restarts at the wall time of annealing
(torch_em runs restarts 1.. as one batch, so (c)'s measured time is reported too); (d) annealing
with SQUAREM (``accelerate="squarem"``).

The best-known optimum of a problem is the best mean log-likelihood over every fit of every
method and over one plain fit with ``n_init=reference-starts``. Reported per method: the fraction
of seeds whose final mean log-likelihood (``score(X)``) is within 1e-4 relative of it, the
median and worst final mean log-likelihood, the median wall time per fit and the median number
of EM iterations (``n_iter_``, annealing stages included; SQUAREM: evaluations of the EM map).
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import report

RELATIVE = 1e-4
MAX_ITER = 2000


def problems(names: list[str]) -> dict:
    """name -> (X (N, D) float64 tensor, K, description)."""
    import torch

    found = {}
    if "synthetic" in names:
        g = torch.Generator().manual_seed(0)
        means = torch.rand(10, 2, generator=g, dtype=torch.float64) * 10
        labels = torch.randint(10, (5000,), generator=g)
        X = means[labels] + torch.randn(5000, 2, generator=g, dtype=torch.float64)
        found["synthetic"] = (X, 10, "K=10, D=2, N=5,000, unit covariances, means uniform in [0, 10]^2")
    if "digits" in names:
        from sklearn.datasets import load_digits

        X = torch.tensor(load_digits().data, dtype=torch.float64)
        X = X - X.mean(0)
        _, _, V = torch.linalg.svd(X, full_matrices=False)
        found["digits"] = (X @ V[:10].T, 10, "scikit-learn digits, 10 principal components, K=10, N=1,797")
    return found


def main() -> None:
    sys.argv, extra = _split_own_arguments(sys.argv)
    args = report.arguments(__doc__)
    import torch

    import torch_em

    torch.set_num_threads(args.threads)
    seeds = range(extra["seeds"])
    betas, tol = extra["annealing"], extra["tol"]

    def fit(X, K, seed, **options):
        model = torch_em.GaussianMixture(K, seed=seed, tol=tol, max_iter=MAX_ITER, dtype=torch.float64, **options)
        start = time.perf_counter()
        model.fit(X)
        seconds = time.perf_counter() - start
        return float(model.score(X)), seconds, int(model.n_iter_)

    lines = []
    command = (f"python benchmarks/annealing.py --threads {args.threads} --seeds {len(seeds)} "
               f"--annealing {' '.join(map(str, betas))} "
               f"--reference-starts {extra['reference_starts']} --tol {tol} --problems {' '.join(extra['problems'])}")
    lines += [f"# Deterministic annealing EM vs plain EM and restarts at equal time (`{command}`)", "",
              f"float64, full covariances, tol {tol:g}, max_iter {MAX_ITER}, k-means++ initialisation; "
              f"{len(seeds)} seeds; \"at optimum\": final mean log-likelihood within {RELATIVE:g} relative of the "
              "best-known optimum (the best over every fit below and one plain fit with "
              f"n_init={extra['reference_starts']}).", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (X, K, description) in problems(extra["problems"]).items():
            fit(X, K, 0)  # warm-up
            for beta0 in betas:
                fit(X, K, 0, annealing=beta0)
            # (a), (b) and (d) interleaved seed by seed, so that a busy spell of the machine hits all alike.
            options = {"(a) plain EM": {}}
            for beta0 in betas:
                options[f"(b) annealing {beta0}"] = {"annealing": beta0}
                options[f"(d) annealing {beta0} + SQUAREM"] = {"annealing": beta0, "accelerate": "squarem"}
            by_seed = [{method: fit(X, K, s, **o) for method, o in options.items()} for s in seeds]
            runs = {method: [results[method] for results in by_seed] for method in options}
            t_plain = statistics.median(seconds for _, seconds, _ in runs["(a) plain EM"])
            restarts, pairs = {1: runs["(a) plain EM"]}, []  # n_init -> results; (annealing, equal-time) rows
            for beta0 in betas:
                annealed = runs[f"(b) annealing {beta0}"]
                n_equal = max(1, round(statistics.median(seconds for _, seconds, _ in annealed) / t_plain))
                if n_equal not in restarts:
                    restarts[n_equal] = [fit(X, K, s, n_init=n_equal) for s in seeds]
                equal = f"(c) plain EM, n_init={n_equal} (time of (b) {beta0})"
                runs[equal] = restarts[n_equal]
                pairs.append((f"(b) annealing {beta0}", equal))
            order = ["(a) plain EM"] + [key for (annealed, equal), beta0 in zip(pairs, betas)
                                        for key in (annealed, equal, f"(d) annealing {beta0} + SQUAREM")]
            runs = {key: runs[key] for key in order}
            reference, reference_seconds, _ = fit(X, K, 10_000, n_init=extra["reference_starts"])
            best = max(reference, *(ll for results in runs.values() for ll, _, _ in results))
            lines += [f"## {name}: {description}", "",
                      f"best-known optimum {best:.6f} (plain n_init={extra['reference_starts']}: {reference:.6f}, "
                      f"{reference_seconds:.1f} s)", "",
                      "| method | at optimum | median LL | worst LL | median time (s) | median n_iter |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for method, results in runs.items():
                lls = [ll for ll, _, _ in results]
                hits = sum((best - ll) <= RELATIVE * abs(best) for ll in lls)
                lines.append(f"| {method} | {hits}/{len(lls)} | {statistics.median(lls):.6f} | {min(lls):.6f} | "
                             f"{statistics.median(s for _, s, _ in results):.3f} | "
                             f"{statistics.median(n for _, _, n in results):.0f} |")
                print(lines[-1], flush=True)
            lines.append("")
            for annealed, equal in pairs:
                a, c = ([ll for ll, _, _ in runs[key]] for key in (annealed, equal))
                hits = [sum((best - ll) <= RELATIVE * abs(best) for ll in lls) for lls in (a, c)]
                verdict = "beats" if statistics.median(a) > statistics.median(c) and hits[0] >= hits[1] else (
                    "loses to" if statistics.median(a) < statistics.median(c) and hits[0] <= hits[1] else "ties with")
                lines.append(f"- equal time: {annealed} {verdict} {equal} (median LL {statistics.median(a):.6f} vs "
                             f"{statistics.median(c):.6f}, at optimum {hits[0]} vs {hits[1]} of {len(a)})")
            lines.append("")
    report.emit(lines, args.output)


def _split_own_arguments(argv: list[str]) -> tuple[list[str], dict]:
    """This benchmark's own options out of argv; the rest goes to :func:`report.arguments`."""
    own = {"seeds": 30, "annealing": [0.3, 0.5], "reference_starts": 200, "tol": 1e-5,
           "problems": ["synthetic", "digits"]}
    kinds = {"seeds": int, "reference_starts": int, "tol": float}
    lists = {"problems": str, "annealing": float}
    rest, key = [argv[0]], None
    for token in argv[1:]:
        name = token[2:].replace("-", "_") if token.startswith("--") else None
        if name in own:
            key = name
            if key in lists:
                own[key] = []
        elif name is not None:  # another benchmark option (--threads, --output, ...) and its value
            key = None
            rest.append(token)
        elif key in lists:
            own[key].append(lists[key](token))
        elif key is not None:
            own[key], key = kinds[key](token), None
        else:
            rest.append(token)
    return rest, own


if __name__ == "__main__":
    main()
