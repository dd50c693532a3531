"""``GaussianMixture`` with scikit-learn's interface, fitted by :class:`torch_em.GaussianMixture`."""
from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import Any, cast

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

import torch_em
from torch_em.initialization import METHODS

from ._base import (
    FLOAT_DTYPES, TORCH_CONSTRAINTS, TorchModuleMixin, as_tensor, check_sample_weight, seed_from_random_state,
    unchanged_on_error, weight_options,
)

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
NOT_CONVERGED = (
    "Best performing initialization did not converge. Try different init parameters, or increase max_iter, "
    "tol, or check for degenerate data."
)
ILL_DEFINED_COVARIANCE = (
    "Fitting the mixture model failed because some components have ill-defined empirical covariance (for "
    "instance caused by singleton or collapsed samples). Try to decrease the number of components, increase "
    "reg_covar, or scale the input data."
)


class GaussianMixture(TorchModuleMixin, DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by EM in PyTorch, with the parameters, attributes and methods of
    :class:`sklearn.mixture.GaussianMixture`.

    Parameters as scikit-learn's (same names, defaults and meanings), plus:

    - ``device``: where the torch module computes (``"cuda"``, a ``torch.device``; default CPU).
    - ``dtype``: the torch dtype it computes in (default: the data's, float32 or float64).

    Notes on the mapping to :class:`torch_em.GaussianMixture` (reachable as ``module_``):

    - ``init_params`` keeps its names. ``"kmeans"``: k-means++ seeding and Lloyd's iterations to
      convergence, then hard responsibilities. ``"k-means++"``: of 4 seedings, each with 5 Lloyd
      iterations and an M-step (one batch), the one that gives the data the highest likelihood.
      ``"random"``: random responsibilities. ``"random_from_data"``: K random points as centres,
      each point assigned to the nearest (scikit-learn puts only those K points in the
      components; here every point counts, so the first M-step has proper covariances).
    - ``random_state``: an int is torch_em's ``seed``; a ``RandomState`` draws an int seed from
      itself at every fit (successive fits differ, as in scikit-learn); None: a fresh seed.
    - ``warm_start=True`` continues EM from ``module_`` (one start, convergence judged against the
      previous fit's lower bound), as scikit-learn does; a changed ``n_components``,
      ``covariance_type`` or number of features starts afresh.
    - ``verbose > 0`` shows a progress bar of the EM iterations; ``verbose_interval`` is accepted
      for compatibility and unused.
    - ``max_iter=0`` returns the initialisation, as in scikit-learn.

    Attributes:
        weights_ ``(K,)``, means_ ``(K, D)``, covariances_, precisions_, precisions_cholesky_ (full
        ``(K, D, D)``, tied ``(D, D)``, diag ``(K, D)``, spherical ``(K,)``; ``precisions_cholesky_``
        upper triangular), converged_, n_iter_, lower_bound_ (mean log-likelihood per sample at the
        last iteration), lower_bounds_ (one per iteration), n_features_in_, feature_names_in_
        (DataFrame input), module_ (the fitted ``torch_em.GaussianMixture``).
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions(set(COVARIANCE_TYPES))],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [StrOptions(set(METHODS))],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        **TORCH_CONSTRAINTS,
    }

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: None | int | np.random.RandomState = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        device: None | str | torch.device = None,
        dtype: None | str | torch.dtype = None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.device = device
        self.dtype = dtype

    # --- fitting ------------------------------------------------------------------------------
    @unchanged_on_error
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "GaussianMixture":
        """Fit by EM: ``n_init`` starts, the one with the largest lower bound wins (with
        ``warm_start`` and a fitted model: one more EM run from ``module_``).

        Args:
            X: ``(n_samples, n_features)`` array-like (a DataFrame sets ``feature_names_in_``).
            y: ignored.
            sample_weight: ``(n_samples,)`` non-negative weights (a weight of 2 counts a sample
                twice), or None.

        Raises:
            ValueError: bad parameters or data (before anything changes), or a component whose
                covariance is ill-defined (increase ``reg_covar``).
        """
        self._validate_params()
        X = self._fit_data(X, ensure_min_samples=2)
        n_samples, n_features = X.shape
        if n_samples < self.n_components:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = {self.n_components}, n_samples = {n_samples}"
            )
        sample_weight = check_sample_weight(sample_weight, n_samples, X.dtype)
        module = self._module_to_fit(n_features)
        options = {"verbose": True} if self.verbose else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch_em.ConvergenceWarning)  # raised below as scikit-learn's
            try:
                if self.max_iter == 0:  # the initialisation alone
                    module.initialize(as_tensor(X), **weight_options(sample_weight))
                else:
                    module.fit(as_tensor(X), **options, **weight_options(sample_weight))
            except torch_em.IllConditionedError as error:
                raise ValueError(f"{ILL_DEFINED_COVARIANCE} ({error})") from error
        self.module_ = module
        self._set_fitted_attributes(module)
        if not self.converged_ and self.max_iter > 0:  # max_iter=0 asks for the initialisation alone
            warnings.warn(NOT_CONVERGED, ConvergenceWarning, stacklevel=3)  # past the unchanged_on_error wrapper
        return self

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """:meth:`fit`, then the most probable component of each sample ``(n_samples,)``."""
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def _module_to_fit(self, n_features: int) -> torch_em.GaussianMixture:
        """The fitted module, brought up to the current parameters, for a warm start (when it
        has the same components, covariance type and features); else a new module from the
        (validated) parameters."""
        module = getattr(self, "module_", None)
        same_model = module is not None and (module.n_components, module.covariance_type, module.n_features) == (
            self.n_components, self.covariance_type, n_features)
        if self.warm_start and same_model and module is not None:  # (same_model: it is not None)
            module.tol, module.max_iter, module.reg_covar = float(self.tol), max(1, int(self.max_iter)), float(self.reg_covar)
            module.warm_start = True  # also when warm_start was set after the first fit
            return module
        return torch_em.GaussianMixture(
            self.n_components, covariance_type=self.covariance_type, tol=self.tol, reg_covar=self.reg_covar,
            max_iter=max(1, self.max_iter), n_init=self.n_init, init_params=self.init_params,  # 0: initialize()
            weights_init=check_weights(self.weights_init, self.n_components),
            means_init=check_means(self.means_init, self.n_components, n_features),
            precisions_init=check_precisions(self.precisions_init, self.covariance_type, self.n_components, n_features),
            seed=seed_from_random_state(self.random_state), warm_start=self.warm_start, **self._module_options(),
        )

    def _set_fitted_attributes(self, module: torch_em.GaussianMixture) -> None:
        """scikit-learn's fitted attributes from the module, as numpy arrays and Python scalars."""
        self.weights_ = self._numpy(module.weights)
        self.means_ = self._numpy(module.means)
        self.covariances_ = self._numpy(module.covariances)
        self.precisions_ = self._numpy(module.precisions)
        self.precisions_cholesky_ = self._numpy(module.precisions_cholesky)
        self.converged_ = bool(module.converged_)
        # (the module is fitted: its results are set)
        self.n_iter_ = int(cast(torch.Tensor, module.n_iter_))
        self.lower_bound_ = float(cast(torch.Tensor, module.lower_bound_))
        # The history is padded to the longest restart: the best one's own iterations come first.
        self.lower_bounds_ = cast(torch.Tensor, module.lower_bound_history_)[: self.n_iter_].tolist()

    # --- evaluation ---------------------------------------------------------------------------
    def score_samples(self, X: Any) -> np.ndarray:
        """Log-likelihood of each sample ``(n_samples,)``."""
        data = self._evaluation_data(X)
        return self._numpy(self.module_.score_samples(data))

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Mean log-likelihood per sample (weighted by ``sample_weight`` when given)."""
        log_likelihood = self.score_samples(X)
        weights = check_sample_weight(sample_weight, log_likelihood.shape[0], log_likelihood.dtype)
        return float(np.average(log_likelihood, weights=weights))

    def predict(self, X: Any) -> np.ndarray:
        """Most probable component of each sample ``(n_samples,)``, int64."""
        data = self._evaluation_data(X)
        return self.module_.predict(data).cpu().numpy().astype(np.int64)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Posterior probability of each component ``(n_samples, n_components)``."""
        data = self._evaluation_data(X)
        return self._numpy(self.module_.predict_proba(data))

    def bic(self, X: Any) -> float:
        """Bayesian information criterion of X (lower is better)."""
        data = self._evaluation_data(X)
        return float(self.module_.bic(data))

    def aic(self, X: Any) -> float:
        """Akaike information criterion of X (lower is better)."""
        data = self._evaluation_data(X)
        return float(self.module_.aic(data))

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n_samples`` samples ``(n_samples, n_features)`` and their components
        ``(n_samples,)``; an int ``random_state`` gives the same draws at every call."""
        check_is_fitted(self)
        if not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r} . The sampling requires at least one sample."
            )
        samples, labels = self.module_.sample(int(n_samples), seed=seed_from_random_state(self.random_state))
        return self._numpy(samples), labels.cpu().numpy().astype(np.int64)

    def _n_parameters(self) -> int:
        """Free parameters of the fitted model (as scikit-learn's private method of that name)."""
        return self.module_.n_parameters()


# --- scikit-learn's checks of the initial parameters, with its messages ---------------------------
def check_shape(array: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if array.shape != shape:
        raise ValueError(f"The parameter '{name}' should have the shape of {shape}, but got {array.shape}")


def check_weights(weights: Any, n_components: int) -> np.ndarray | None:
    """``weights_init`` ``(K,)``: in [0, 1] and summing to 1, or None."""
    if weights is None:
        return None
    weights = check_array(weights, dtype=FLOAT_DTYPES, ensure_2d=False, input_name="weights_init")
    check_shape(weights, (n_components,), "weights")
    if bool((weights < 0).any()) or bool((weights > 1).any()):
        raise ValueError(
            f"The parameter 'weights' should be in the range [0, 1], but got min value {weights.min():.5f}, "
            f"max value {weights.max():.5f}"
        )
    atol = 1e-6 if weights.dtype == np.float32 else 1e-8
    if not np.allclose(abs(1.0 - weights.sum()), 0.0, atol=atol):
        raise ValueError(f"The parameter 'weights' should be normalized, but got sum(weights) = {weights.sum():.5f}")
    return weights


def check_means(means: Any, n_components: int, n_features: int) -> np.ndarray | None:
    """``means_init`` ``(K, D)``, or None."""
    if means is None:
        return None
    means = check_array(means, dtype=FLOAT_DTYPES, ensure_2d=False, input_name="means_init")
    check_shape(means, (n_components, n_features), "means")
    return means


def check_precisions(precisions: Any, covariance_type: str, n_components: int, n_features: int) -> np.ndarray | None:
    """``precisions_init`` in scikit-learn's shape for ``covariance_type``: positive (diag,
    spherical) or symmetric positive definite (full, tied); or None."""
    if precisions is None:
        return None
    precisions = check_array(precisions, dtype=FLOAT_DTYPES, ensure_2d=False, allow_nd=covariance_type == "full",
                             input_name="precisions_init")
    shapes = {"full": (n_components, n_features, n_features), "tied": (n_features, n_features),
              "diag": (n_components, n_features), "spherical": (n_components,)}
    check_shape(precisions, shapes[covariance_type], f"{covariance_type} precision")
    if covariance_type in ("diag", "spherical"):
        if bool((precisions <= 0).any()):
            raise ValueError(f"'{covariance_type} precision' should be positive")
        return precisions
    matrices = precisions.reshape(-1, n_features, n_features)
    symmetric = np.allclose(matrices, matrices.transpose(0, 2, 1))
    if not symmetric or not bool((np.linalg.eigvalsh(matrices) > 0).all()):
        raise ValueError(f"'{covariance_type} precision' should be symmetric, positive-definite")
    return precisions
