"""Adapters that fit one Gaussian mixture problem with each library for a fixed number of EM
iterations (or, for ``kmeans``, cluster its data with a fixed number of Lloyd iterations),
starting from the same user-supplied initial parameters, and time the call.

Every adapter is a ``Runner`` made by ``timed_runner``: ``runner.fit(n_iter)`` builds a fresh
estimator, fits it with exactly ``n_iter`` iterations (convergence checks disabled) and returns the wall-clock
seconds of construction plus ``fit`` (data conversion and device transfer happen once, outside
the timed region). Constant per-fit costs (construction, validation, initialisation, a final
E-step, framework start-up) cancel in the per-iteration estimate ``(t(1 + n) - t(1)) / n``
computed by ``run.py``.

A peer that cannot be imported or constructed raises ``Unavailable(reason)`` from its factory;
``run.py`` reports it as "unavailable (reason)" instead of crashing.

How each library is made to run exactly ``n_iter`` iterations (checked against the installed
sources: scikit-learn 1.9, torchgmm 0.1.4, pomegranate 1.1.2):

* torch_em: ``tol=0.0, max_iter=n_iter``; ``n_iter_`` is checked.
* scikit-learn: ``tol=0.0, max_iter=n_iter`` (it stops only when ``|change| < tol``, never true
  for ``tol=0``); ``n_iter_`` is checked. It always runs one extra E-step after the loop (a
  constant that cancels).
* torchgmm: ``convergence_tolerance=0`` (no early-stopping callback) and
  ``trainer_params=dict(max_epochs=n_iter)``; ``num_iter_`` is checked. With the whole data set
  as one batch (its default) torchgmm splits every EM iteration over two passes through the data
  (two Lightning epochs); that is how it ships, and it is what is timed.
* pomegranate: ``GeneralMixtureModel(..., max_iter=n_iter, tol=-inf)``; its loop runs one
  ``summarize`` (E-step + statistics) and one ``from_summaries`` (M-step) per iteration and
  breaks only when the improvement is below ``tol``.
* k-means: ``torch_em.KMeans(init=centres, tol=0.0, max_iter=n_iter)`` and scikit-learn
  ``KMeans(algorithm="lloyd", init=centres, n_init=1, tol=0.0, max_iter=n_iter)``; both stop
  early only if the centres stop moving exactly (scikit-learn: no label changed), which the
  ``n_iter_`` check catches. scikit-learn always runs one extra assignment step after the loop
  (a constant that cancels).

Initial parameters: scikit-learn and torch_em get identical ``weights_init``, ``means_init`` and
``precisions_init``; pomegranate gets the same weights, means and covariances (inverses of the
precisions) as already-initialised ``Normal`` components, so it skips its k-means; torchgmm only
accepts ``init_means`` and derives weights and covariances from a hard assignment to them (an
initialisation pass whose cost cancels in the difference). k-means: both get ``problem.means``
(K distinct data points) as initial centres.
"""
from __future__ import annotations

import importlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


class Unavailable(Exception):
    """A library that cannot run here; the message says why."""


@dataclass
class Problem:
    """One mixture-fitting problem with its shared initial parameters (numpy, float64).

    X (N, D) or (B, N, D); weights (K,) / (B, K); means (K, D) / (B, K, D); precisions in
    scikit-learn's layout (full (K, D, D), diag (K, D)), with B in front for batched problems.
    """

    X: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    precisions: np.ndarray
    covariance_type: str
    reg_covar: float = 1e-6

    def __post_init__(self) -> None:
        if self.covariance_type == "full":  # exactly symmetric, as torch_em and sklearn require
            self.precisions = 0.5 * (self.precisions + np.swapaxes(self.precisions, -1, -2))

    @property
    def n_components(self) -> int:
        return self.weights.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[:-2])

    def covariances(self) -> np.ndarray:
        if self.covariance_type == "full":
            cov = np.linalg.inv(self.precisions)
            return 0.5 * (cov + np.swapaxes(cov, -1, -2))
        return 1.0 / self.precisions


@dataclass
class Runner:
    """A contender: ``fit(n_iter) -> seconds``; ``info`` collects facts of the last fit
    (iterations run, final mean log-likelihood) for the report."""

    library: str
    dtype: str
    device: str
    fit: Callable[[int], float]
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.library} ({self.dtype}, {self.device})"


TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _check_iterations(library: str, expected: int, got: Any, kind: str = "EM") -> None:
    got_values = np.unique(np.asarray(got))
    if got_values.size != 1 or int(got_values[0]) != expected:
        raise RuntimeError(f"{library} ran {got_values.tolist()} {kind} iterations instead of {expected}")


def _count_calls(obj: Any, method: str) -> list[int]:
    """Count calls of ``obj.method`` from now on (an instance attribute shadowing the method)."""
    count = [0]
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    object.__setattr__(obj, method, counted)
    return count


def timed_runner(
    library: str, dtype: str, device: str, fit_models: Callable[[int], Any], iterations: Callable[[Any], Any],
    summary: Callable[[Any], dict] = lambda fitted: {}, note: str = "", kind: str = "EM",
) -> Runner:
    """The ``Runner`` every adapter returns. Its ``fit(n_iter)`` times ``fit_models(n_iter)``
    (build the estimator(s), fit them, return what was fitted) with warnings silenced (``tol=0``
    never converges, by design; Lightning's hints) and CUDA synchronised before and after, then
    checks that ``iterations(fitted)`` is exactly ``n_iter`` and keeps
    ``{"n_iter": n_iter, **summary(fitted)}`` as ``runner.info``."""
    runner = Runner(library, dtype, device, fit=lambda n: 0.0, note=note)

    def fit(n_iter: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            synchronize(device)
            start = time.perf_counter()
            fitted = fit_models(n_iter)
            synchronize(device)
            elapsed = time.perf_counter() - start
        _check_iterations(library, n_iter, iterations(fitted), kind)
        runner.info = {"n_iter": n_iter, **summary(fitted)}
        return elapsed

    runner.fit = fit
    return runner


# --- torch_em -------------------------------------------------------------------------------------
def _import_torch_em():
    try:
        import torch_em
    except Exception as error:  # pragma: no cover - the package under test
        raise Unavailable(f"import torch_em failed: {error!r}") from error
    return torch_em


def _tensor(a: np.ndarray, dtype: str, device: str) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=TORCH_DTYPES[dtype], device=device)


def _torch_em_mixture(problem: Problem, dtype: str, device: str, X: torch.Tensor, note: str = "", **options) -> Runner:
    """torch_em.GaussianMixture with tol=0 and max_iter=n_iter; ``options`` add to (or set) the
    initialisation; ``n_iter_`` is checked, the final mean log-likelihood kept."""
    import torch_em

    def fit_models(n_iter: int):
        return torch_em.GaussianMixture(
            problem.n_components, covariance_type=problem.covariance_type, batch_shape=problem.batch_shape,
            tol=0.0, reg_covar=problem.reg_covar, max_iter=n_iter, device=device, dtype=TORCH_DTYPES[dtype], **options,
        ).fit(X)

    return timed_runner("torch_em", dtype, device, fit_models, lambda model: model.n_iter_.cpu(),
                        lambda model: {"lower_bound": model.lower_bound_.double().cpu().numpy()}, note=note)


def torch_em_runner(problem: Problem, dtype: str, device: str) -> Runner:
    _import_torch_em()
    weights = problem.weights / problem.weights.sum(-1, keepdims=True)
    init = dict(weights_init=_tensor(weights, dtype, device), means_init=_tensor(problem.means, dtype, device),
                precisions_init=_tensor(problem.precisions, dtype, device))
    return _torch_em_mixture(problem, dtype, device, _tensor(problem.X, dtype, device),
                             init_params="random_from_data", seed=0, **init)


def torch_em_default_init_runner(problem: Problem, dtype: str, device: str, seed: int = 0) -> Runner:
    """torch_em with its default initialisation (k-means++ seeding plus a few Lloyd steps)."""
    X = torch.as_tensor(problem.X, dtype=TORCH_DTYPES[dtype], device=device)
    return _torch_em_mixture(problem, dtype, device, X, note="default init (k-means++)", seed=seed)


def torch_em_kmeans_runner(problem: Problem, dtype: str, device: str) -> Runner:
    """torch_em.KMeans (Lloyd) on ``problem.X`` from ``problem.means`` as initial centres, tol=0
    and max_iter=n_iter; ``n_iter_`` is checked, the final inertia and centres kept."""
    torch_em = _import_torch_em()
    X, centres = _tensor(problem.X, dtype, device), _tensor(problem.means, dtype, device)

    def fit_models(n_iter: int):
        return torch_em.KMeans(
            problem.n_components, init=centres, n_init=1, max_iter=n_iter, tol=0.0, device=device, dtype=TORCH_DTYPES[dtype],
        ).fit(X)

    return timed_runner("torch_em", dtype, device, fit_models, lambda model: model.n_iter_.cpu(), lambda model: {
        "inertia": float(model.inertia_), "centres": model.cluster_centers_.double().cpu().numpy()}, kind="Lloyd")


# --- scikit-learn -----------------------------------------------------------------------------------
def sklearn_version() -> str | None:
    try:
        import sklearn
        return sklearn.__version__
    except Exception:
        return None


def _sklearn_mixtures(problem: Problem, dtype: str, indices: list, options: Callable[[Any], dict], note: str = "") -> Runner:
    """scikit-learn GaussianMixture with tol=0 and max_iter=n_iter, fitted to ``problem.X``
    (``indices`` [None]) or to the batch members ``indices`` one after the other, each with
    ``options(index)``; ``n_iter_`` is checked, the final lower bounds kept (an array for a
    batched problem, a scalar otherwise)."""
    from sklearn.mixture import GaussianMixture
    X = np.ascontiguousarray(problem.X, dtype=np.dtype(dtype))
    shape = -1 if problem.batch_shape else ()

    def fit_models(n_iter: int) -> list:
        return [
            GaussianMixture(
                problem.n_components, covariance_type=problem.covariance_type, tol=0.0,
                reg_covar=problem.reg_covar, max_iter=n_iter, **options(index),
            ).fit(X if index is None else X[index])
            for index in indices
        ]

    return timed_runner("scikit-learn", dtype, "cpu", fit_models, lambda models: [m.n_iter_ for m in models],
                        lambda models: {"lower_bound": np.array([m.lower_bound_ for m in models]).reshape(shape)}, note=note)


def sklearn_runner(problem: Problem, dtype: str, subset: list[int] | None = None) -> Runner:
    """scikit-learn on CPU. For a batched problem it fits the models of ``subset`` (indices into
    the batch) one after the other; ``info['lower_bound']`` holds their final lower bounds."""
    try:
        importlib.import_module("sklearn.mixture")
    except Exception as error:
        raise Unavailable(f"import sklearn failed: {error!r}") from error

    def options(index) -> dict:
        pick = (lambda a: a) if index is None else (lambda a: a[index])
        weights = pick(problem.weights)
        return dict(init_params="random_from_data", weights_init=weights / weights.sum(), means_init=pick(problem.means),
                    precisions_init=pick(problem.precisions), random_state=0)

    return _sklearn_mixtures(problem, dtype, subset if problem.batch_shape else [None], options)


def sklearn_default_init_runner(problem: Problem, subset: list[int], seed: int = 0) -> Runner:
    """scikit-learn with its default initialisation (k-means), batched problems only."""
    return _sklearn_mixtures(problem, "float64", subset, lambda index: dict(random_state=seed + index),
                             note="default init (kmeans)")


def sklearn_kmeans_runner(problem: Problem, dtype: str) -> Runner:
    """scikit-learn KMeans(algorithm="lloyd", n_init=1, tol=0) on ``problem.X`` from
    ``problem.means`` as initial centres, max_iter=n_iter. With ``tol=0`` it stops early only on
    strict convergence (no label changed); ``n_iter_`` is checked, the final inertia and centres
    kept."""
    try:
        from sklearn.cluster import KMeans
    except Exception as error:
        raise Unavailable(f"import sklearn failed: {error!r}") from error
    X = np.ascontiguousarray(problem.X, dtype=np.dtype(dtype))
    centres = np.ascontiguousarray(problem.means, dtype=np.dtype(dtype))

    def fit_models(n_iter: int):
        return KMeans(problem.n_components, init=centres, n_init=1, max_iter=n_iter, tol=0.0, algorithm="lloyd").fit(X)

    return timed_runner("scikit-learn", dtype, "cpu", fit_models, lambda model: model.n_iter_, lambda model: {
        "inertia": float(model.inertia_), "centres": model.cluster_centers_.astype(np.float64)}, kind="Lloyd")


# --- torch-based peers -------------------------------------------------------------------------------
def _check_single_model(problem: Problem, library: str, covariance_types) -> None:
    """``Unavailable`` for a batched problem or a covariance type ``library`` lacks."""
    if problem.batch_shape:
        raise Unavailable(f"{library} fits one model at a time")
    if problem.covariance_type not in covariance_types:
        raise Unavailable(f"covariance_type {problem.covariance_type!r} not supported")


def _import_quietly(library: str, *names: tuple[str, str]) -> list:
    """``from module import name`` for each (module, name), import warnings silenced; any
    failure is ``Unavailable``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [getattr(importlib.import_module(module), name) for module, name in names]
    except Exception as error:
        raise Unavailable(f"import {library} failed: {type(error).__name__}: {error}") from error


# --- torchgmm -----------------------------------------------------------------------------------------
def torchgmm_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("torchgmm")
    except Exception:
        return None


def _quiet_lightning() -> None:
    import logging
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def torchgmm_runner(problem: Problem, dtype: str, device: str) -> Runner:
    _check_single_model(problem, "torchgmm", ("full", "diag", "spherical", "tied"))
    GaussianMixture, = _import_quietly("torchgmm", ("torchgmm.bayes", "GaussianMixture"))
    _quiet_lightning()
    tdtype = TORCH_DTYPES[dtype]
    X = torch.as_tensor(problem.X, dtype=tdtype, device=device)
    means = torch.as_tensor(problem.means, dtype=tdtype, device=device)
    cuda = device.startswith("cuda")
    trainer = dict(
        accelerator="gpu" if cuda else "cpu",
        devices=[torch.device(device).index or 0] if cuda else 1,
        enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, logger=False,
    )
    if dtype == "float64":
        trainer["precision"] = 64

    def fit_models(n_iter: int):
        model = GaussianMixture(
            problem.n_components, covariance_type=problem.covariance_type, init_means=means,
            convergence_tolerance=0.0, covariance_regularization=problem.reg_covar,
            trainer_params=dict(trainer, max_epochs=n_iter),
        )
        model.fit(X)
        return model

    return timed_runner("torchgmm", dtype, device, fit_models, lambda model: model.num_iter_,
                        lambda model: {"lower_bound": np.array(-float(model.nll_))}, note="init_means only")


# --- pomegranate --------------------------------------------------------------------------------------
def pomegranate_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("pomegranate")
    except Exception:
        return None


def pomegranate_runner(problem: Problem, dtype: str, device: str) -> Runner:
    kinds = {"full": "full", "diag": "diag", "spherical": "sphere"}
    _check_single_model(problem, "pomegranate", kinds)
    Normal, GeneralMixtureModel = _import_quietly(
        "pomegranate", ("pomegranate.distributions", "Normal"), ("pomegranate.gmm", "GeneralMixtureModel"))
    tdtype = TORCH_DTYPES[dtype]
    X = torch.as_tensor(problem.X, dtype=tdtype, device=device)
    covs = problem.covariances()
    weights = problem.weights / problem.weights.sum()

    def fit_models(n_iter: int) -> list[int]:
        components = [
            Normal(
                means=torch.as_tensor(problem.means[k], dtype=tdtype),
                covs=torch.as_tensor(covs[k], dtype=tdtype),
                covariance_type=kinds[problem.covariance_type],
            )
            for k in range(problem.n_components)
        ]
        model = GeneralMixtureModel(
            components, priors=torch.as_tensor(weights, dtype=tdtype), max_iter=n_iter, tol=-math.inf,
        )
        if device != "cpu":
            model = model.to(device)
        m_steps = _count_calls(model, "from_summaries")
        model.fit(X)
        return m_steps

    return timed_runner("pomegranate", dtype, device, fit_models, lambda m_steps: m_steps[0])
