"""``BayesianGaussianMixture``: a variational Bayesian Gaussian mixture with scikit-learn's API.

The same engine as every other model: the latent structure
:class:`torch_em.latent.VariationalWeights` (E[log pi] from a Dirichlet distribution or a
truncated stick-breaking process) times the family :class:`torch_em.families.VariationalGaussian`
(expected natural parameters of a Gaussian-Wishart posterior), fitted by
:func:`torch_em.em.run_em`. The variational E-step is an ordinary E-step (one GEMM of the
Gaussian features, the same statistics); the variational M-step updates the posterior's
parameters in closed form from them; the objective is scikit-learn's lower bound
(``_compute_lower_bound``), from the E-step's entropy and the M-step's parameters.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Sequence, cast

import numpy as np
import torch

from . import distributed, em
from ._precision import keeps_dtype_when_rejected, without_autocast
from ._validation import as_float_tensor, check_finite, check_positive_tensor, check_shape
from .families.base import NotFittedError, Theta
from .families.variational_gaussian import GaussianWishartPrior, VariationalGaussian
from .gaussian_mixture import GaussianViews
from .latent.variational_weights import VariationalWeights, expected_weights
from .latent_model import LatentModel
from .mixture import Mixture
from .streaming import batch_source

#: The variational latent parameter under its module and working name.
LATENT_NAMES = {"log_weight_concentration": "log_weight_concentration"}


class BayesianGaussianMixture(GaussianViews, Mixture):
    """A batch of variational Bayesian Gaussian mixtures, as an ``nn.Module``, with the
    parameters and meanings of scikit-learn's ``BayesianGaussianMixture``.

    Args:
        n_components: K, the upper bound on the number of components (unused ones get
            vanishing weights).
        covariance_type, tol, reg_covar, max_iter, n_init: as scikit-learn's. ``tol`` applies to
            the lower bound (a total over the points, scikit-learn's), which ``lower_bound_`` reports.
        init_params: ``"kmeans"`` (default, as scikit-learn: responsibilities from k-means
            labels, then the variational M-step), ``"k-means++"``, ``"random"`` or
            ``"random_from_data"`` (torch_em's meanings, :class:`torch_em.Mixture`). The initial
            M-step is taken on all the points (its concentrations count them).
        weight_concentration_prior_type: ``"dirichlet_process"`` (truncated stick-breaking) or
            ``"dirichlet_distribution"``.
        weight_concentration_prior: the concentration alpha_0 (None: 1 / n_components).
        mean_precision_prior: beta_0 (None: 1).
        mean_prior: m_0 ``(D,)`` (None: the data mean).
        degrees_of_freedom_prior: nu_0, above D - 1 (None: D).
        covariance_prior: Psi_0, full and tied ``(D, D)``, diag ``(D,)``, spherical a number
            (None: the data's covariance, variances or mean variance, with ddof 1).
            Every hyperparameter may also carry ``batch_shape`` in front (one value per model).
        batch_shape, seed, chunk_size, warm_start, on_error, device, dtype: as
            :class:`torch_em.GaussianMixture`'s.

    ``fit(X, resp_init=...)`` starts from given responsibilities ``(N, K)`` (or labels ``(N,)``),
    optionally per model ``(*batch_shape, N, K)``, instead of ``init_params``: the start
    scikit-learn's ``_initialize(X, resp)`` makes.

    Fitted attributes (scikit-learn's names, ``(*batch_shape, ...)``): ``weights_`` (E[pi]),
    ``means_``, ``covariances_``, ``precisions_``, ``precisions_cholesky_``,
    ``weight_concentration_`` (a tuple (a, b) for the stick-breaking process),
    ``mean_precision_``, ``degrees_of_freedom_``, ``lower_bound_``, ``n_iter_``, ``converged_``,
    and the resolved hyperparameters ``weight_concentration_prior_``, ``mean_precision_prior_``,
    ``mean_prior_``, ``degrees_of_freedom_prior_``, ``covariance_prior_``. As in scikit-learn,
    ``score_samples``, ``score``, ``predict`` and ``predict_proba`` use the expected log joint
    ``E[log pi_k] + E[log N(x | mu_k, Lambda_k)]`` of the variational posterior; ``sample``
    draws from the point estimates (``weights_``, ``means_``, ``covariances_``).
    """

    family: VariationalGaussian
    latent: VariationalWeights
    #: The initial M-step counts points (concentrations and degrees of freedom grow with N), so
    #: it is taken on every point, never on a sample.
    stream_sample_size = sys.maxsize

    def __init__(
        self,
        n_components: int,
        n_features: int | None = None,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: Any = None,
        mean_precision_prior: Any = None,
        mean_prior: Any = None,
        degrees_of_freedom_prior: Any = None,
        covariance_prior: Any = None,
        batch_shape: Sequence[int] = (),
        seed: int | None = None,
        chunk_size: int | None = None,
        warm_start: bool = False,
        on_error: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        LatentModel.__init__(
            self, VariationalWeights(weight_concentration_prior_type), LATENT_NAMES,
            VariationalGaussian(covariance_type, reg_covar), n_components, n_features, batch_shape=batch_shape,
            tol=tol, max_iter=max_iter, n_init=n_init, init_params=init_params, seed=seed, chunk_size=chunk_size,
            warm_start=warm_start, on_error=on_error, device=device, dtype=dtype,
        )
        self.weights_init = None
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self._scalar_hyperparameters(self.n_features)  # the checks that need no data
        self._resp_init: Callable[[int, int], torch.Tensor] | None = None
        self._create_initial_parameters()

    @property
    def weight_concentration_prior_type(self) -> str:
        return self.latent.prior_type

    def _config(self) -> dict[str, Any]:
        config = LatentModel._config(self)
        for name in ("learning_decay", "learning_offset", "step_size", "averaging_start", "prior_count", "prior", "accelerate",
                     "annealing", "em_parameters"):
            del config[name]
        return {"n_components": self.n_components, **config, "covariance_type": self.covariance_type,
                "reg_covar": self.reg_covar, "weight_concentration_prior_type": self.weight_concentration_prior_type,
                "weight_concentration_prior": self.weight_concentration_prior,
                "mean_precision_prior": self.mean_precision_prior, "mean_prior": self.mean_prior,
                "degrees_of_freedom_prior": self.degrees_of_freedom_prior, "covariance_prior": self.covariance_prior}

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", covariance_type={self.covariance_type!r}, "
                                       f"weight_concentration_prior_type={self.weight_concentration_prior_type!r}")

    # --- fitting ----------------------------------------------------------------------------
    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def fit(  # type: ignore[override]  # resp_init (scikit-learn's) in place of process_group: data in memory only
            self, X: Any, y: Any = None, sample_weight: Any = None, verbose: bool = False, *,
            resp_init: Any = None) -> "BayesianGaussianMixture":
        """Fit every model of the batch by variational Bayes (restarts as an extra batch
        dimension; the best lower bound wins), as scikit-learn's ``fit``.

        X: ``(N, D)`` shared or ``(*batch_shape, N, D)``, in memory (chunked by ``chunk_size``).
        ``sample_weight`` ``(N,)`` or ``(*batch_shape, N)``: a point of weight w counts as w copies
        (in the statistics, the entropy and the data-dependent hyperparameters).
        ``resp_init``: initial responsibilities ``(N, K)`` / ``(*batch_shape, N, K)`` (rows
        summing to 1) or labels ``(N,)`` / ``(*batch_shape, N)`` in ``[0, K)``, which replace
        ``init_params`` (with ``n_init=1``). Raises ValueError before changing anything when an
        argument is invalid.
        """
        with self._priors_of(X, sample_weight, resp_init) as data:
            return self._fit(data, verbose, self.max_iter)

    @keeps_dtype_when_rejected
    @without_autocast
    @torch.no_grad()
    def initialize(  # type: ignore[override]  # resp_init in place of process_group: data in memory only
            self, X: Any, y: Any = None, sample_weight: Any = None, *,
            resp_init: Any = None) -> "BayesianGaussianMixture":
        """The initial parameters of :meth:`fit` (the variational M-step from the initial
        responsibilities) without iterations: ``n_iter_`` 0, ``lower_bound_`` -inf."""
        with self._priors_of(X, sample_weight, resp_init) as data:
            return self._initialize(data)

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None, *, resp_init: Any = None) -> torch.Tensor:
        """:meth:`fit`, then the labels of X under the fitted model ``(*batch_shape, N)``."""
        return self.fit(X, sample_weight=sample_weight, resp_init=resp_init).predict(X)

    @contextlib.contextmanager
    def _priors_of(self, X: Any, sample_weight: Any, resp_init: Any) -> Iterator[em.Data]:
        """The engine's data of ``X``, with the hyperparameters resolved from them (and the given
        initial responsibilities) in place for the body; everything is validated first, and a
        body that raises leaves the model as it was."""
        with distributed.using(False, f"{type(self).__name__}.fit"):
            if batch_source(X) is not None:
                raise ValueError(f"X must be an array or tensor in memory for {type(self).__name__}.fit "
                                 f"(the hyperparameters' defaults are data statistics), got {type(X).__name__}")
            data = cast(em.Data, self._data(X, sample_weight))  # (not a batch source: data in memory)
            latent, family = self._with_priors(data)
            given = None if resp_init is None else self._checked_resp_init(resp_init, data)
            saved = self.latent, self.family
            self.latent, self.family, self._resp_init = latent, family, given
            try:
                yield data
            except BaseException:
                self.latent, self.family = saved
                raise
            finally:
                self._resp_init = None

    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None, **kwargs: Any) -> "BayesianGaussianMixture":
        raise NotImplementedError(f"{type(self).__name__} has no online fit (partial_fit); use fit")

    def bic(self, X: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no bic (as scikit-learn's); compare lower_bound_")

    def aic(self, X: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no aic (as scikit-learn's); compare lower_bound_")

    def _given_responsibilities(self) -> Callable[[int, int], torch.Tensor] | None:
        return self._resp_init

    def _latent_working_value(self, value: torch.Tensor) -> torch.Tensor:
        return value  # log concentrations, not log-probabilities

    def _user_latent_initial(self) -> Theta:
        return {}

    # --- hyperparameters --------------------------------------------------------------------
    def _scalar_hyperparameters(self, n_features: int | None) -> dict[str, torch.Tensor | None]:
        """The number-valued hyperparameters given, validated, as (M,) tensors (None: not given).
        ``degrees_of_freedom_prior`` is checked against ``n_features`` when it is known."""
        values = {}
        for name in ("weight_concentration_prior", "mean_precision_prior", "degrees_of_freedom_prior"):
            value = getattr(self, name)
            values[name] = None if value is None else self._per_model(value, name, ())
        for name in ("weight_concentration_prior", "mean_precision_prior"):
            given = values[name]
            if given is not None:
                check_positive_tensor(given, name)
        dof = values["degrees_of_freedom_prior"]
        if dof is not None and n_features is not None and not bool((dof > n_features - 1).all()):
            raise ValueError(f"degrees_of_freedom_prior must be greater than n_features - 1 = {n_features - 1}, "
                             f"got {dof.min().item():g}")
        return values

    def _per_model(self, value: Any, name: str, event: tuple[int, ...]) -> torch.Tensor:
        """A hyperparameter ``event`` or ``(*batch_shape, *event)``, finite, as (M, *event)."""
        tensor = as_float_tensor(value, name, device=self.device, dtype=self.dtype)
        check_shape(tensor, name, event, self.batch_shape)
        check_finite(tensor, name)
        return tensor.expand((*self.batch_shape, *event)).reshape(self.n_models, *event)

    def _with_priors(self, data: em.Data) -> tuple[VariationalWeights, VariationalGaussian]:
        """The latent structure and family with every hyperparameter resolved for ``data``
        (the given values, or scikit-learn's data-dependent defaults), validated."""
        X, weights, n_features = data.X, data.weights, data.X.shape[-1]
        scalars = self._scalar_hyperparameters(n_features)
        M, K, like = self.n_models, self.n_components, data.X
        def scalar(name: str, default: float) -> torch.Tensor:
            value = scalars[name]
            return torch.full((M, 1), default, dtype=like.dtype, device=like.device) if value is None else value.unsqueeze(-1)

        mean = covariance = None
        if self.mean_prior is None or self.covariance_prior is None:
            mean, covariance = data_mean_and_covariance(X, weights, M)  # (M, D), (M, D, D)
        if self.mean_prior is not None:
            mean = self._per_model(self.mean_prior, "mean_prior", (n_features,))
        dof = scalar("degrees_of_freedom_prior", float(n_features))
        mean = cast(torch.Tensor, mean)  # the given mean_prior or the data's
        prior = GaussianWishartPrior(scalar("mean_precision_prior", 1.0), mean.unsqueeze(-2),
                                     dof.squeeze(-1) if self.covariance_type == "tied" else dof,
                                     self._covariance_prior(covariance, n_features))
        return self.latent.with_prior(scalar("weight_concentration_prior", 1.0 / K)), self.family.with_prior(prior)

    def _covariance_prior(self, covariance: torch.Tensor | None, n_features: int) -> torch.Tensor:
        """Psi_0 in the prior's layout (see :class:`GaussianWishartPrior`): the given one,
        validated, or the data's ``covariance`` (M, D, D) reduced to the covariance type
        (None when ``covariance_prior`` is given)."""
        kind, given, name = self.covariance_type, self.covariance_prior, f"{self.covariance_type} covariance_prior"
        if kind in ("full", "tied"):
            if given is None:
                value = cast(torch.Tensor, covariance)
            else:
                value = self._per_model(given, "covariance_prior", (n_features, n_features))
                asymmetry = float((value - value.mT).abs().max())
                if asymmetry > 1e-8 * max(float(value.abs().max()), 1.0):
                    raise ValueError(f"{name} must be symmetric, got asymmetry {asymmetry:.3g}")
                if bool((torch.linalg.cholesky_ex(value)[1] > 0).any()):
                    raise ValueError(f"{name} must be positive definite, got a matrix that is not")
            return value if kind == "tied" else value.unsqueeze(-3)
        if given is not None:
            value = self._per_model(given, "covariance_prior", (n_features,) if kind == "diag" else ())
        else:
            variances = cast(torch.Tensor, covariance).diagonal(dim1=-2, dim2=-1)  # (M, D)
            value = variances if kind == "diag" else variances.mean(-1)
        check_positive_tensor(value, name)
        return value.unsqueeze(-2) if kind == "diag" else value.unsqueeze(-1)

    def _checked_resp_init(self, resp_init: Any, data: em.Data) -> Callable[[int, int], torch.Tensor]:
        """``resp_init`` validated against the data, as ``resp(start, stop) -> (1, M or 1, K, n)``."""
        if self.n_init != 1:
            raise ValueError(f"resp_init gives every restart the same start: use n_init=1, got n_init={self.n_init}")
        if self.warm_start and self.is_initialized:
            raise ValueError("resp_init cannot be combined with a warm start (warm_start=True on a fitted model)")
        K, N, batch = self.n_components, data.X.shape[-2], tuple(self.batch_shape)
        try:
            raw = resp_init if isinstance(resp_init, torch.Tensor) else torch.as_tensor(np.asarray(resp_init))
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"resp_init must be an array of responsibilities or labels, got "
                             f"{type(resp_init).__name__} ({error})") from None
        if raw.dtype == torch.bool or raw.is_complex():
            raise ValueError(f"resp_init must hold responsibilities (floats) or labels (integers), got dtype {raw.dtype}")
        if not raw.is_floating_point():  # labels
            labels = raw.to(self.device)
            check_shape(labels, "resp_init (labels)", (N,), torch.Size(batch))
            if bool(((labels < 0) | (labels >= K)).any()):
                raise ValueError(f"resp_init labels must lie in [0, {K}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            resp = torch.nn.functional.one_hot(labels.long(), K).to(self.dtype)
        else:
            resp = as_float_tensor(raw, "resp_init", device=self.device, dtype=self.dtype)
            check_shape(resp, "resp_init", (N, K), torch.Size(batch))
            check_finite(resp, "resp_init")
            sums = resp.sum(-1)
            tolerance = max(1e-6, 1000 * torch.finfo(self.dtype).eps)
            if bool((resp < 0).any()) or bool(((sums - 1).abs() > tolerance).any()):
                raise ValueError(f"resp_init must be non-negative with rows summing to 1, got row sums "
                                 f"{sums.flatten()[:5].tolist()}")
        working = resp.mT.reshape(1, -1, K, N) if resp.dim() > 2 else resp.mT.unsqueeze(0).unsqueeze(0)  # (1, M|1, K, N)

        def given(start: int, stop: int) -> torch.Tensor:
            return working[..., start:stop]

        return given

    # --- fitted values ----------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        """E[pi] ``(*batch_shape, K)`` (scikit-learn's ``weights_``)."""
        concentration = self._require_parameters().exp()
        return expected_weights(concentration, self.latent.stick_breaking)

    @property
    def weight_concentration(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """alpha ``(*b, K)`` of the Dirichlet distribution, or the Beta parameters (a, b),
        ``(*b, K)`` each, of the stick-breaking process."""
        concentration = self._require_parameters().exp()
        if self.latent.stick_breaking:
            return cast(tuple[torch.Tensor, torch.Tensor], tuple(concentration.unbind(-2)))  # (a, b)
        return concentration

    @property
    def mean_precision(self) -> torch.Tensor:
        """beta ``(*b, K)``."""
        return self.family.mean_precision(self.theta())

    @property
    def degrees_of_freedom(self) -> torch.Tensor:
        """nu ``(*b, K)`` (tied: ``(*b,)``)."""
        return self.family.degrees_of_freedom(self.theta())

    # scikit-learn's names of the fitted values.
    weights_ = property(lambda self: self.weights)
    means_ = property(lambda self: self.means)
    covariances_ = property(lambda self: self.covariances)
    precisions_ = property(lambda self: self.precisions)
    precisions_cholesky_ = property(lambda self: self.precisions_cholesky)
    weight_concentration_ = property(lambda self: self.weight_concentration)
    mean_precision_ = property(lambda self: self.mean_precision)
    degrees_of_freedom_ = property(lambda self: self.degrees_of_freedom)

    def _prior(self) -> GaussianWishartPrior:
        if self.family.prior is None:
            raise NotFittedError(f"{type(self).__name__} has no resolved hyperparameters before a fit")
        return self.family.prior

    def _module_prior(self, value: torch.Tensor, event: int) -> torch.Tensor:
        """A hyperparameter (M, 1?, *event) in the module layout (*batch_shape, *event)."""
        return value.reshape((*self.batch_shape, *value.shape[value.dim() - event:]))

    @property
    def weight_concentration_prior_(self) -> torch.Tensor:
        self._prior()
        return self._module_prior(cast(torch.Tensor, self.latent.weight_concentration_prior), 0)  # (resolved)

    @property
    def mean_precision_prior_(self) -> torch.Tensor:
        return self._module_prior(self._prior().mean_precision, 0)

    @property
    def mean_prior_(self) -> torch.Tensor:
        return self._module_prior(self._prior().mean, 1)

    @property
    def degrees_of_freedom_prior_(self) -> torch.Tensor:
        return self._module_prior(self._prior().degrees_of_freedom, 0)

    @property
    def covariance_prior_(self) -> torch.Tensor:
        events = {"full": 2, "tied": 2, "diag": 1, "spherical": 0}
        return self._module_prior(self._prior().covariance, events[self.covariance_type])


def data_mean_and_covariance(X: torch.Tensor, weights: torch.Tensor | None, n_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weighted) mean (M, D) and covariance (M, D, D) with ddof 1 (``np.cov``'s; a point
    of weight w counts as w points) of data X (N, D) shared by the M models or (M, N, D).
    Raises ValueError when the total weight is not above 1."""
    w = torch.ones(X.shape[-2], dtype=X.dtype, device=X.device) if weights is None else weights.to(X.dtype)
    total = w.sum(-1)  # () or (M,)
    if not bool((total > 1).all()):
        raise ValueError(f"X must hold more than one point (in total weight) for the default mean_prior and "
                         f"covariance_prior, got {total.min().item():g}; pass them explicitly")
    mean = (w.unsqueeze(-2) @ X).squeeze(-2) / total.unsqueeze(-1)  # (D,) or (M, D)
    centred = X - mean.unsqueeze(-2)
    covariance = (centred * w.unsqueeze(-1)).mT @ centred / (total - 1)[..., None, None]
    return mean.expand(n_models, -1), covariance.expand(n_models, -1, -1)
