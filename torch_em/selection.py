"""Model selection in one batched call: a grid of numbers of components (and restarts) per
covariance type fitted as one batch of Gaussian mixtures.

Models with fewer components than the largest of the grid are padded with masked components
(log-weight -inf, no statistics, never re-seeded, excluded from the criteria): K becomes a batch
dimension (:class:`torch_em.em.EMMap`'s ``components``). Every number of components starts from
an initialisation of its own with that many components (``init_params``; the default's k-means++
seedings are nested: the grid's models take the first k centres of one set of seedings of the
largest K, each followed by its own Lloyd iterations with k centres), and the covariance types
share that clustering, which sees neither their type nor their parameters. The batch converges
model by model and is compacted as models converge, so its cost follows the models still
running.

    result = torch_em.select(X, n_components=range(1, 11), covariance_type=("full", "diag"))
    print(result.table)          # BIC, AIC, ICL, log-likelihood, converged per (type, K)
    result.best_                 # a fitted GaussianMixture, the lowest criterion
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, cast

import numpy as np
import torch

from . import em
from ._validation import as_float_tensor, check_choice, check_int
from .em import ConvergenceWarning, FitFailedWarning
from .families.base import IllConditionedError
from .gaussian_mixture import GaussianMixture
from .initialization import SharedClustering
from .normalize import log_normalize_total

CRITERIA = ("bic", "aic", "icl")
COLUMNS = ("covariance_type", "n_components", "bic", "aic", "icl", "log_likelihood", "converged", "n_iter")


@dataclass
class SelectionTable:
    """One row per (covariance type, number of components): columns of equal length."""

    columns: dict[str, list]

    def as_dict(self) -> dict[str, list]:
        """The columns by name (e.g. for ``pandas.DataFrame(table.as_dict())``)."""
        return {name: list(values) for name, values in self.columns.items()}

    def __len__(self) -> int:
        return len(self.columns["n_components"])

    def __str__(self) -> str:
        lines = [f"{'covariance':>10} {'K':>3} {'BIC':>14} {'AIC':>14} {'ICL':>14} {'log-lik':>14} {'converged':>9} "
                 f"{'n_iter':>6}"]
        for i in range(len(self)):
            c = {name: values[i] for name, values in self.columns.items()}
            lines.append(f"{c['covariance_type']:>10} {c['n_components']:>3} {c['bic']:>14.2f} {c['aic']:>14.2f} "
                         f"{c['icl']:>14.2f} {c['log_likelihood']:>14.2f} {c['converged']!s:>9} {c['n_iter']:>6}")
        return "\n".join(lines)


@dataclass
class SelectionResult:
    """What :func:`select` returns: the table, the criterion and the chosen model."""

    table: SelectionTable
    criterion: str
    best_: GaussianMixture

    def plot(self, ax: Any = None, criterion: str | None = None) -> Any:
        """Plot the criterion against the number of components, one line per covariance type
        (matplotlib; returns the axes)."""
        import matplotlib.pyplot as plt

        criterion = criterion or self.criterion
        check_choice(criterion, "criterion", CRITERIA)
        ax = ax if ax is not None else plt.subplots(figsize=(5, 3.5))[1]
        columns = self.table.columns
        for kind in dict.fromkeys(columns["covariance_type"]):
            rows = [i for i, value in enumerate(columns["covariance_type"]) if value == kind]
            ax.plot([columns["n_components"][i] for i in rows], [columns[criterion][i] for i in rows], "o-", label=kind)
        ax.axvline(self.best_.n_components, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("components K")
        ax.set_ylabel(criterion.upper() + " (lower is better)")
        ax.legend(title="covariance")
        return ax


def select(
    X: Any, n_components: Iterable[int] = range(1, 11), covariance_type: str | Sequence[str] = ("full", "diag"), *,
    n_init: int = 1, criterion: str = "bic", seed: int | None = None, verbose: bool = False, **options: Any,
) -> SelectionResult:
    """Fit ``GaussianMixture`` s for every number of components in ``n_components`` and every
    covariance type, as one batched fit per covariance type (K a batch dimension, restarts too),
    and choose the lowest ``criterion`` ("bic", "aic" or "icl": BIC plus twice the entropy of
    the responsibilities). ``options`` go to every ``GaussianMixture`` (``tol``, ``max_iter``,
    ``reg_covar``, ``init_params``, ``device``, ``dtype``, ``prior``, ...); ``verbose``: a progress
    bar per covariance type.

    Returns a :class:`SelectionResult`: ``table`` (printable, ``as_dict()``), ``best_`` (an
    ordinary fitted ``GaussianMixture`` with ``best_.n_components`` components) and ``plot()``.
    A model whose fit fails (e.g. more components than points can support) gets NaN criteria
    and is never chosen.
    """
    grid = sorted({int(k) for k in n_components}) if not isinstance(n_components, int) else [int(n_components)]
    for k in grid:
        check_int(k, "n_components", minimum=1)
    if not grid:
        raise ValueError("n_components must hold at least one number of components, got none")
    kinds = [covariance_type] if isinstance(covariance_type, str) else list(covariance_type)
    if not kinds:
        raise ValueError("covariance_type must name at least one covariance type, got none")
    for kind in kinds:
        check_choice(kind, "covariance_type", ("full", "tied", "diag", "spherical"))
    check_choice(criterion, "criterion", CRITERIA)
    check_int(n_init, "n_init", minimum=1)
    for name in ("batch_shape", "n_components", "covariance_type", "n_init", "warm_start", "on_error"):
        if name in options:
            raise ValueError(f"select chooses {name} itself; got {name}={options[name]!r}")
    X = as_float_tensor(X, "X", device=options.get("device"), dtype=options.get("dtype"))
    if X.dim() != 2:
        raise ValueError(f"X must be (N, D) rows of features, got shape {tuple(X.shape)}")
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    fitted = []
    # k-means++ and Lloyd see neither the covariance type nor its parameters: every type of the
    # grid starts from one clustering (the seed fixes it; with seed=None it is drawn once).
    clustering = SharedClustering()
    for kind in kinds:
        for row in _fit_grid(X, grid, kind, n_init, seed, options, clustering, verbose):
            for name in COLUMNS:
                columns[name].append(row[name])
            fitted.append(row)
    scores = np.array([row[criterion] for row in fitted], dtype=float)
    if np.isnan(scores).all():
        raise IllConditionedError("every model of the grid failed; see the warnings for their reasons")
    chosen = fitted[int(np.nanargmin(scores))]
    return SelectionResult(SelectionTable(columns), criterion, chosen["model"]())


def _fit_grid(X: torch.Tensor, grid: list[int], kind: str, n_init: int, seed: int | None,
              options: dict[str, Any], clustering: SharedClustering, verbose: bool = False) -> list[dict]:
    """The grid's models of one covariance type as one batch (B numbers of components, each
    with ``n_init`` restarts), initialised from ``clustering`` (the first type to run fills
    it): its rows of the table, each with a ``model()`` that builds the fitted mixture."""
    N, D = X.shape
    K = max(grid)
    model = GaussianMixture(K, covariance_type=kind, batch_shape=(len(grid),), n_init=n_init, on_error="isolate",
                            seed=seed, **options)
    model._components = torch.arange(K, device=X.device) < torch.tensor(grid, device=X.device)[:, None]  # (B, K)
    model._shared_clustering = clustering
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", FitFailedWarning)
            model.fit(X, verbose=verbose)
    finally:  # (the rows' model builders keep the batch: not the clustering's labels)
        model._shared_clustering = None
    with torch.no_grad():
        log_likelihood, entropy = _evidence_and_entropy(model._emission_log_joint(model._layout.data(X)))  # (B,) each
    # (set by the fit)
    failed_, converged_, n_iter_ = (cast(torch.Tensor, value) for value in (model.failed_, model.converged_, model.n_iter_))
    rows = []
    for i, k in enumerate(grid):
        ll = float(log_likelihood[i])
        p = model.family.n_free_parameters(k, D) + (k - 1)
        failed = bool(failed_[i]) or not math.isfinite(ll)
        bic = -2 * ll + p * math.log(N)
        rows.append({
            "covariance_type": kind, "n_components": k, "bic": math.nan if failed else bic,
            "aic": math.nan if failed else -2 * ll + 2 * p,
            "icl": math.nan if failed else bic + 2 * float(entropy[i]),
            "log_likelihood": math.nan if failed else ll, "converged": bool(converged_[i]),
            "n_iter": int(n_iter_[i]), "model": _extractor(model, i, k, kind, seed, options),
        })
    return rows


def _evidence_and_entropy(log_joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-likelihood and the entropy of the posteriors, each summed over the points, in
    float64: (M,) each, from log joint densities (1, M, K, N) (-inf at masked components), which
    are overwritten. The entropy is ``sum_n log p(x_n) - sum_nk r_nk log p(x_n, k)`` (the
    posteriors of a point sum to 1): one product with the log joint instead of a log per entry,
    which costs several times more."""
    work = log_joint if log_joint.dtype == torch.float64 else log_joint.double()
    resp, log_likelihood = log_normalize_total(work.clone(), inplace=True)  # (1, M, K, N), (1, M)
    expected = torch.linalg.vecdot(resp.flatten(-2), work.nan_to_num_(neginf=0.0).flatten(-2))  # (1, M)
    return log_likelihood[0], (log_likelihood - expected)[0]


def _extractor(batch: GaussianMixture, i: int, k: int, kind: str, seed: int | None, options: dict):
    """A function building the ordinary fitted ``GaussianMixture(k)`` of grid entry ``i``."""
    def build() -> GaussianMixture:
        D = batch.n_features
        per_component = em.component_axis_names(batch.family)
        model = GaussianMixture(k, covariance_type=kind, n_features=D, seed=seed,
                                **{**options, "dtype": batch.dtype, "device": batch.device})
        values = {"logits": batch.logits[i, :k]}
        for name in batch._family_names:
            value = getattr(batch, name)[i]
            values[name] = value[:k] if name in per_component else value
        model._assign({name: value.detach() for name, value in values.items()}, create=False)
        # (the batch is fitted: its results are set)
        model.lower_bound_ = cast(torch.Tensor, batch.lower_bound_)[i].clone()
        model.n_iter_ = cast(torch.Tensor, batch.n_iter_)[i].clone()
        model.converged_ = cast(torch.Tensor, batch.converged_)[i].clone()
        model.lower_bound_history_ = cast(torch.Tensor, batch.lower_bound_history_)[i].clone()
        model.failed_ = cast(torch.Tensor, batch.failed_)[i].clone()
        model.failure_reasons_ = {}
        return model

    return build
