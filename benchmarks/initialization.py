"""Default initialisation with ``n_init=1``: final log-likelihood over seeds against scikit-learn.

    python benchmarks/initialization.py [--threads 2] [--seeds 10] [--init-params k-means++ kmeans]
        [--output benchmarks/results/initialization-cpu.md]

Data (offline, float64, K = number of classes): iris; wine raw and standardised; breast cancer
standardised; digits; penguins (palmerpenguins, rows with NaN dropped, bill length, bill depth,
flipper length, body mass) raw (body mass in grams dominates) and standardised. For each dataset
x covariance type (full, tied, diag, spherical) x seed 0..9, ``torch_em.GaussianMixture(K,
covariance_type=..., seed=s, dtype=float64)`` and ``sklearn.mixture.GaussianMixture(K,
covariance_type=..., random_state=s)`` are fitted with their defaults (``reg_covar`` 1e-6 both);
recorded: the final total log-likelihood ``score(X) * N``, the ARI against the classes and the
fit's wall time.

Table per cell: median and worst log-likelihood of each library over the seeds, median ARI, and
the median initialisation time (``initialize``: seeding, Lloyd steps and the first M-step, no EM)
of each ``--init-params`` method (the default first). Summary: in how many of the 28 cells
torch_em's worst (median) is worse / better than scikit-learn's by more than 1e-6 relative, the
summed median initialisation times and the summed fit times.

Target: torch_em's median and worst at least as good as scikit-learn's in every cell, with the
default initialisation costing no more than the former default (``"k-means++"``: seeding plus 5
Lloyd iterations).
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import report

KINDS = ("full", "tied", "diag", "spherical")
RELATIVE = 1e-6


def datasets() -> dict[str, tuple]:
    """name -> (X (N, D) float64 numpy, classes (N,))."""
    import numpy as np
    from palmerpenguins import load_penguins
    from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine

    def standardised(X):
        return (X - X.mean(0)) / X.std(0)

    penguins = load_penguins().dropna()
    P = penguins[["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]].to_numpy(np.float64)
    species = penguins["species"].astype("category").cat.codes.to_numpy()
    wine, cancer = load_wine(return_X_y=True), load_breast_cancer(return_X_y=True)
    return {
        "iris": load_iris(return_X_y=True),
        "wine raw": wine,
        "wine std": (standardised(wine[0]), wine[1]),
        "breast cancer std": (standardised(cancer[0]), cancer[1]),
        "digits": load_digits(return_X_y=True),
        "penguins raw": (P, species),
        "penguins std": (standardised(P), species),
    }


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def main() -> None:
    sys.argv, extra = _split_own_arguments(sys.argv)
    args = report.arguments(__doc__)
    import numpy as np
    import torch
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    import torch_em

    torch.set_num_threads(args.threads)
    seeds = range(extra["seeds"])
    default = torch_em.GaussianMixture(1).init_params
    methods = [default, *(m for m in extra["init_params"] if m != default)]

    def torch_fit(X, K, kind, seed):
        model = torch_em.GaussianMixture(K, covariance_type=kind, seed=seed, dtype=torch.float64)
        model, seconds = timed(lambda: model.fit(X))
        return float(model.score(X)) * len(X), model.predict(X).numpy(), seconds

    def sklearn_fit(X, K, kind, seed):
        model, seconds = timed(lambda: SkGaussianMixture(K, covariance_type=kind, random_state=seed).fit(X))
        return float(model.score(X)) * len(X), model.predict(X), seconds

    def init_time(X, K, kind, seed, method):
        model = torch_em.GaussianMixture(K, covariance_type=kind, seed=seed, dtype=torch.float64, init_params=method)
        return timed(lambda: model.initialize(X))[1]

    rows, worse, better, fit_seconds, init_seconds = [], {"worst": 0, "median": 0}, {"worst": 0, "median": 0}, \
        {"torch_em": 0.0, "scikit-learn": 0.0}, {m: 0.0 for m in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (X_np, classes) in datasets().items():
            X, K = torch.tensor(X_np, dtype=torch.float64), len(np.unique(classes))
            for kind in KINDS:
                torch_fit(X, K, kind, 0)  # warm-up
                results = {"torch_em": [torch_fit(X, K, kind, s) for s in seeds],
                           "scikit-learn": [sklearn_fit(X_np, K, kind, s) for s in seeds]}
                cell = {}
                for library, runs in results.items():
                    lls = [ll for ll, _, _ in runs]
                    cell[library] = (statistics.median(lls), min(lls),
                                     statistics.median(adjusted_rand_score(classes, labels) for _, labels, _ in runs))
                    fit_seconds[library] += sum(seconds for _, _, seconds in runs)
                for m in methods:
                    init_time(X, K, kind, 0, m)  # warm-up
                times = [[init_time(X, K, kind, s, m) for m in methods] for s in seeds]  # interleaved
                inits = {m: statistics.median(seconds[i] for seconds in times) for i, m in enumerate(methods)}
                for m, seconds in inits.items():
                    init_seconds[m] += seconds
                for index, statistic in ((0, "median"), (1, "worst")):
                    ours, theirs = cell["torch_em"][index], cell["scikit-learn"][index]
                    gap = (ours - theirs) / abs(theirs)
                    worse[statistic] += gap < -RELATIVE
                    better[statistic] += gap > RELATIVE
                (tm, tw, ta), (sm, sw, sa) = cell["torch_em"], cell["scikit-learn"]
                flag = " **worse**" if (tw - sw) / abs(sw) < -RELATIVE or (tm - sm) / abs(sm) < -RELATIVE else ""
                rows.append(f"| {name} | {kind} | {tm:.2f} | {sm:.2f} | {tw:.2f} | {sw:.2f}{flag} | {ta:.3f} | {sa:.3f} | "
                            + " | ".join(f"{1e3 * inits[m]:.1f}" for m in methods) + " |")
                print(rows[-1], flush=True)
    n_cells = len(rows)
    command = (f"python benchmarks/initialization.py --threads {args.threads} --seeds {len(seeds)} "
               f"--init-params {' '.join(methods)}")
    lines = [f"# Initialisation with n_init=1, {len(seeds)} seeds, torch_em default init_params={default!r}, float64 "
             f"(`{command}`)", "",
             f"- worst seed: torch_em worse than scikit-learn in {worse['worst']} of {n_cells} cells, better in "
             f"{better['worst']} (relative gap > {RELATIVE:g})",
             f"- median seed: worse in {worse['median']} of {n_cells} cells, better in {better['median']}",
             "- initialisation (median over seeds, summed over cells): "
             + ", ".join(f"{m!r} {1e3 * s:.0f} ms" for m, s in init_seconds.items()),
             f"- total fit time ({n_cells * len(seeds)} fits each): torch_em {fit_seconds['torch_em']:.1f} s, "
             f"scikit-learn {fit_seconds['scikit-learn']:.1f} s", "",
             "| dataset | covariance | median LL torch_em | median LL sklearn | worst LL torch_em | worst LL sklearn "
             "| median ARI torch_em | median ARI sklearn | "
             + " | ".join(f"init ms {m!r}" for m in methods) + " |",
             "| --- " * (8 + len(methods)) + "|", *rows]
    report.emit(lines, args.output)


def _split_own_arguments(argv: list[str]) -> tuple[list[str], dict]:
    """This benchmark's own options (``--seeds N``, ``--init-params M ...``) out of argv; the
    rest goes to :func:`report.arguments`."""
    own, rest, key = {"seeds": 10, "init_params": ["k-means++", "kmeans"]}, [argv[0]], None
    for token in argv[1:]:
        if token in ("--seeds", "--init-params"):
            key = token[2:].replace("-", "_")
            own[key] = [] if key == "init_params" else own[key]
        elif key == "seeds":
            own["seeds"], key = int(token), None
        elif key == "init_params" and not token.startswith("--"):
            own["init_params"].append(token)
        else:
            key = None
            rest.append(token)
    return rest, own


if __name__ == "__main__":
    main()
