"""Adapters that fit one Gaussian mixture problem with each library for a fixed number of EM
iterations, starting from the same user-supplied initial parameters, and time the call.

Every adapter is a ``Runner``: ``runner.fit(n_iter)`` builds a fresh estimator, fits it with
exactly ``n_iter`` EM iterations (convergence checks disabled) and returns the wall-clock
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

Initial parameters: scikit-learn and torch_em get identical ``weights_init``, ``means_init`` and
``precisions_init``; pomegranate gets the same weights, means and covariances (inverses of the
precisions) as already-initialised ``Normal`` components, so it skips its k-means; torchgmm only
accepts ``init_means`` and derives weights and covariances from a hard assignment to them (an
initialisation pass whose cost cancels in the difference).
"""
from __future__ import annotations

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


def _check_iterations(library: str, expected: int, got: Any) -> None:
    got_values = np.unique(np.asarray(got))
    if got_values.size != 1 or int(got_values[0]) != expected:
        raise RuntimeError(f"{library} ran {got_values.tolist()} EM iterations instead of {expected}")


def _count_calls(obj: Any, method: str) -> list[int]:
    """Count calls of ``obj.method`` from now on (an instance attribute shadowing the method)."""
    count = [0]
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    object.__setattr__(obj, method, counted)
    return count


# --- torch_em -------------------------------------------------------------------------------------
def torch_em_runner(problem: Problem, dtype: str, device: str) -> Runner:
    try:
        import torch_em
    except Exception as error:  # pragma: no cover - the package under test
        raise Unavailable(f"import torch_em failed: {error!r}") from error
    tdtype = TORCH_DTYPES[dtype]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=tdtype, device=device)

    X = tensor(problem.X)
    weights = problem.weights / problem.weights.sum(-1, keepdims=True)
    init = dict(weights_init=tensor(weights), means_init=tensor(problem.means), precisions_init=tensor(problem.precisions))
    runner = Runner("torch_em", dtype, device, fit=lambda n: 0.0)

    def fit(n_iter: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        model = torch_em.GaussianMixture(
            problem.n_components, covariance_type=problem.covariance_type, batch_shape=problem.batch_shape,
            tol=0.0, reg_covar=problem.reg_covar, max_iter=n_iter, init_params="random_from_data", seed=0,
            device=device, dtype=tdtype, **init,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 never converges, by design
            model.fit(X)
        synchronize(device)
        elapsed = time.perf_counter() - start
        _check_iterations("torch_em", n_iter, model.n_iter_.cpu())
        runner.info = {"n_iter": n_iter, "lower_bound": model.lower_bound_.double().cpu().numpy()}
        return elapsed

    runner.fit = fit
    return runner


# --- scikit-learn -----------------------------------------------------------------------------------
def sklearn_version() -> str | None:
    try:
        import sklearn
        return sklearn.__version__
    except Exception:
        return None


def sklearn_runner(problem: Problem, dtype: str, subset: list[int] | None = None) -> Runner:
    """scikit-learn on CPU. For a batched problem it fits the models of ``subset`` (indices into
    the batch) one after the other; ``info['lower_bound']`` holds their final lower bounds."""
    try:
        from sklearn.mixture import GaussianMixture
    except Exception as error:
        raise Unavailable(f"import sklearn failed: {error!r}") from error
    batched = bool(problem.batch_shape)
    X = np.ascontiguousarray(problem.X, dtype=np.dtype(dtype))
    runner = Runner("scikit-learn", dtype, "cpu", fit=lambda n: 0.0)
    indices = subset if batched else [None]

    def one(index, n_iter: int) -> GaussianMixture:
        pick = (lambda a: a) if index is None else (lambda a: a[index])
        weights = pick(problem.weights)
        model = GaussianMixture(
            problem.n_components, covariance_type=problem.covariance_type, tol=0.0,
            reg_covar=problem.reg_covar, max_iter=n_iter, init_params="random_from_data",
            weights_init=weights / weights.sum(), means_init=pick(problem.means),
            precisions_init=pick(problem.precisions), random_state=0,
        )
        return model.fit(pick(X))

    def fit(n_iter: int) -> float:
        models = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning
            start = time.perf_counter()
            for index in indices:
                models.append(one(index, n_iter))
            elapsed = time.perf_counter() - start
        _check_iterations("scikit-learn", n_iter, [m.n_iter_ for m in models])
        runner.info = {"n_iter": n_iter, "lower_bound": np.array([m.lower_bound_ for m in models]).reshape(-1 if batched else ())}
        return elapsed

    runner.fit = fit
    return runner


def sklearn_default_init_runner(problem: Problem, subset: list[int], seed: int = 0) -> Runner:
    """scikit-learn with its default initialisation (k-means), batched problems only."""
    from sklearn.mixture import GaussianMixture
    X = np.ascontiguousarray(problem.X, dtype=np.float64)
    runner = Runner("scikit-learn", "float64", "cpu", fit=lambda n: 0.0, note="default init (kmeans)")

    def fit(n_iter: int) -> float:
        models = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            for index in subset:
                model = GaussianMixture(
                    problem.n_components, covariance_type=problem.covariance_type, tol=0.0,
                    reg_covar=problem.reg_covar, max_iter=n_iter, random_state=seed + index,
                )
                models.append(model.fit(X[index]))
            elapsed = time.perf_counter() - start
        _check_iterations("scikit-learn", n_iter, [m.n_iter_ for m in models])
        runner.info = {"n_iter": n_iter, "lower_bound": np.array([m.lower_bound_ for m in models])}
        return elapsed

    runner.fit = fit
    return runner


def torch_em_default_init_runner(problem: Problem, dtype: str, device: str, seed: int = 0) -> Runner:
    """torch_em with its default initialisation (k-means++ seeding plus a few Lloyd steps)."""
    import torch_em
    tdtype = TORCH_DTYPES[dtype]
    X = torch.as_tensor(problem.X, dtype=tdtype, device=device)
    runner = Runner("torch_em", dtype, device, fit=lambda n: 0.0, note="default init (k-means++)")

    def fit(n_iter: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        model = torch_em.GaussianMixture(
            problem.n_components, covariance_type=problem.covariance_type, batch_shape=problem.batch_shape,
            tol=0.0, reg_covar=problem.reg_covar, max_iter=n_iter, seed=seed, device=device, dtype=tdtype,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X)
        synchronize(device)
        elapsed = time.perf_counter() - start
        _check_iterations("torch_em", n_iter, model.n_iter_.cpu())
        runner.info = {"n_iter": n_iter, "lower_bound": model.lower_bound_.double().cpu().numpy()}
        return elapsed

    runner.fit = fit
    return runner


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
    if problem.batch_shape:
        raise Unavailable("torchgmm fits one model at a time")
    if problem.covariance_type not in ("full", "diag", "spherical", "tied"):
        raise Unavailable(f"covariance_type {problem.covariance_type!r} not supported")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchgmm.bayes import GaussianMixture
    except Exception as error:
        raise Unavailable(f"import torchgmm failed: {type(error).__name__}: {error}") from error
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
    runner = Runner("torchgmm", dtype, device, fit=lambda n: 0.0, note="init_means only")

    def fit(n_iter: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's num_workers / logging hints
            synchronize(device)
            start = time.perf_counter()
            model = GaussianMixture(
                problem.n_components, covariance_type=problem.covariance_type, init_means=means,
                convergence_tolerance=0.0, covariance_regularization=problem.reg_covar,
                trainer_params=dict(trainer, max_epochs=n_iter),
            )
            model.fit(X)
            synchronize(device)
            elapsed = time.perf_counter() - start
        _check_iterations("torchgmm", n_iter, model.num_iter_)
        runner.info = {"n_iter": n_iter, "lower_bound": np.array(-float(model.nll_))}
        return elapsed

    runner.fit = fit
    return runner


# --- pomegranate --------------------------------------------------------------------------------------
def pomegranate_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("pomegranate")
    except Exception:
        return None


def pomegranate_runner(problem: Problem, dtype: str, device: str) -> Runner:
    if problem.batch_shape:
        raise Unavailable("pomegranate fits one model at a time")
    kinds = {"full": "full", "diag": "diag", "spherical": "sphere"}
    if problem.covariance_type not in kinds:
        raise Unavailable(f"covariance_type {problem.covariance_type!r} not supported")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pomegranate.distributions import Normal
            from pomegranate.gmm import GeneralMixtureModel
    except Exception as error:
        raise Unavailable(f"import pomegranate failed: {type(error).__name__}: {error}") from error
    tdtype = TORCH_DTYPES[dtype]
    X = torch.as_tensor(problem.X, dtype=tdtype, device=device)
    covs = problem.covariances()
    weights = problem.weights / problem.weights.sum()
    runner = Runner("pomegranate", dtype, device, fit=lambda n: 0.0)

    def fit(n_iter: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            synchronize(device)
            start = time.perf_counter()
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
            synchronize(device)
            elapsed = time.perf_counter() - start
        _check_iterations("pomegranate", n_iter, m_steps[0])
        runner.info = {"n_iter": n_iter}
        return elapsed

    runner.fit = fit
    return runner
