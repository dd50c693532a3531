"""Conjugate priors for maximum a posteriori (MAP) EM.

With a conjugate prior the M-step stays closed form: the prior is a set of pseudo-statistics
added to the E-step's sums before the M-step (:func:`torch_em.em.m_step`), so MAP-EM works in
every driver (full-batch, chunked, streamed, online, distributed). The objective EM monitors,
and ``lower_bound_`` reports, becomes ``(log-likelihood + log prior) / n``; BIC and AIC stay
defined on the log-likelihood.

The priors (hyperparameters are numbers or tensors broadcastable to ``(*batch_shape, *event)``,
so that a batch of models can sweep them):

    Dirichlet(concentration, stickiness)   mixture weights, HMM start and transition rows (plus
                                           ``stickiness`` on the diagonal of the transitions),
                                           GMMHMM within-state weights, Categorical probabilities
    Beta(alpha, beta)                      Bernoulli probabilities
    Gamma(shape, rate)                     Poisson rates, Exponential rates
    NormalInverseWishart(...)              Gaussian means and covariances (full, tied)
    NormalInverseGamma(...)                Gaussian means and variances (diag, spherical)

MAP estimates are modes in the parameters' own coordinates (probabilities, rates, means and
covariances). A model's ``prior=`` takes None (maximum likelihood), ``"default"`` (the
components' default prior, below; flat weights), one prior (for the components) or a dict
naming the groups, e.g. ``{"weights": Dirichlet(2.0), "components": "default"}`` (an HMM's
groups: ``"startprob"``, ``"transmat"``, ``"mix_weights"``, ``"components"``); a :class:`Product`
family takes a list with one entry (a prior, ``"default"`` or None) per block.

Defaults. Gaussian: the data-dependent conjugate prior of mclust (Fraley & Raftery 2007):
shrinkage ``kappa = 0.01``, mean prior the data mean, ``nu = D + 2`` degrees of freedom and
scale ``var(data) / K^(2/D)`` (the covariance matrix for full and tied, per-feature variances
for diag, their mean for spherical; diag and spherical variances take ``nu = 3``, one
variance's marginal under that inverse Wishart). Bernoulli, Categorical, Poisson and Exponential: one
pseudo-observation per component at the data's average (Beta ``1 + p, 2 - p``; Dirichlet
``1 + frequencies``; Gamma ``(1 + mean, 1)`` on a Poisson rate, ``(2, mean)`` on an exponential
rate). The Gamma family (its shape) and von Mises-Fisher (its concentration) have no conjugate
prior: asking for one is a ValueError.

Gaussian MAP estimates (``n_k``, ``xbar_k``, scatter ``W_k`` of a component; ``[kappa > 0]`` is 1
when the mean has a proper prior):

    mu_k    = (n_k xbar_k + kappa mu_0) / (n_k + kappa)
    Sigma_k = (Psi + W_k + kappa n_k / (n_k + kappa) (xbar_k - mu_0)(xbar_k - mu_0)^T) / c_k
    c_k     = full: n_k + nu + D + 1 + [kappa > 0];   tied (one Sigma): N + nu + D + 1 + K [kappa > 0]
              diag: n_k + nu + 2 + [kappa > 0] per variance;   spherical: (D n_k + nu + 2 + D [kappa > 0]) / D

As pseudo-statistics about the reference point ``s``: ``kappa`` pseudo-points at ``mu_0`` (sums
``kappa (mu_0 - s)``, second moments ``kappa T2(mu_0 - s) + Psi``) and pseudo-counts that differ
between the mean's statistics (``kappa``) and the second moments' (``c_k - n_k``): the families'
M-steps take counts per statistic for this. The flat limit ``kappa = 0, Psi = 0`` with
``nu = -(D + 1)`` (inverse Wishart) or ``nu = -2`` (inverse gamma) adds nothing: the MLE.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, TypeVar, cast

import torch

from . import distributed
from .families.base import ComponentFamily, Theta
from .families.bernoulli import Bernoulli
from .families.categorical import Categorical
from .families.exponential import Exponential
from .families.gaussian import Gaussian, _triu_indices
from .families.poisson import Poisson
from .families.product import Product
from .latent import LatentStructure
from .layout import Layout
from .params import Params
from .statistics import Statistics

DEFAULT = "default"
#: The group a prior given alone applies to.
COMPONENTS = "components"


class Prior:
    """A conjugate prior; its hyperparameters broadcast to ``(*batch_shape, *event)``."""

    def _hyperparameters(self) -> dict[str, Any]:
        return dict(vars(self))

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={_describe(value)}" for name, value in self._hyperparameters().items())
        return f"{type(self).__name__}({values})"


class Dirichlet(Prior):
    """Dirichlet prior on probability vectors: ``p ~ Dir(concentration)`` (every concentration
    at least 1, so the mode is interior); ``stickiness`` (HMM transitions only) adds
    ``stickiness`` to the diagonal's concentration (self-transitions a priori likelier, as in
    dynamax's sticky HMM). ``concentration`` broadcasts to the probabilities' shape, e.g.
    ``(*batch_shape, K)`` for mixture weights."""

    def __init__(self, concentration: Any = 1.0, *, stickiness: Any = 0.0) -> None:
        self.concentration = concentration
        self.stickiness = stickiness


class Beta(Prior):
    """Beta prior on Bernoulli probabilities, ``p ~ Beta(alpha, beta)`` with ``alpha, beta >= 1``,
    broadcastable to ``(*batch_shape, K, D)``; None (both): one pseudo-observation at the data's
    average, ``alpha = 1 + p_data``, ``beta = 2 - p_data``."""

    def __init__(self, alpha: Any = None, beta: Any = None) -> None:
        if (alpha is None) != (beta is None):
            raise ValueError(f"Beta needs alpha and beta both given or both None, got alpha={alpha!r}, beta={beta!r}")
        self.alpha = alpha
        self.beta = beta


class Gamma(Prior):
    """Gamma prior on positive rates (Poisson, Exponential), density proportional to
    ``rate^(shape - 1) exp(-rate_prior * rate)``: ``shape >= 1``, ``rate >= 0`` (0: improper,
    flat in the rate's scale), broadcastable to ``(*batch_shape, K, D)``; None (both): one
    pseudo-observation at the data's mean."""

    def __init__(self, shape: Any = None, rate: Any = None) -> None:
        if (shape is None) != (rate is None):
            raise ValueError(f"Gamma needs shape and rate both given or both None, got shape={shape!r}, rate={rate!r}")
        self.shape = shape
        self.rate = rate


class NormalInverseWishart(Prior):
    """Normal-inverse-Wishart prior on a Gaussian's mean and covariance (full and tied):
    ``Sigma ~ IW(scale, degrees_of_freedom)``, ``mu | Sigma ~ N(mean, Sigma / shrinkage)``.

    Each hyperparameter None takes mclust's data-dependent default: shrinkage 0.01, mean the data
    mean, degrees_of_freedom D + 2, scale the data covariance / K^(2/D). ``scale`` is (D, D)
    (or a number: times the identity), ``mean`` (D,), each with optional batch dims in front.
    ``shrinkage = 0`` makes the mean's prior flat; ``shrinkage = 0``, ``scale = 0`` and
    ``degrees_of_freedom = -(D + 1)`` is the flat (improper) prior: the MLE."""

    def __init__(self, shrinkage: Any = None, mean: Any = None, degrees_of_freedom: Any = None, scale: Any = None) -> None:
        self.shrinkage = shrinkage
        self.mean = mean
        self.degrees_of_freedom = degrees_of_freedom
        self.scale = scale


class NormalInverseGamma(NormalInverseWishart):
    """The diag and spherical form of :class:`NormalInverseWishart`: every variance
    ``sigma^2 ~ InvGamma(degrees_of_freedom / 2, scale / 2)`` (diag: one per feature, ``scale``
    (D,) or a number; spherical: one per component, ``scale`` a number), the mean
    ``N(mean, sigma^2 / shrinkage)``. Defaults as mclust's, adapted: scale the data's
    per-feature variances / K^(2/D) for diag, their mean for spherical; degrees_of_freedom 3,
    those of one variance's marginal under the full model's inverse Wishart (``nu - D + 1`` with
    ``nu = D + 2``). The flat prior has ``degrees_of_freedom = -2``."""


PriorSpec = Any  # None | "default" | Prior | Mapping[str, Prior | str | None] (and lists for Product)


def as_groups(prior: PriorSpec) -> dict[str, Any]:
    """``prior=`` as a dict by group: a prior (or "default", or a Product's list) alone is the components'."""
    if prior is None:
        return {}
    return dict(prior) if isinstance(prior, Mapping) else {COMPONENTS: prior}


def check_prior_spec(prior: PriorSpec, groups: Sequence[str], name: str = "prior") -> None:
    """Reject a malformed ``prior=`` (wrong type, unknown group) at construction."""
    if prior is None or prior == DEFAULT or isinstance(prior, Prior):
        return
    if isinstance(prior, (list, tuple)):
        for i, entry in enumerate(prior):
            check_prior_spec(entry, groups, f"{name}[{i}]")
        return
    if isinstance(prior, Mapping):
        unknown = sorted(set(prior) - set(groups))
        if unknown:
            raise ValueError(f"{name} names unknown group(s) {unknown}; expected some of {list(groups)}")
        for group, value in prior.items():
            check_prior_spec(value, groups, f"{name}[{group!r}]")
        return
    raise ValueError(f"{name} must be None, 'default', a prior from torch_em.priors or a dict of them, got {prior!r}")


# --- resolution: hyperparameters in the working layout ---------------------------------------------
class DataSummary:
    """What data-dependent defaults need of the data a fit starts from (the initialisation's
    sample): weighted mean (D,) or (M, D), covariance (D, D) or (M, D, D) and average family
    features; rank 0's under torch.distributed (every rank then has the same prior)."""

    def __init__(self, X: torch.Tensor, weights: torch.Tensor | None):
        self.X, self.weights = X, weights
        w = X.new_ones(X.shape[-2]) if weights is None else weights.to(X.dtype)  # (N,) or (M, N)
        total = w.sum(-1)  # () or (M,)
        self.mean = (w.unsqueeze(-1) * X).sum(-2) / total.unsqueeze(-1)  # (D,) or (M, D)
        centred = X - self.mean.unsqueeze(-2)
        # var() in R and mclust divide by n - 1.
        covariance = (centred * w.unsqueeze(-1)).mT @ centred / (total - 1).clamp_min(1.0)[..., None, None]
        self.mean, self.covariance = distributed.broadcast(self.mean, 0.5 * (covariance + covariance.mT))

    def average_features(self, family: ComponentFamily) -> torch.Tensor:
        """(D,)/(M, D)-style weighted mean of ``family.features(X)`` (F,) or (M, F)."""
        T = family.features(self.X, None)[0]
        w = T.new_ones(T.shape[-2]) if self.weights is None else self.weights.to(T.dtype)
        return distributed.broadcast((w.unsqueeze(-1) * T).sum(-2) / w.sum(-1, keepdim=True))[0]


class Context:
    """Everything a prior needs to become tensors: family, K, D, the model layout, the data."""

    def __init__(self, family: ComponentFamily, n_components: int, n_features: int, layout: Layout,
                 like: torch.Tensor, data: DataSummary):
        self.family, self.K, self.D, self.layout, self.like, self.data = family, n_components, n_features, layout, like, data

    def working(self, value: Any, event: tuple[int, ...], name: str, data: torch.Tensor | None = None) -> torch.Tensor:
        """A hyperparameter (number or tensor broadcastable to (*batch_shape, *event)) as
        (1, M, *event); ``data`` (event) or (M, *event): a data-dependent value."""
        batch = self.layout.batch_shape
        if data is not None and value is None:
            if data.dim() > len(event):  # one value per model of per-model data
                return data.reshape(1, self.layout.n_models, *event).to(self.like)
            value = data
        tensor = torch.as_tensor(value, dtype=self.like.dtype, device=self.like.device)
        try:
            full = tensor.expand((*batch, *event)) if tensor.dim() <= len(batch) + len(event) else None
        except RuntimeError:
            full = None
        if full is None:
            raise ValueError(f"{name} must broadcast to {(*batch, *event)} (batch_shape + {event}), "
                             f"got shape {tuple(tensor.shape)}")
        if not bool(torch.isfinite(full).all()):
            raise ValueError(f"{name} must be finite, got {_describe(value)}")
        return self.layout.working(full.contiguous())

    def sub(self, family: ComponentFamily, columns: Any) -> "Context":
        """The context of a Product block over ``columns`` (an index of the last axis)."""
        X = self.data.X[..., columns]
        return Context(family, self.K, X.shape[-1], self.layout, self.like, DataSummary(X, self.data.weights))


def _at_least(tensor: torch.Tensor, bound: float, name: str, why: str) -> None:
    if bool((tensor < bound).any()):
        raise ValueError(f"{name} must be at least {bound:g} ({why}), got minimum {float(tensor.min()):.4g}")


PriorT = TypeVar("PriorT", bound="ResolvedPrior")


class ResolvedPrior:
    """A prior's hyperparameters as tensors (1, M, ...), and what the engine asks of them."""

    def models(self: PriorT, index: torch.Tensor) -> PriorT:
        """The prior of the models at positions ``index`` (A,) of M."""
        selected = type(self).__new__(type(self))
        selected.__dict__.update({name: value.index_select(1, index) if isinstance(value, torch.Tensor) else value
                                  for name, value in self.__dict__.items()})
        return selected


class DirichletLatent(ResolvedPrior):
    """A Dirichlet prior on the rows of a latent probability parameter (1, M, *event)."""

    def __init__(self, concentration: torch.Tensor):
        self.concentration = concentration

    def pseudo_counts(self) -> torch.Tensor:
        return self.concentration - 1

    def log_prob(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(R, M) from normalised log-probabilities (R, M, *event)."""
        value = _dirichlet_log_prob(self.concentration, log_probs)  # (R, M, *event[:-1])
        return value.reshape(*value.shape[:2], -1).sum(-1)


def _dirichlet_log_prob(concentration: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Dirichlet log-density over the last axis: (..., C) -> (...)."""
    alpha = concentration
    zero_log = torch.where(alpha == 1, 0.0, (alpha - 1) * log_probs)  # no 0 * -inf at a structural zero
    return zero_log.sum(-1) + torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1)


class EmissionPrior(ResolvedPrior):
    """A conjugate prior on the components of a family: pseudo-statistics and a log-density."""

    def pseudo_statistics(self, reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-counts and pseudo-sums (1, M, K|1, F) each, about ``reference``."""
        raise NotImplementedError

    def log_prob(self, theta: Theta) -> torch.Tensor:
        """(R, M) log prior density of the components' parameters (working layout)."""
        raise NotImplementedError


class ConstantPseudo(EmissionPrior):
    """Pseudo-statistics that do not depend on a reference point (Beta, Dirichlet, Gamma on the
    discrete and rate families) and the prior's log-density as a function of theta."""

    def __init__(self, counts: torch.Tensor, sums: torch.Tensor, hyper: dict[str, torch.Tensor], log_density):
        self.counts, self.sums, self.hyper, self.log_density = counts, sums, hyper, log_density

    def pseudo_statistics(self, reference):
        return self.counts, self.sums

    def log_prob(self, theta):
        return self.log_density(theta, **self.hyper)

    def models(self, index):
        selected = super().models(index)
        selected.hyper = {name: value.index_select(1, index) for name, value in self.hyper.items()}
        return selected


class GaussianPrior(EmissionPrior):
    """Normal-inverse-Wishart / -gamma hyperparameters (1, M, 1, ...) of a Gaussian family:
    shrinkage (1, M, 1), mean (1, M, 1, D), degrees_of_freedom (1, M, 1), scale (1, M, 1, D, D)
    (full, tied), (1, M, 1, D) (diag) or (1, M, 1) (spherical)."""

    def __init__(self, family: Gaussian, n_components: int, shrinkage, mean, degrees_of_freedom, scale):
        self.family, self.K = family, n_components
        self.shrinkage, self.mean, self.degrees_of_freedom, self.scale = shrinkage, mean, degrees_of_freedom, scale

    def _scatter_pseudo_count(self) -> torch.Tensor:
        """``c_k - n_k`` (1, M, 1) of the module docstring (per component for tied)."""
        kind, D, nu = self.family.covariance_type, self.mean.shape[-1], self.degrees_of_freedom
        has_mean_prior = (self.shrinkage > 0).to(nu.dtype)
        if kind == "full":
            return nu + D + 1 + has_mean_prior
        if kind == "tied":
            return (nu + D + 1) / self.K + has_mean_prior
        if kind == "diag":
            return nu + 2 + has_mean_prior
        return (nu + 2) / D + has_mean_prior

    def pseudo_statistics(self, reference):
        kind, D = self.family.covariance_type, self.mean.shape[-1]
        centred = self.mean if reference is None else self.mean - reference  # (., ., K|1, D)
        kappa = self.shrinkage.unsqueeze(-1)  # (1, M, 1, 1)
        second = kappa * self.family.features(centred, None)[0][..., D:]
        if kind in ("full", "tied"):
            rows, cols = _triu_indices(D, centred.device)
            # tied: the one covariance's M-step sums the components' statistics, so each holds Psi / K.
            second = second + self.scale[..., rows, cols] / (self.K if kind == "tied" else 1)
        elif kind == "diag":
            second = second + self.scale
        else:
            second = second + self.scale.unsqueeze(-1)
        sums = torch.cat([(kappa * centred).expand(*second.shape[:-1], D), second], -1)
        counts = torch.cat([kappa.expand(*second.shape[:-1], D),
                            self._scatter_pseudo_count().unsqueeze(-1).expand_as(second)], -1)
        return counts, sums

    def log_prob(self, theta):
        family, kind = self.family, self.family.covariance_type
        loc = theta["loc"]  # (R, M, K, D)
        D = loc.shape[-1]
        kappa, nu, mean = self.shrinkage, self.degrees_of_freedom, self.mean
        raw = theta["raw_precision_cholesky"]
        if kind in ("full", "tied"):
            chol = family.precision_cholesky(theta)  # (R, M, K|., D, D)
            half_logdet_precision = raw.diagonal(dim1=-2, dim2=-1).sum(-1)  # (R, M, K) or (R, M)
            precision = chol @ chol.mT
            scale = self.scale if kind == "full" else self.scale.squeeze(2)
            nu_cov = nu if kind == "full" else nu.squeeze(2)
            trace = (scale * precision).sum((-2, -1))
            covariance_part = (nu_cov + D + 1) * half_logdet_precision - 0.5 * trace + _wishart_normaliser(scale, nu_cov)
            covariance_part = covariance_part.sum(-1) if kind == "full" else covariance_part
            if kind == "tied":
                chol, half_logdet_precision = chol.unsqueeze(2), half_logdet_precision.unsqueeze(-1)
            whitened = ((loc - mean).unsqueeze(-2) @ chol).squeeze(-2)  # (R, M, K, D): (mu - mu0)^T P
            mean_part = 0.5 * D * (kappa.clamp_min(1e-300).log() - math.log(2 * math.pi)) + half_logdet_precision \
                - 0.5 * kappa * whitened.square().sum(-1)
        else:
            precision = family.precision_cholesky(theta).square()  # (R, M, K, D) or (R, M, K)
            a, b = 0.5 * nu, 0.5 * self.scale
            if kind == "spherical":
                a = a.expand_as(precision)
                log_precision = precision.log()
                offsets = (loc - mean).square().sum(-1)
                dims = D
            else:
                a = a.unsqueeze(-1)
                log_precision = precision.log()
                offsets = (loc - mean).square()
                dims = 1
            normaliser = torch.where((a > 0) & (b > 0), a * b.clamp_min(1e-300).log() - torch.lgamma(a.clamp_min(1e-300)), 0.0)
            # InvGamma(a, b) on the variance 1/lambda: a log b - lgamma(a) + (a + 1) log lambda - b lambda.
            covariance_part = (normaliser + (a + 1) * log_precision - b * precision).flatten(2).sum(-1)
            k = kappa if kind == "spherical" else kappa.unsqueeze(-1)
            mean_part = (0.5 * dims * (k.clamp_min(1e-300).log() - math.log(2 * math.pi) + log_precision)
                         - 0.5 * k * precision * offsets)
            mean_part = mean_part if kind == "spherical" else mean_part.sum(-1)
        mean_part = torch.where(kappa > 0, mean_part, 0.0).sum(-1)
        return covariance_part + mean_part


def _wishart_normaliser(scale: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """log of the inverse-Wishart normaliser ``|Psi|^(nu/2) / (2^(nu D / 2) Gamma_D(nu / 2))``
    where the prior is proper (nu > D - 1, Psi positive definite), else 0 (improper: the
    unnormalised density)."""
    D = scale.shape[-1]
    lower, info = torch.linalg.cholesky_ex(scale)
    proper = (info == 0) & (nu > D - 1)
    logdet = 2 * lower.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).log().sum(-1)
    half = torch.where(proper, 0.5 * nu, 0.5 * D)  # a valid argument where unused
    value = 0.5 * nu * logdet - 0.5 * nu * D * math.log(2) - torch.special.multigammaln(half, D)
    return torch.where(proper, value, 0.0)


# --- priors of each family ---------------------------------------------------------------------------
def _gaussian_prior(spec: NormalInverseWishart, context: Context) -> GaussianPrior:
    family: Gaussian = context.family  # type: ignore[assignment]
    kind, D, K = family.covariance_type, context.D, context.K
    if kind in ("full", "tied") and type(spec) is NormalInverseGamma:
        raise ValueError(f"covariance_type={kind!r} takes a NormalInverseWishart prior, got NormalInverseGamma")
    if kind in ("diag", "spherical") and type(spec) is NormalInverseWishart:
        raise ValueError(f"covariance_type={kind!r} takes a NormalInverseGamma prior, got NormalInverseWishart")
    data = context.data
    shrinkage = context.working(0.01 if spec.shrinkage is None else spec.shrinkage, (), "shrinkage")
    mean = context.working(spec.mean, (D,), "mean", data.mean)
    flat = -(D + 1) if kind in ("full", "tied") else -2
    # An inverse gamma takes the degrees of freedom of one variance's marginal under mclust's
    # inverse Wishart (nu - D + 1 = 3 for nu = D + 2), an inverse Wishart nu = D + 2 itself.
    default_dof = D + 2 if kind in ("full", "tied") else 3
    dof = context.working(default_dof if spec.degrees_of_freedom is None else spec.degrees_of_freedom, (),
                          "degrees_of_freedom")
    _at_least(shrinkage, 0, "shrinkage", "a precision multiplier")
    _at_least(dof, flat, "degrees_of_freedom", f"{flat} is the flat prior for covariance_type={kind!r}")
    factor = K ** (-2 / D)
    variances = data.covariance.diagonal(dim1=-2, dim2=-1)
    if kind in ("full", "tied"):
        default = None if spec.scale is not None else data.covariance * factor
        value = spec.scale
        if value is not None and torch.as_tensor(value).dim() == 0:
            value = torch.as_tensor(value, dtype=context.like.dtype) * torch.eye(D, dtype=context.like.dtype)
        scale = context.working(value, (D, D), "scale", default)
        slack = 1000 * torch.finfo(scale.dtype).eps * scale.abs().amax().clamp_min(torch.finfo(scale.dtype).tiny)
        eigenvalues = torch.linalg.eigvalsh(0.5 * (scale + scale.mT))
        if bool((scale - scale.mT).abs().amax() > slack) or bool((eigenvalues < -slack).any()):
            raise ValueError("scale must hold symmetric positive semi-definite (D, D) matrices, got minimum "
                             f"eigenvalue {float(eigenvalues.min()):.4g}")
        scale = 0.5 * (scale + scale.mT)
    elif kind == "diag":
        scale = context.working(spec.scale, (D,), "scale", None if spec.scale is not None else variances * factor)
        _at_least(scale, 0, "scale", "variances")
    else:
        scale = context.working(spec.scale, (), "scale", None if spec.scale is not None else variances.mean(-1) * factor)
        _at_least(scale, 0, "scale", "a variance")
    return GaussianPrior(family, K, shrinkage.unsqueeze(-1), mean.unsqueeze(2), dof.unsqueeze(-1), scale.unsqueeze(2))


def _bernoulli_prior(spec: Beta, context: Context) -> ConstantPseudo:
    shape = (context.K, context.D)
    if spec.alpha is None:
        p = context.data.average_features(context.family).clamp(0, 1)  # (D,) or (M, D)
        p = p.unsqueeze(-2).expand(*p.shape[:-1], *shape)
        alpha, beta = context.working(None, shape, "alpha", 1 + p), context.working(None, shape, "beta", 2 - p)
    else:
        alpha, beta = context.working(spec.alpha, shape, "alpha"), context.working(spec.beta, shape, "beta")
    _at_least(alpha, 1, "alpha", "a MAP estimate needs an interior mode")
    _at_least(beta, 1, "beta", "a MAP estimate needs an interior mode")
    return ConstantPseudo(alpha + beta - 2, alpha - 1, {"alpha": alpha, "beta": beta}, _beta_log_density)


def _beta_log_density(theta: Theta, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    logits = theta["logit_probs"]
    log_p, log_q = torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits)
    value = (alpha - 1) * log_p + (beta - 1) * log_q - (torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta))
    return value.flatten(2).sum(-1)


def _categorical_prior(spec: Dirichlet, context: Context) -> ConstantPseudo:
    family: Categorical = context.family  # type: ignore[assignment]
    C = family.n_categories
    shape = (context.K, context.D, C)
    _no_stickiness(spec, "a Categorical family's probabilities")
    if spec.concentration is None:
        frequencies = context.data.average_features(family)  # (D * C,) or (M, D * C)
        frequencies = frequencies.unflatten(-1, (context.D, C)).unsqueeze(-3).expand(*frequencies.shape[:-1], *shape)
        alpha = context.working(None, shape, "concentration", 1 + frequencies)
    else:
        alpha = context.working(spec.concentration, shape, "concentration")
    _at_least(alpha, 1, "concentration", "a MAP estimate needs an interior mode")
    counts = (alpha - 1).sum(-1, keepdim=True).expand_as(alpha)
    return ConstantPseudo(counts.flatten(-2), (alpha - 1).flatten(-2), {"alpha": alpha}, _categorical_log_density)


def _categorical_log_density(theta: Theta, alpha: torch.Tensor) -> torch.Tensor:
    return _dirichlet_log_prob(alpha, theta["logit_categories"].log_softmax(-1)).flatten(2).sum(-1)


def _rate_prior(spec: Gamma, context: Context) -> ConstantPseudo:
    shape = (context.K, context.D)
    poisson = isinstance(context.family, Poisson)
    if spec.shape is None:
        mean = context.data.average_features(context.family)  # (D,) or (M, D)
        mean = mean.unsqueeze(-2).expand(*mean.shape[:-1], *shape)
        # One pseudo-point at the mean: Poisson mode (s + mean) / (n + 1), exponential (n + 1) / (s + mean).
        a = context.working(None, shape, "shape", 1 + mean if poisson else 2 + 0 * mean)
        b = context.working(None, shape, "rate", 1 + 0 * mean if poisson else mean)
    else:
        a, b = context.working(spec.shape, shape, "shape"), context.working(spec.rate, shape, "rate")
    _at_least(a, 1, "shape", "a MAP estimate needs an interior mode")
    _at_least(b, 0, "rate", "0 is the flat limit")
    # Poisson mode (s + a - 1) / (n + b); exponential rate mode (n + a - 1) / (s + b): its M-step
    # divides counts by sums, so the pseudo-counts and pseudo-sums swap.
    counts, sums = (b, a - 1) if poisson else (a - 1, b)
    return ConstantPseudo(counts, sums, {"a": a, "b": b}, _gamma_log_density)


def _gamma_log_density(theta: Theta, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    log_rate = theta["log_rates"]
    normaliser = torch.where(b > 0, a * b.clamp_min(1e-300).log() - torch.lgamma(a), 0.0)
    return (normaliser + (a - 1) * log_rate - b * log_rate.exp()).flatten(2).sum(-1)


class ProductPrior(EmissionPrior):
    """The priors of a Product's blocks (None: no prior on that block)."""

    def __init__(self, family: Product, parts: list[EmissionPrior | None]):
        self.family, self.parts = family, parts

    def pseudo_statistics(self, reference):
        pieces = [None if part is None else part.pseudo_statistics(self.family._block_shift(reference, block))
                  for block, part in zip(self.family.blocks, self.parts)]
        lead = torch.broadcast_shapes(*(c.shape[:-1] for piece in pieces if piece is not None for c in piece))
        like = next(piece[0] for piece in pieces if piece is not None)

        def joined(which: int) -> torch.Tensor:
            return torch.cat([
                like.new_zeros(*lead, block.family.n_statistics(block.n_columns)) if piece is None
                else piece[which].expand(*lead, piece[which].shape[-1])
                for block, piece in zip(self.family.blocks, pieces)], -1)
        return joined(0), joined(1)

    def log_prob(self, theta):
        return sum(part.log_prob(self.family.block_theta(theta, position))
                   for position, part in enumerate(self.parts) if part is not None)

    def models(self, index):
        return ProductPrior(self.family, [None if part is None else part.models(index) for part in self.parts])


def _no_stickiness(spec: Dirichlet, what: str) -> None:
    if not bool(torch.as_tensor(spec.stickiness == 0 if not isinstance(spec.stickiness, torch.Tensor)
                                else (spec.stickiness == 0).all())):
        raise ValueError(f"stickiness applies to HMM transition rows only, got {_describe(spec.stickiness)} for {what}")


def emission_prior(spec: Any, context: Context) -> EmissionPrior | None:
    """The resolved prior of ``context.family``'s components, or None."""
    family = context.family
    if spec is None:
        return None
    if isinstance(family, Product):
        if spec == DEFAULT:
            spec = [DEFAULT] * len(family.blocks)
        if not isinstance(spec, (list, tuple)) or len(spec) != len(family.blocks):
            raise ValueError(f"the prior of a Product family must be 'default' or a list of {len(family.blocks)} "
                             f"entries (a prior, 'default' or None per block), got {spec!r}")
        parts = [emission_prior(entry, context.sub(block.family, block.index)) for block, entry in zip(family.blocks, spec)]
        return None if all(part is None for part in parts) else ProductPrior(family, parts)
    if isinstance(spec, (list, tuple)):
        raise ValueError(f"a list of priors is for a Product family's blocks, got one for {type(family).__name__}")
    builders: dict[type, tuple[Callable[[Any, Context], EmissionPrior], type]] = {
        Gaussian: (_gaussian_prior, NormalInverseWishart), Bernoulli: (_bernoulli_prior, Beta),
        Categorical: (_categorical_prior, Dirichlet), Poisson: (_rate_prior, Gamma),
        Exponential: (_rate_prior, Gamma)}
    kind = next((k for k in builders if isinstance(family, k)), None)
    if kind is None:
        raise ValueError(f"{type(family).__name__} components have no conjugate prior (" + _why_none(family)
                         + "); fit them by maximum likelihood (prior=None)")
    build, expected = builders[kind]
    if spec == DEFAULT:
        spec = (NormalInverseGamma() if cast(Gaussian, family).covariance_type in ("diag", "spherical") else NormalInverseWishart()) \
            if kind is Gaussian else (Dirichlet(None) if kind is Categorical else expected())
    if not isinstance(spec, expected):
        raise ValueError(f"{type(family).__name__} components take a {expected.__name__} prior, got {spec!r}")
    return build(spec, context)


def _why_none(family: ComponentFamily) -> str:
    name = type(family).__name__
    if name == "Gamma":
        return "a Gamma distribution's shape has no conjugate prior"
    if name == "VonMisesFisher":
        return "a von Mises-Fisher concentration has no conjugate prior"
    return "none is implemented"


def latent_prior(spec: Any, name: str, n_states_shape: tuple[int, ...], context: Context, sticky: bool) -> DirichletLatent | None:
    """The resolved Dirichlet prior of a latent probability parameter, or None (flat)."""
    if spec is None or spec == DEFAULT:
        return None
    if not isinstance(spec, Dirichlet):
        raise ValueError(f"the prior of {name} must be a Dirichlet (or None), got {spec!r}")
    if spec.concentration is None:
        raise ValueError(f"the prior of {name} needs a concentration, got None")
    alpha = context.working(spec.concentration, n_states_shape, f"the concentration of the prior of {name}")
    _at_least(alpha, 1, f"the concentration of the prior of {name}", "a MAP estimate needs an interior mode")
    if sticky:
        stickiness = context.working(spec.stickiness, (), f"the stickiness of the prior of {name}")
        _at_least(stickiness, 0, f"the stickiness of the prior of {name}", "extra self-transition concentration")
        eye = torch.eye(n_states_shape[-1], dtype=alpha.dtype, device=alpha.device)
        alpha = alpha + stickiness[..., None, None] * eye
    else:
        _no_stickiness(spec, name)
    return DirichletLatent(alpha)


class ModelPrior:
    """The resolved prior of a model: Dirichlet priors of latent parameters (by working name)
    and the components' prior; ``scale`` multiplies every pseudo-statistic (online EM: the prior
    is set against the stream's points, the M-step taken at the scale of one batch)."""

    def __init__(self, latent: dict[str, DirichletLatent], emission: EmissionPrior | None,
                 scale: float | torch.Tensor = 1.0):
        self.latent, self.emission, self.scale = latent, emission, scale  # scale: a number or (M,) per model

    def scaled(self, factor: float | torch.Tensor) -> "ModelPrior":
        """The prior with every pseudo-statistic times ``factor`` (a number or (M,) per model)."""
        return ModelPrior(self.latent, self.emission, self.scale * factor)

    def models(self, index: torch.Tensor) -> "ModelPrior":
        scale = self.scale[index] if isinstance(self.scale, torch.Tensor) and self.scale.dim() else self.scale
        return ModelPrior({name: p.models(index) for name, p in self.latent.items()},
                          None if self.emission is None else self.emission.models(index), scale)

    def _scaled(self, pseudo: torch.Tensor) -> torch.Tensor:
        """``scale * pseudo`` for pseudo-statistics (1, M, ...)."""
        if not isinstance(self.scale, torch.Tensor) or self.scale.dim() == 0:
            return pseudo if isinstance(self.scale, (int, float)) and self.scale == 1 else pseudo * self.scale
        return pseudo * self.scale.to(pseudo).reshape(1, -1, *([1] * (pseudo.dim() - 2)))

    def emission_statistics(self, counts: torch.Tensor, sums: torch.Tensor, reference: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts (R, M, K) and sums (R, M, K, F) with the pseudo-statistics added: per-statistic
        counts (R, M, K, F) and sums (unchanged without a components' prior)."""
        if self.emission is None:
            return counts, sums
        pseudo_counts, pseudo_sums = self.emission.pseudo_statistics(reference)
        return counts.unsqueeze(-1) + self._scaled(pseudo_counts), sums + self._scaled(pseudo_sums)

    def latent_statistics(self, structure: LatentStructure, stats: Statistics) -> Statistics:
        """``stats`` with the Dirichlet pseudo-counts added to the statistics each latent
        parameter's M-step reads (:attr:`LatentStructure.parameter_statistics`)."""
        counts, latent = stats.counts, dict(stats.latent)
        for name, prior in self.latent.items():
            target = structure.parameter_statistics[name]
            extra = self._scaled(prior.pseudo_counts())
            if target == "counts":
                counts = counts + extra.reshape(*extra.shape[:2], -1)
            elif target in latent:  # (an initial clustering has no chain statistics)
                latent[target] = latent[target] + extra
        return Statistics(counts, stats.sums, stats.log_likelihood, latent, stats.reference)

    def log_prob(self, params: Params) -> torch.Tensor:
        """(R, M) log prior density of ``params``."""
        total = sum(prior.log_prob(params.latent[name]) for name, prior in self.latent.items())
        if self.emission is not None:
            total = total + self.emission.log_prob(params.emission)
        return cast(torch.Tensor, total)  # a resolved prior has a latent or an emission part (resolve)


def resolve(spec: PriorSpec, latent_groups: Mapping[str, str], sticky: Sequence[str], context: Context,
            latent_shapes: Mapping[str, tuple[int, ...]]) -> ModelPrior | None:
    """The :class:`ModelPrior` of a ``prior=`` for a model whose latent groups map to working
    names ``latent_groups`` (e.g. ``{"weights": "log_weights"}``) with event shapes
    ``latent_shapes`` (by working name); ``sticky``: the groups that take a stickiness."""
    groups = as_groups(spec)
    check_prior_spec(groups, [*latent_groups, COMPONENTS])
    latent = {}
    for group, working in latent_groups.items():
        resolved = latent_prior(groups.get(group), group, latent_shapes[working], context, group in sticky)
        if resolved is not None:
            latent[working] = resolved
    emission = emission_prior(groups.get(COMPONENTS), context)
    if not latent and emission is None:
        return None
    return ModelPrior(latent, emission)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}" if value.numel() > 1 else repr(value.item())
    return repr(value)
