"""Mixing weights with a variational distribution: the latent structure of a variational Bayesian mixture.

    z_n | pi ~ Categorical(pi),   pi ~ Dirichlet(alpha_0 / ...)   or a truncated stick-breaking process

Two priors on the weights, with scikit-learn's names (``weight_concentration_prior_type``):

    "dirichlet_distribution":  pi ~ Dirichlet(alpha_0, ..., alpha_0)
        q(pi) = Dirichlet(alpha),   alpha_k = alpha_0 + N_k
        E[log pi_k] = psi(alpha_k) - psi(sum_j alpha_j)
    "dirichlet_process" (truncated at K sticks): pi_k = v_k prod_{j<k} (1 - v_j), v_k ~ Beta(1, alpha_0)
        q(v_k) = Beta(a_k, b_k),    a_k = 1 + N_k,   b_k = alpha_0 + sum_{j>k} N_j
        E[log pi_k] = psi(a_k) - psi(a_k + b_k) + sum_{j<k} (psi(b_j) - psi(a_j + b_j))

Parameters (working layout): ``log_weight_concentration``, the logarithm of alpha (R, M, K), or
of (a, b) stacked as (R, M, 2, K). The E-step is a mixture's with ``E[log pi_k]`` in place of
the log weights (folded into the emission GEMM's constant); its one statistic is the entropy
``-sum_n w_n sum_k r_nk log r_nk`` of the responsibilities, which the lower bound needs. The
structure's part of scikit-learn's lower bound (its ``_compute_lower_bound``) is that entropy
minus the log-normaliser of q(pi): ``+ sum_k log B(a_k, b_k)`` for the stick-breaking process,
``- (log Gamma(sum_k alpha_k) - sum_k log Gamma(alpha_k))`` for the Dirichlet distribution.

The point estimate of the weights (scikit-learn's ``weights_``) is E[pi] (:func:`expected_weights`).
"""
from __future__ import annotations

import torch

from ..normalize import BITS
from ..statistics import Statistics, floored_counts
from .base import LatentParams, LatentStructure
from .independent import MIXTURE

PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")


class VariationalWeights(LatentStructure):
    """Mixing weights with a Dirichlet (``"dirichlet_distribution"``) or truncated
    stick-breaking (``"dirichlet_process"``) prior of concentration ``weight_concentration_prior``:
    a number, or a tensor (M, 1) with one value per model of the batch."""

    parameter_names = ("log_weight_concentration",)
    statistic_names = ("entropy",)
    log_joint_scale = BITS  # the mixture's posterior, in the normaliser's own units

    def __init__(self, prior_type: str = "dirichlet_process", weight_concentration_prior: float | torch.Tensor = 1.0):
        if prior_type not in PRIOR_TYPES:
            raise ValueError(f"weight_concentration_prior_type must be one of {list(PRIOR_TYPES)}, got {prior_type!r}")
        self.prior_type = prior_type
        self.weight_concentration_prior = weight_concentration_prior

    @property
    def stick_breaking(self) -> bool:
        return self.prior_type == "dirichlet_process"

    def with_prior(self, weight_concentration_prior: float | torch.Tensor) -> "VariationalWeights":
        """The same structure with another concentration (a number or (M, 1) per model)."""
        return VariationalWeights(self.prior_type, weight_concentration_prior)

    def select_models(self, models: torch.Tensor) -> "VariationalWeights":
        prior = self.weight_concentration_prior
        return self if not isinstance(prior, torch.Tensor) or prior.dim() == 0 else self.with_prior(prior[models])

    def log_prior(self, latent: LatentParams) -> torch.Tensor:
        return expected_log_weights(latent["log_weight_concentration"].exp(), self.stick_breaking)

    def posterior(
        self, log_joint: torch.Tensor, latent: LatentParams, weights: torch.Tensor | None,
        lengths: torch.Tensor | None = None, beta: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if beta != 1.0:
            raise NotImplementedError(f"the posterior of variational weights has no tempered form (beta={beta!r})")
        resp, log_evidence, _ = MIXTURE.posterior(log_joint, latent, weights)  # (R, M, K, n) weighted, (R, M)
        # With weighted posteriors w r: sum_k w r log(w r) = w sum_k r log r + w log w.
        neg_entropy = torch.xlogy(resp, resp).sum(-2)  # (R, M, n)
        if weights is not None:
            neg_entropy = neg_entropy - torch.xlogy(weights, weights)
        return resp, log_evidence, {"entropy": -neg_entropy.sum(-1)}

    def m_step(self, stats: Statistics, fixed: LatentParams) -> LatentParams:
        counts = floored_counts(stats.counts)  # (R, M, K), as scikit-learn's nk
        prior = self._prior_like(counts)
        if self.stick_breaking:
            # b_k = alpha_0 + sum_{j>k} N_j, summed from the last component as scikit-learn does.
            later = counts.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # (R, M, K - 1)
            rest = torch.cat([later, torch.zeros_like(counts[..., :1])], -1)
            concentration = torch.stack([1.0 + counts, prior + rest], -2)  # (R, M, 2, K)
        else:
            concentration = prior + counts
        new = {"log_weight_concentration": concentration.log()}
        for name, value in fixed.items():
            new[name] = value.expand_as(new[name])
        return new

    def variational_bound(self, stats: Statistics, latent: LatentParams) -> torch.Tensor:
        concentration = latent["log_weight_concentration"].exp()
        if self.stick_breaking:
            a, b = concentration.unbind(-2)
            log_norm = -(a.lgamma() + b.lgamma() - (a + b).lgamma()).sum(-1)  # -sum_k log B(a_k, b_k)
        else:
            log_norm = concentration.sum(-1).lgamma() - concentration.lgamma().sum(-1)
        return stats.latent["entropy"] - log_norm

    def _prior_like(self, counts: torch.Tensor) -> torch.Tensor | float:
        prior = self.weight_concentration_prior
        return prior.to(counts) if isinstance(prior, torch.Tensor) else prior

    def statistic_shapes(self, n_states: int) -> dict[str, tuple[int, ...]]:
        return {"entropy": ()}

    def default_parameters(self, shape: tuple[int, ...], n_states: int, like: torch.Tensor) -> LatentParams:
        event = (2, n_states) if self.stick_breaking else (n_states,)
        return {"log_weight_concentration": torch.zeros(*shape, *event, dtype=like.dtype, device=like.device)}

    def n_free_parameters(self, n_states: int) -> int:
        return 2 * n_states if self.stick_breaking else n_states


def expected_log_weights(concentration: torch.Tensor, stick_breaking: bool) -> torch.Tensor:
    """``E[log pi_k]`` (..., K) under q(pi): Dirichlet(alpha) for alpha (..., K), or the
    stick-breaking process of Beta(a_k, b_k) sticks for (a, b) stacked as (..., 2, K)."""
    if not stick_breaking:
        return concentration.digamma() - concentration.sum(-1, keepdim=True).digamma()
    a, b = concentration.unbind(-2)
    digamma_sum = (a + b).digamma()
    log_rest = (b.digamma() - digamma_sum).cumsum(-1)  # sum_{j<=k} E[log(1 - v_j)]
    before = torch.cat([torch.zeros_like(log_rest[..., :1]), log_rest[..., :-1]], -1)
    return a.digamma() - digamma_sum + before


def expected_weights(concentration: torch.Tensor, stick_breaking: bool) -> torch.Tensor:
    """``E[pi_k]`` (..., K), normalised (scikit-learn's ``weights_``); concentrations as for
    :func:`expected_log_weights`."""
    if not stick_breaking:
        return concentration / concentration.sum(-1, keepdim=True)
    a, b = concentration.unbind(-2)
    total = a + b
    rest = (b / total)[..., :-1].cumprod(-1)  # prod_{j<=k} E[1 - v_j]
    weights = a / total * torch.cat([torch.ones_like(a[..., :1]), rest], -1)
    return weights / weights.sum(-1, keepdim=True)
