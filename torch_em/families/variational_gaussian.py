"""Gaussian components with a Gaussian-Wishart variational distribution (variational Bayes).

Prior (scikit-learn's ``BayesianGaussianMixture``, Bishop 2006, ch. 10.2), per component:

    Lambda_k ~ Wishart(nu_0, W_0),   mu_k | Lambda_k ~ N(m_0, (beta_0 Lambda_k)^{-1})

with scikit-learn's names: ``mean_precision_prior`` beta_0, ``mean_prior`` m_0,
``degrees_of_freedom_prior`` nu_0 and ``covariance_prior`` Psi_0 = W_0^{-1} (a matrix for full
and tied, a vector of variances for diag, a number for spherical covariances).

Variational parameters (unconstrained, ``K`` components, ``D`` features, batch dims in front):

    loc                      (*b, K, D)  m_k, the mean of q(mu_k)
    raw_precision_cholesky   as :class:`Gaussian`'s: the Cholesky factor of E[Lambda_k] = nu_k W_k
    log_mean_precision       (*b, K)     log beta_k
    log_degrees_of_freedom   (*b, K)     log nu_k   (tied: (*b,), one Wishart for all components)

so ``covariance`` is scikit-learn's ``covariances_`` (W_k^{-1} / nu_k) and the Gaussian views
(means, precisions, precisions_cholesky) are its point estimates.

E-step: the expected log-density is linear in the same T(x) as a Gaussian's, with the expected
natural parameters: eta = [E[Lambda mu~], -1/2 E[Lambda]] (a Gaussian's with mean m_k and
precision nu_k W_k) and

    const = 1/2 E[log|Lambda|] - 1/2 E[mu~^T Lambda mu~] - D/2 log(2 pi)
          = (Gaussian's const of m_k, nu_k W_k) + 1/2 (E[log|Lambda|] - log|nu_k W_k|) - D / (2 beta_k)
    E[log|Lambda|] = sum_{i<D} psi((nu_k - i) / 2) + D log 2 + log|W_k|

so the E-step is one GEMM of the same features and gives the same statistics as EM's.

M-step (closed form from the statistics N_k, x_k, S_k, with S_k the maximum-likelihood
covariance plus ``reg_covar`` as scikit-learn forms it):

    beta_k = beta_0 + N_k,  m_k = (beta_0 m_0 + N_k x_k) / beta_k,  nu_k = nu_0 + N_k
    W_k^{-1} = Psi_0 + N_k S_k + N_k beta_0 / beta_k (x_k - m_0)(x_k - m_0)^T

(tied: nu = nu_0 + N / K and W^{-1} = Psi_0 + N / K S + beta_0 / K sum_k N_k / beta_k d_k d_k^T;
diag and spherical the corresponding diagonal and mean-variance forms). Components are never
re-seeded (``min_count`` 0): an unused component keeps the prior and its weight vanishes.

Its part of scikit-learn's lower bound: ``-sum_k log B(W_k, nu_k) - D/2 sum_k log beta_k`` with
scikit-learn's simplified Wishart normaliser ``log B = -(nu log|P| - nu D/2 log nu + nu D/2 log 2
+ sum_i log Gamma((nu - i) / 2))`` (P the Cholesky factor of nu W, constants dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping, cast

import torch

from .base import Theta
from .gaussian import Gaussian, pack_raw_triangular, precision_cholesky_from_covariance

#: The variational parameters beyond a Gaussian's.
VARIATIONAL_PARAMETERS = ("log_mean_precision", "log_degrees_of_freedom")


@dataclass
class GaussianWishartPrior:
    """Hyperparameters of the Gaussian-Wishart prior for a batch of M models, each with the
    model axis first so that they broadcast against working parameters (R, M, K, ...) and a fit
    that computes only some models selects theirs (:meth:`select`).

    Shape:
        mean_precision (M, 1); mean (M, 1, D); degrees_of_freedom (M, 1) (tied: (M,));
        covariance full (M, 1, D, D), tied (M, D, D), diag (M, 1, D), spherical (M, 1).
    """

    mean_precision: torch.Tensor
    mean: torch.Tensor
    degrees_of_freedom: torch.Tensor
    covariance: torch.Tensor

    def select(self, models: torch.Tensor) -> "GaussianWishartPrior":
        """The hyperparameters of the models ``models`` (A,) only."""
        return GaussianWishartPrior(*(getattr(self, f.name)[models] for f in fields(self)))


class VariationalGaussian(Gaussian):
    """Gaussian components whose means and precisions have a Gaussian-Wishart variational
    distribution; ``prior`` (a :class:`GaussianWishartPrior`) is needed by the M-step only (a
    model built without it evaluates, but cannot be fitted)."""

    lifts_rounding = False  # (its M-step is the variational one, which takes no lift)

    #: Never re-seeded: variational Bayes lets an unused component's weight vanish.
    min_count = 0.0

    def __init__(self, covariance_type: str = "full", reg_covar: float = 1e-6, *,
                 prior: GaussianWishartPrior | None = None) -> None:
        super().__init__(covariance_type, reg_covar)
        self.prior = prior

    def config(self) -> dict:
        return {"covariance_type": self.covariance_type, "reg_covar": self.reg_covar, "prior": self.prior}

    def with_prior(self, prior: GaussianWishartPrior | None) -> "VariationalGaussian":
        """The same family with other hyperparameters."""
        return VariationalGaussian(self.covariance_type, self.reg_covar, prior=prior)

    def select_models(self, models: torch.Tensor) -> "VariationalGaussian":
        return self if self.prior is None else self.with_prior(self.prior.select(models))

    # --- parameter layout -------------------------------------------------------------------
    def event_shapes(self, n_components: int, n_features: int) -> dict[str, tuple[int, ...]]:
        tied = self.covariance_type == "tied"
        return {**super().event_shapes(n_components, n_features), "log_mean_precision": (n_components,),
                "log_degrees_of_freedom": () if tied else (n_components,)}

    def default_parameters(self, batch_shape, n_components, n_features, generator, device, dtype) -> Theta:
        theta = super().default_parameters(batch_shape, n_components, n_features, generator, device, dtype)
        shapes = self.event_shapes(n_components, n_features)
        theta["log_mean_precision"] = torch.zeros(*batch_shape, *shapes["log_mean_precision"], device=device, dtype=dtype)
        theta["log_degrees_of_freedom"] = torch.full(
            (*batch_shape, *shapes["log_degrees_of_freedom"]), math.log(n_features), device=device, dtype=dtype)
        return theta

    def n_free_parameters(self, n_components: int, n_features: int) -> int:
        wishart = 1 if self.covariance_type == "tied" else n_components
        return super().n_free_parameters(n_components, n_features) + n_components + wishart

    def supports_fixing(self, names: set[str]) -> bool:
        return len(names) == 0

    # --- constrained views -------------------------------------------------------------------
    def mean_precision(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """beta_k (*b, K)."""
        return theta["log_mean_precision"].exp()

    def degrees_of_freedom(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """nu_k (*b, K), or (*b,) for tied covariances."""
        return theta["log_degrees_of_freedom"].exp()

    # --- E-step -------------------------------------------------------------------------------
    def natural_parameters(self, theta, reference) -> tuple[torch.Tensor, torch.Tensor]:
        eta, const = super().natural_parameters(theta, reference)
        return eta, const + self.expectation_correction(theta)

    def expectation_correction(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``E[log N(x | mu, Lambda)] - log N(x | m, nu W)`` (*b, K), the same for every x:
        ``1/2 (sum_i psi((nu - i) / 2) + D log 2 - D log nu) - D / (2 beta)``."""
        n_features = theta["loc"].shape[-1]
        dof = self.degrees_of_freedom(theta)
        if self.covariance_type == "tied":
            dof = dof.unsqueeze(-1)  # (*b, 1): one Wishart for every component
        steps = torch.arange(n_features, dtype=dof.dtype, device=dof.device)
        expected_log_det = (0.5 * (dof.unsqueeze(-1) - steps)).digamma().sum(-1) + n_features * math.log(2.0)
        correction = 0.5 * (expected_log_det - n_features * dof.log()) - 0.5 * n_features / self.mean_precision(theta)
        return correction.expand(theta["log_mean_precision"].shape)

    def direct_log_prob(self, offsets, theta, index) -> torch.Tensor:
        correction = self.expectation_correction(theta).flatten()[index]  # (G,)
        return super().direct_log_prob(offsets, theta, index) + correction.unsqueeze(-1)

    # --- M-step -------------------------------------------------------------------------------
    def m_step(self, counts, stats, reference) -> tuple[Theta, torch.Tensor]:
        if self.prior is None:
            raise ValueError("VariationalGaussian.m_step needs the hyperparameters: build the family with prior=")
        prior = self._prior_like(stats)
        n_features = self._n_features_from_stats(stats.shape[-1])
        centred_mean = stats[..., :n_features] / counts.unsqueeze(-1)  # (*b, K, D) about the reference
        means = centred_mean if reference is None else centred_mean + reference  # x_k, scikit-learn's xk
        mean_precision = prior.mean_precision + counts  # beta_k
        loc = (prior.mean_precision.unsqueeze(-1) * prior.mean + counts.unsqueeze(-1) * means) / mean_precision.unsqueeze(-1)
        shrinkage = counts * prior.mean_precision / mean_precision  # N_k beta_0 / beta_k
        scatter = self._within_scatter(counts, centred_mean, stats[..., n_features:])
        covariance, dof = self._posterior_covariance(prior, counts, scatter, shrinkage, means - prior.mean)
        raw, valid = self._raw_precision_cholesky(covariance)
        if self.covariance_type == "tied":
            valid = valid.unsqueeze(-1).expand_as(counts)
        theta = {"loc": loc, "raw_precision_cholesky": raw, "log_mean_precision": mean_precision.log(),
                 "log_degrees_of_freedom": dof.log()}
        return theta, valid

    def _posterior_covariance(
        self, prior: GaussianWishartPrior, counts: torch.Tensor, scatter: torch.Tensor, shrinkage: torch.Tensor,
        offset: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_k^{-1} / nu_k`` (scikit-learn's ``covariances_``, per type) and nu_k (tied: nu).

        Shape:
            counts, shrinkage (N_k beta_0 / beta_k): (*b, K); scatter: :meth:`_within_scatter`'s;
            offset (x_k - m_0): (*b, K, D)
        """
        n_features = offset.shape[-1]
        eye = torch.eye(n_features, dtype=offset.dtype, device=offset.device)
        if self.covariance_type == "tied":
            share = counts.sum(-1) / counts.shape[-1]  # N / K, (*b,)
            dof = prior.degrees_of_freedom + share
            spread = (shrinkage[..., None, None] * offset.unsqueeze(-1) * offset.unsqueeze(-2)).sum(-3)
            pooled = scatter.sum(-3) / counts.sum(-1)[..., None, None] + self.reg_covar * eye  # S
            wishart = prior.covariance + share[..., None, None] * pooled + spread / counts.shape[-1]
            return wishart / dof[..., None, None], dof
        dof = prior.degrees_of_freedom + counts
        if self.covariance_type == "full":
            sample = scatter / counts[..., None, None] + self.reg_covar * eye  # S_k
            spread = offset.unsqueeze(-1) * offset.unsqueeze(-2)
            wishart = prior.covariance + counts[..., None, None] * sample + shrinkage[..., None, None] * spread
            return wishart / dof[..., None, None], dof
        # diag: per feature (*b, K, D); spherical: the mean over the features (*b, K).
        per_component = (lambda value: value.unsqueeze(-1)) if self.covariance_type == "diag" else (lambda value: value)
        spread = offset.square() if self.covariance_type == "diag" else offset.square().mean(-1)
        sample = scatter / per_component(counts) + self.reg_covar
        wishart = prior.covariance + per_component(counts) * sample + per_component(shrinkage) * spread
        return wishart / per_component(dof), dof

    def _within_scatter(self, counts: torch.Tensor, centred_mean: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``sum_n r_nk (x - x_k)(x - x_k)^T`` per component from the second-moment statistics
        about any reference point: (*b, K, D, D) for full and tied covariances, the diagonal
        (*b, K, D) for diag, the mean over the features (*b, K) for spherical."""
        n_features = centred_mean.shape[-1]
        if self.covariance_type == "diag":
            return second - counts.unsqueeze(-1) * centred_mean.square()
        if self.covariance_type == "spherical":
            return (second[..., 0] - counts * centred_mean.square().sum(-1)) / n_features
        packed = _packed_index(n_features, second.device)  # (D, D) positions in the packed triangle
        moments = second[..., packed]  # (*b, K, D, D) symmetric sum_n r x~ x~^T
        return moments - counts[..., None, None] * centred_mean.unsqueeze(-1) * centred_mean.unsqueeze(-2)

    def _raw_precision_cholesky(self, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unconstrained precision factor of covariances (per type) and whether each is valid."""
        if self.covariance_type in ("full", "tied"):
            upper, info = precision_cholesky_from_covariance(covariance)
            return pack_raw_triangular(upper), info == 0
        valid = (covariance > 0) & torch.isfinite(covariance)
        raw = -0.5 * covariance.clamp_min(torch.finfo(covariance.dtype).tiny).log()
        return raw, valid.all(-1) if self.covariance_type == "diag" else valid

    def _prior_like(self, like: torch.Tensor) -> GaussianWishartPrior:
        prior = cast(GaussianWishartPrior, self.prior)  # m_step, its one caller, raises when it is None
        return GaussianWishartPrior(*(getattr(prior, f.name).to(like) for f in fields(prior)))

    # --- lower bound --------------------------------------------------------------------------
    def variational_bound(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n_features = theta["loc"].shape[-1]
        n_components = theta["loc"].shape[-2]
        raw = theta["raw_precision_cholesky"]
        half_logdet = raw.diagonal(dim1=-2, dim2=-1).sum(-1) if self.covariance_type in ("full", "tied") else (
            raw.sum(-1) if self.covariance_type == "diag" else n_features * raw)  # log|P|
        dof = self.degrees_of_freedom(theta)
        log_det = half_logdet - 0.5 * n_features * dof.log()  # log|P| of W (scikit-learn's normalised factor)
        steps = torch.arange(n_features, dtype=dof.dtype, device=dof.device)
        log_wishart = -(dof * log_det + dof * n_features * 0.5 * math.log(2.0)
                        + (0.5 * (dof.unsqueeze(-1) - steps)).lgamma().sum(-1))
        log_wishart = n_components * log_wishart if self.covariance_type == "tied" else log_wishart.sum(-1)
        return -log_wishart - 0.5 * n_features * theta["log_mean_precision"].sum(-1)


def _packed_index(n_features: int, device: torch.device) -> torch.Tensor:
    """(D, D): the position of entry (i, j) (and (j, i)) in the packed upper triangle of T(x)."""
    rows, cols = torch.triu_indices(n_features, n_features, device=device)
    index = torch.empty(n_features, n_features, dtype=torch.long, device=device)
    positions = torch.arange(rows.numel(), device=device)
    index[rows, cols] = positions
    index[cols, rows] = positions
    return index

