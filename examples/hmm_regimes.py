"""Regime switching with a Gaussian hidden Markov model: US GDP growth and a synthetic series.

(a) Quarterly growth of US real GDP, 1959Q2-2009Q3 (annualised, in percent), from the
    ``macrodata`` set that ships with statsmodels (nothing is downloaded). A two-state
    ``torch_em.GaussianHMM`` with one variance shared by both regimes (``covariance_type="tied"``)
    separates a low-growth regime from the normal one, as Hamilton's Markov-switching model of the
    business cycle (1989) does; the decoded low-growth spells line up with the US recessions of
    1960, 1969-70, 1973-75, 1980, 1981-82, 1990-91 and 2008-09. With a variance per regime
    (``"diag"``) the two regimes found are instead a volatile one and a calm one, which switch once,
    in the mid-1980s (the "Great Moderation"): the model answers the question its form asks. Needs statsmodels
    (``pip install statsmodels``, or ``pip install -e ".[examples]"``); without it this part is skipped.
(b) A synthetic series of 2,000 steps from a known three-regime HMM (calm, volatile, crash): the
    model is fitted without the states, decoded with ``predict`` (Viterbi), and the decoding
    accuracy is reported after matching the decoded states to the true regimes.

For each part: the transition matrix, the per-regime means and standard deviations (regimes sorted
by mean), and one figure of both series coloured by decoded regime (matplotlib, Agg backend).

Run:  python examples/hmm_regimes.py [--output regimes.png] [--seed 0]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch

import torch_em

from _common import pyplot  # examples/_common.py (examples/ is on sys.path when run as a script)

#: The synthetic regimes: mean and standard deviation per step, and the transition matrix.
SYNTHETIC_MEANS = np.array([0.5, -0.5, -3.0])
SYNTHETIC_SCALES = np.array([0.5, 1.0, 1.5])
SYNTHETIC_TRANSMAT = np.array([[0.98, 0.015, 0.005], [0.03, 0.95, 0.02], [0.05, 0.15, 0.80]])


def gdp_growth() -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """Annualised quarterly growth of US real GDP in percent (T,), its quarter labels and times in
    years (T,), or None (and what to install) when statsmodels is missing."""
    try:
        from statsmodels.datasets import macrodata
    except ImportError:
        print("statsmodels is not installed: skipping the GDP series "
              "(pip install statsmodels, or pip install -e \".[examples]\")")
        return None
    data = macrodata.load_pandas().data
    growth = 400.0 * np.diff(np.log(data["realgdp"].to_numpy()))  # (T,)
    quarters = [f"{int(y)}Q{int(q)}" for y, q in zip(data["year"], data["quarter"])][1:]
    years = (data["year"] + (data["quarter"] - 1) / 4).to_numpy()[1:]
    return growth, quarters, years


def synthetic_series(n_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A series (n_steps,) from the three-regime HMM above and its true regimes (n_steps,)."""
    rng = np.random.default_rng(seed)
    states = np.empty(n_steps, dtype=np.int64)
    states[0] = 0
    for t in range(1, n_steps):
        states[t] = rng.choice(3, p=SYNTHETIC_TRANSMAT[states[t - 1]])
    return SYNTHETIC_MEANS[states] + SYNTHETIC_SCALES[states] * rng.standard_normal(n_steps), states


def fit_regimes(series: np.ndarray, n_regimes: int, seed: int,
                covariance_type: str = "diag") -> tuple[torch_em.GaussianHMM, np.ndarray]:
    """A GaussianHMM fitted to one series (T,) (hmmlearn's concatenated format, one sequence) with
    restarts, and its Viterbi regimes (T,) relabelled so that regime 0 has the lowest mean."""
    X = torch.as_tensor(series, dtype=torch.float64)[:, None]  # (T, 1)
    model = torch_em.GaussianHMM(n_regimes, covariance_type=covariance_type, n_init=4, seed=seed, max_iter=500,
                                 tol=1e-6, dtype=torch.float64).fit(X)
    states = model.predict(X).numpy()  # (T,)
    rank = np.argsort(np.argsort(model.means.detach().numpy()[:, 0]))  # state -> its rank by mean
    return model, rank[states]


def regime_summary(model: torch_em.GaussianHMM) -> dict[str, np.ndarray]:
    """The fitted transition matrix (K, K), means (K,) and standard deviations (K,) of a model of
    one feature, with the regimes sorted by mean (as ``fit_regimes`` labels them)."""
    with torch.no_grad():
        means = model.means.numpy()[:, 0]
        order = np.argsort(means)
        transmat = model.transmat.numpy()[np.ix_(order, order)]
        scales = np.sqrt(state_variances(model))[order]
    return dict(transmat=transmat, means=means[order], scales=scales)


def describe(model: torch_em.GaussianHMM, names: list[str]) -> dict[str, np.ndarray]:
    """Print the transition matrix, means, standard deviations and expected durations, regimes
    sorted by mean; return ``regime_summary(model)``."""
    summary = regime_summary(model)
    print(f"  converged: {bool(model.converged_)} after {int(model.n_iter_)} iterations, "
          f"log-likelihood per step {float(model.lower_bound_):.4f}")
    width = max(len(name) for name in names)
    column = width + 2
    print("  transition matrix (row: from, column: to):")
    print("    " + " " * width + "".join(f"{name:>{column}}" for name in names))
    for name, row in zip(names, summary["transmat"]):
        print(f"    {name:<{width}}" + "".join(f"{p:{column}.3f}" for p in row))
    durations = 1.0 / np.maximum(1.0 - np.diag(summary["transmat"]), 1e-12)  # mean length of a stay
    for name, mean, scale, duration in zip(names, summary["means"], summary["scales"], durations):
        print(f"  {name:<{width}}  mean {mean:7.3f}  std {scale:6.3f}  expected duration {duration:5.1f} steps")
    return summary


def state_variances(model: torch_em.GaussianHMM) -> np.ndarray:
    """The variance (K,) of every regime of a model of one feature, whatever its covariance type."""
    K = model.means.shape[-2]
    covariances = model.covariances.detach().numpy()  # (K, 1), (K, 1, 1), (K,) or tied (1, 1)
    if model.covariance_type == "tied":
        covariances = np.broadcast_to(covariances, (K,) + covariances.shape)
    return covariances.reshape(K, -1)[:, 0]


def spells(regimes: np.ndarray, regime: int, labels: list[str]) -> list[str]:
    """'first-last' label ranges of the consecutive runs of ``regime`` in ``regimes`` (T,)."""
    runs = []
    for value, group in itertools.groupby(enumerate(regimes), key=lambda item: item[1]):
        if value == regime:
            steps = [t for t, _ in group]
            runs.append(labels[steps[0]] if len(steps) == 1 else f"{labels[steps[0]]}-{labels[steps[-1]]}")
    return runs


def matched_accuracy(true: np.ndarray, decoded: np.ndarray, n_regimes: int) -> float:
    """Accuracy of ``decoded`` (T,) against ``true`` (T,) under the best relabelling of the decoded
    regimes (all n_regimes! permutations: a handful here)."""
    return max(float(np.mean(np.asarray(perm)[decoded] == true)) for perm in itertools.permutations(range(n_regimes)))


def plot(panels: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray, list[str]]], path: Path) -> bool:
    """One panel per (title, x label, x (T,), series (T,), regimes (T,), regime names): the series
    as points coloured by decoded regime over a grey line. Returns whether the file was written."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (title, xlabel, x, series, regimes, names) in zip(axes[:, 0], panels):
        ax.plot(x, series, color="0.75", lw=0.8, zorder=1)
        for k, name in enumerate(names):
            ax.scatter(x[regimes == k], series[regimes == k], s=6, label=name, zorder=2)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(loc="lower left", markerscale=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nsaved {path}")
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "hmm_regimes.png",
                        help="where the figure goes (default: hmm_regimes.png in the temporary directory)")
    parser.add_argument("--steps", type=int, default=2000, help="length of the synthetic series")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict = {}
    panels = []

    gdp = gdp_growth()
    if gdp is not None:
        growth, quarters, years = gdp
        print(f"(a) US real GDP growth, {quarters[0]}-{quarters[-1]} ({len(growth)} quarters, annualised %)")
        model, regimes = fit_regimes(growth, 2, args.seed, covariance_type="tied")
        names = ["low growth", "normal"]
        results["gdp"] = dict(describe(model, names), regimes=regimes, spells=spells(regimes, 0, quarters))
        print("  low-growth spells:", ", ".join(results["gdp"]["spells"]))
        model, by_volatility = fit_regimes(growth, 2, args.seed, covariance_type="diag")
        scales = regime_summary(model)["scales"]
        volatile = int(np.argmax(scales))
        results["gdp"]["volatile_spells"] = spells(by_volatility, volatile, quarters)
        print(f"  with a variance per regime instead: a volatile regime (std {scales[volatile]:.2f}) and a calm one "
              f"(std {scales[1 - volatile]:.2f}); volatile spells:", ", ".join(results["gdp"]["volatile_spells"]))
        panels.append(("US real GDP growth, % annualised (statsmodels macrodata), decoded regimes", "year", years,
                       growth, regimes, names))

    series, truth = synthetic_series(args.steps, args.seed)
    print(f"\n(b) synthetic series, {args.steps} steps from a known 3-regime HMM")
    model, regimes = fit_regimes(series, 3, args.seed)
    names = ["crash", "volatile", "calm"]  # sorted by mean, as the true regimes are (calm 0.5 > volatile > crash)
    truth_by_mean = np.argsort(np.argsort(SYNTHETIC_MEANS))[truth]  # true regimes in the same order
    results["synthetic"] = dict(describe(model, names), regimes=regimes,
                                accuracy=matched_accuracy(truth_by_mean, regimes, 3),
                                true_means=np.sort(SYNTHETIC_MEANS))
    print(f"  decoding accuracy (best matching of decoded to true regimes): {results['synthetic']['accuracy']:.3f}")
    print("  true means:", np.sort(SYNTHETIC_MEANS).tolist())
    panels.append(("synthetic three-regime series, decoded regimes", "step", np.arange(len(series)), series, regimes,
                   names))

    results["plot"] = args.output if plot(panels, args.output) else None
    return results


if __name__ == "__main__":
    main()
