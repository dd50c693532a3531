"""One categorical latent variable per point: the latent structure of a finite mixture.

    z_n ~ Categorical(w),   log p(x_n, z_n = k) = log w_k + log p(x_n | theta_k)

Parameters: ``log_weights (R, M, K)``, normalised. The posterior is the softmax over k of the
log joint (the responsibilities); the log-evidence of a point is its logsumexp. The mixture has
no statistics beyond the emission counts, and its M-step is ``log w_k = log N_k - log N``.

Tempered (deterministic annealing, :mod:`torch_em.annealing`): at inverse temperature beta the
posterior is ``r_nk = softmax_k(beta log p(x_n, k))``, i.e. ``r_nk ∝ (w_k p(x_n | k)) ** beta``,
and the log-evidence of a point is ``(1 / beta) log sum_k (w_k p(x_n | k)) ** beta``; the E-step
hands over the log joint already multiplied by beta (the GEMM's parameters scaled).
"""
from __future__ import annotations

import math

import torch

from ..normalize import BITS, log_evidence_total, log_normalize_total
from ..statistics import Statistics, floored_counts
from .base import LatentParams, LatentStructure


class IndependentCategorical(LatentStructure):
    """The latent structure of a mixture: states drawn independently for every point."""

    parameter_names = ("log_weights",)
    statistic_names = ()
    parameter_statistics = {"log_weights": "counts"}
    log_joint_scale = BITS  # the normaliser's own units: no pass to change the base
    tempers = True

    def log_prior(self, latent: LatentParams) -> torch.Tensor:
        return latent["log_weights"]

    def posterior(
        self, log_joint: torch.Tensor, latent: LatentParams, weights: torch.Tensor | None,
        lengths: torch.Tensor | None = None, beta: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        inplace = not log_joint.requires_grad
        resp, log_evidence = log_normalize_total(log_joint, weights, inplace, self.log_joint_scale)  # (R, M, K, n), (R, M)
        if beta != 1.0:  # log_joint is beta log p(x, k): its log-evidence, per 1 / beta nats
            log_evidence = log_evidence / beta
        if weights is not None:
            resp = resp.mul_(weights.unsqueeze(-2)) if inplace else resp * weights.unsqueeze(-2)
        return resp, log_evidence, {}

    def log_evidence(
        self, log_joint: torch.Tensor, latent: LatentParams, weights: torch.Tensor | None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return log_evidence_total(log_joint, weights, not log_joint.requires_grad, self.log_joint_scale)

    def m_step(self, stats: Statistics, fixed: LatentParams) -> LatentParams:
        if "log_weights" in fixed:
            return {"log_weights": fixed["log_weights"].expand_as(stats.counts)}
        counts = floored_counts(stats.counts)
        return {"log_weights": counts.log() - counts.sum(-1, keepdim=True).log()}

    def default_parameters(self, shape: tuple[int, ...], n_states: int, like: torch.Tensor) -> LatentParams:
        return {"log_weights": torch.full((*shape, n_states), -math.log(n_states), dtype=like.dtype, device=like.device)}

    def n_free_parameters(self, n_states: int) -> int:
        return n_states - 1


#: The mixture's latent structure (stateless: one instance serves every model).
MIXTURE = IndependentCategorical()
