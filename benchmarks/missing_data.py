"""Missing-data benchmarks for torch_em (``missing="marginalize"``: exact EM with NaN marginalised).

1. ``speed``: one EM iteration (E-step and M-step, the engine's EM map) on data with entries
   missing completely at random versus the complete-data iteration on the same data (the same
   rows with nothing removed), full covariance, float64 and float32: N=20,000, D=8, K=4 with 20 %
   missing (the headline case, target at most 3x), D=32 with 30 % missing (almost every row its
   own pattern) and the scaling with D at 20 %. The one-off grouping of the rows by pattern
   (done once per fit) is reported beside it. Timed in alternating bursts, medians, 2 torch threads.
2. ``quality``: exact EM against impute-then-fit (mean imputation, scikit-learn's
   ``IterativeImputer``), all with the same torch_em Gaussian mixture: held-out observed-data
   mean log-likelihood (every model scored on the observed entries of incomplete held-out rows,
   marginally) and the clustering ARI against the true labels, on the synthetic data above and
   on scikit-learn's wine data (standardised) with 20 % of the entries removed at random.

Usage: ``python benchmarks/missing_data.py [--quick] [--reps R] [--out-dir DIR] [--name NAME]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_em  # noqa: E402
from torch_em.missing import MissingRows  # noqa: E402

SEED = 0


# --- data -----------------------------------------------------------------------------------------
def mixture_data(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points of a K-component mixture with correlated full covariances, and their labels."""
    rng = np.random.default_rng(seed)
    centres = 2.5 * rng.normal(size=(k, d))
    labels = rng.integers(k, size=n)
    mixing = np.eye(d)[None] + 0.6 * rng.normal(size=(k, d, d)) / np.sqrt(d)
    X = centres[labels] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), mixing[labels])
    return X, labels


def remove_at_random(X: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """X with each entry missing with probability ``fraction`` (MCAR); every row keeps one."""
    rng = np.random.default_rng(seed)
    holes = rng.random(X.shape) < fraction
    empty = holes.all(1)
    holes[empty, rng.integers(X.shape[1], size=int(empty.sum()))] = False
    out = X.copy()
    out[holes] = np.nan
    return out


def n_patterns(X: np.ndarray) -> int:
    return len(np.unique(np.isnan(X), axis=0))


# --- 1. speed ---------------------------------------------------------------------------------------
def em_iteration(X: np.ndarray, k: int, dtype: torch.dtype):
    """One EM iteration (the fitted model's EM map at its parameters) on X, as a function, warmed up."""
    missing = "marginalize" if np.isnan(X).any() else "reject"
    model = torch_em.GaussianMixture(k, missing=missing, seed=SEED, dtype=dtype, max_iter=3, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X)
    data = model._observations().tensor(torch.as_tensor(X, dtype=dtype))
    params = model._working_parameters().map(lambda value: value.detach())
    em_map = model._em_map(data, None)
    active = torch.ones(1, 1, dtype=torch.bool)
    em_map(params, active)  # warm-up (the pattern layout's features are cached here)
    return lambda: em_map(params, active)


def paired_seconds(first, second, reps: int, burst: int = 5) -> tuple[float, float, float]:
    """Seconds of ``first`` and ``second`` timed in alternating bursts of ``burst`` back-to-back
    calls (warm, as the iterations of a fit run), ``reps`` bursts each: the medians over all
    calls, and the median over the pairs of bursts of the ratio of their medians (each pair sees
    the same state of a shared machine)."""
    every: tuple[list[float], list[float]] = ([], [])
    ratios = []
    for _ in range(reps):
        medians = []
        for run, times in zip((first, second), every):
            burst_times = []
            for _ in range(burst):
                start = time.perf_counter()
                run()
                burst_times.append(time.perf_counter() - start)
            times.extend(burst_times)
            medians.append(statistics.median(burst_times))
        ratios.append(medians[1] / medians[0])
    return statistics.median(every[0]), statistics.median(every[1]), statistics.median(ratios)


def layout_seconds(X: np.ndarray, dtype: torch.dtype) -> float:
    tensor = torch.as_tensor(X, dtype=dtype)
    start = time.perf_counter()
    MissingRows.of(tensor)
    return time.perf_counter() - start


def run_speed(cases: list[tuple[int, int, int, float]], reps: int, log) -> list[dict]:
    rows = []
    for n, d, k, fraction in cases:
        complete, _ = mixture_data(n, d, k, SEED)
        incomplete = remove_at_random(complete, fraction, SEED + 1)
        for dtype in (torch.float64, torch.float32):
            full, missing, ratio = paired_seconds(em_iteration(complete, k, dtype), em_iteration(incomplete, k, dtype),
                                                  reps)
            row = dict(N=n, D=d, K=k, fraction=fraction, dtype=str(dtype).replace("torch.", ""),
                       patterns=n_patterns(incomplete), complete_rows=int((~np.isnan(incomplete).any(1)).sum()),
                       complete_ms=1e3 * full, missing_ms=1e3 * missing, ratio=ratio,
                       layout_ms=1e3 * layout_seconds(incomplete, dtype))
            log(f"speed {row}")
            rows.append(row)
    return rows


# --- 2. quality -------------------------------------------------------------------------------------
def fitted(X: np.ndarray, k: int, missing: str, **options) -> torch_em.GaussianMixture:
    model = torch_em.GaussianMixture(k, missing=missing, seed=SEED, dtype=torch.float64, n_init=3, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X)


def held_out_score(model: torch_em.GaussianMixture, X_test: np.ndarray) -> float:
    """Mean observed-data log-likelihood of incomplete held-out rows under any fitted model."""
    model.missing = "marginalize"
    return float(model.score(X_test))


def compare_methods(X_train, labels_train, X_test, k: int, log, name: str, **options) -> list[dict]:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, SimpleImputer
    from sklearn.metrics import adjusted_rand_score

    rows = []
    start = time.perf_counter()
    exact = fitted(X_train, k, "marginalize", **options)
    seconds = time.perf_counter() - start
    rows.append(dict(data=name, method="exact EM (missing='marginalize')", seconds=seconds,
                     held_out=held_out_score(exact, X_test),
                     ari=adjusted_rand_score(labels_train, exact.predict(X_train).numpy())))
    for method, imputer in (("mean imputation, then EM", SimpleImputer(strategy="mean")),
                            ("IterativeImputer, then EM", IterativeImputer(max_iter=10, random_state=SEED))):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imputed = imputer.fit_transform(X_train)
        model = fitted(imputed, k, "reject", **options)
        seconds = time.perf_counter() - start
        rows.append(dict(data=name, method=method, seconds=seconds, held_out=held_out_score(model, X_test),
                         ari=adjusted_rand_score(labels_train, model.predict(imputed).numpy())))
    for row in rows:
        log(f"quality {row}")
    return rows


def run_quality(n: int, log) -> list[dict]:
    X, labels = mixture_data(n + n // 4, 8, 4, SEED)
    incomplete = remove_at_random(X, 0.2, SEED + 1)
    rows = compare_methods(incomplete[:n], labels[:n], incomplete[n:], 4, log, f"synthetic N={n:,}, D=8, K=4, 20 %")
    from sklearn.datasets import load_breast_cancer, load_wine
    for loader, k, covariance_types in ((load_wine, 3, ("full", "diag")), (load_breast_cancer, 2, ("full",))):
        bunch = loader()
        standardised = (bunch.data - bunch.data.mean(0)) / bunch.data.std(0)
        order = np.random.default_rng(SEED).permutation(len(standardised))
        train, test = order[: int(0.7 * len(order))], order[int(0.7 * len(order)):]
        incomplete = remove_at_random(standardised, 0.2, SEED + 2)
        for covariance_type in covariance_types:
            name = f"{loader.__name__[5:]} ({standardised.shape[0]} x {standardised.shape[1]}), {covariance_type}, 20 %"
            rows += compare_methods(incomplete[train], bunch.target[train], incomplete[test], k, log, name,
                                    covariance_type=covariance_type, reg_covar=1e-2)
    return rows


# --- report -----------------------------------------------------------------------------------------
def report(speed: list[dict], quality: list[dict], reps: int, load: tuple[float, float]) -> str:
    lines = ["# torch_em missing-data benchmarks", "",
             f"{datetime.now():%Y-%m-%d %H:%M}, CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
             f"1-minute load average {load[0]:.2f} at start, {load[1]:.2f} at end"
             + (" (other work shared the machine: numbers indicative)." if max(load) > 0.5 else "."), "",
             "## One EM iteration, full covariance: data with entries missing at random vs the same data complete", "",
             "| N | D | K | missing | dtype | patterns | complete rows | complete-data iteration | missing-data iteration "
             "| ratio | pattern layout (once per fit) |",
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in speed:
        lines.append(f"| {r['N']:,} | {r['D']} | {r['K']} | {r['fraction']:.0%} | {r['dtype']} | {r['patterns']:,} | "
                     f"{r['complete_rows']:,} | {r['complete_ms']:.1f} ms | {r['missing_ms']:.1f} ms | "
                     f"{r['ratio']:.2f}x | {r['layout_ms']:.1f} ms |")
    lines += ["", f"The engine's EM map (E-step and M-step) at fitted parameters, timed in {reps} alternating "
              "bursts of 5 back-to-back calls with the complete-data map: medians over the calls, and the median "
              "over the pairs of bursts of the ratio of their medians; target for N=20,000, D=8, K=4, 20 %: ratio "
              "at most 3x.", "",
              "## Quality: exact EM vs impute-then-fit (the same Gaussian mixture, n_init=3)", "",
              "| data | method | held-out mean log-likelihood (observed entries) | ARI (train) | time |",
              "| --- | --- | ---: | ---: | ---: |"]
    for r in quality:
        lines.append(f"| {r['data']} | {r['method']} | {r['held_out']:.4f} | {r['ari']:.4f} | {r['seconds']:.2f} s |")
    lines += ["", "Held-out rows have the same fraction of entries missing; every model is scored marginally on "
              "their observed entries (an impute-then-fit model is a Gaussian mixture too). Synthetic: full "
              "covariance, held-out N/4 fresh points. scikit-learn's wine and breast-cancer data: standardised, "
              "30 % of the rows held out, reg_covar=1e-2, K = the number of classes.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    log = lambda message: print(message, flush=True)  # noqa: E731
    if args.quick:
        cases = [(2_000, 8, 4, 0.2), (500, 16, 4, 0.3)]
        n_quality = 2_000
    else:
        cases = [(20_000, 8, 4, 0.2), (20_000, 32, 4, 0.3), (20_000, 4, 4, 0.2), (20_000, 16, 4, 0.2),
                 (20_000, 32, 4, 0.2)]
        n_quality = 20_000
    speed = run_speed(cases, args.reps, log)
    quality = run_quality(n_quality, log)
    text = report(speed, quality, args.reps, (load_start, os.getloadavg()[0]))
    out = Path(args.out_dir) / f"{args.name or 'missing-data-' + datetime.now().strftime('%Y%m%d-%H%M')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
