"""A Markov chain over each sequence: the latent structure of a hidden Markov model.

    z_1 ~ Categorical(pi),   z_t | z_{t-1} = i ~ Categorical(A_i),   x_t | z_t = k ~ p(x | theta_k)

Parameters (working layout): ``log_startprob (R, M, K)`` and ``log_transmat (R, M, K, K)``
(rows normalised). With ``n_mix = C > 1`` every state emits from a mixture of C components of
the family (hmmlearn's GMMHMM): the family then has K * C components, component ``(k, c)`` at
position ``k * C + c``, and ``log_mix_weights (R, M, K, C)`` are the within-state weights,
folded into the emission GEMM's constant as a mixture's log weights are.

E-step (Baum-Welch): forward-backward over every sequence of a chunk
(:func:`torch_em.markov_inference.forward_backward`, rescaled probability space) gives the
state posteriors gamma, the expected start counts ``sum_s w_s gamma_{s,1}`` and transition
counts ``sum_s w_s sum_t xi_{s,t}`` (its statistics ``start`` and ``transitions``); a state's
posterior is shared among its mixture components in proportion to their joint densities.
M-step: ``pi = start / S``, ``A_i = transitions_i / sum_j transitions_ij``, mixture weights
``counts_kc / sum_c counts_kc`` (counts floored by a few eps, so an empty state gets a uniform
row instead of 0/0).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..markov_inference import forward_backward
from ..statistics import Statistics, floored_counts
from .base import LatentParams, LatentStructure


class MarkovChain(LatentStructure):
    """The hidden states of a sequence as a first-order Markov chain (``n_mix`` components per state)."""

    statistic_names = ("start", "transitions")
    parameter_statistics = {"log_startprob": "start", "log_transmat": "transitions", "log_mix_weights": "counts"}
    log_joint_scale = 1.0

    def __init__(self, n_mix: int = 1):
        self.n_mix = int(n_mix)
        self.parameter_names = ("log_startprob", "log_transmat") + (("log_mix_weights",) if self.n_mix > 1 else ())

    def n_states(self, n_components: int) -> int:
        """States K of a chain whose family has ``n_components`` = K * n_mix components."""
        return n_components // self.n_mix

    def log_prior(self, latent: LatentParams) -> torch.Tensor | None:
        if self.n_mix == 1:
            return None  # the state prior is the chain's, not a constant per point
        return latent["log_mix_weights"].flatten(-2)  # (R, M, K * C)

    def posterior(
        self, log_joint: torch.Tensor, latent: LatentParams, weights: torch.Tensor | None,
        lengths: torch.Tensor | None = None, beta: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if beta != 1.0:
            raise NotImplementedError(f"the posterior of a Markov chain has no tempered form (beta={beta!r})")
        R, M, n_components, n = log_joint.shape
        C, K = self.n_mix, self.n_states(n_components)
        if lengths is None:  # rows without sequence structure: one sequence, in order
            lengths = torch.full((1,), n, dtype=torch.long, device=log_joint.device)
        S = lengths.shape[0]
        T = n // S
        if C > 1:
            per_component = log_joint.view(R, M, K, C, n)
            state_log = per_component.logsumexp(3)  # (R, M, K, n): each state's mixture density
        else:
            state_log = log_joint
        log_emission = state_log.reshape(R * M, K, S, T).permute(0, 2, 3, 1)  # (G, S, T, K)
        sequence_weights = None
        if weights is not None:  # a sequence's weight is that of its first step (padding has 0)
            sequence_weights = weights.reshape(*weights.shape[:-1], S, T)[..., 0]  # (S,) or (M, S)
            if sequence_weights.dim() == 2:
                sequence_weights = sequence_weights.expand(R, M, S).reshape(R * M, S)
        fb = forward_backward(log_emission, latent["log_startprob"].reshape(R * M, K),
                              latent["log_transmat"].reshape(R * M, K, K), lengths, sequence_weights)
        resp = fb.posteriors.permute(0, 3, 1, 2).reshape(R, M, K, n)  # (R, M, K, n)
        if C > 1:  # the state's posterior shared among its components
            resp = (resp.unsqueeze(3) * per_component.softmax(3)).reshape(R, M, n_components, n)
        if weights is not None:
            resp = resp * weights.unsqueeze(-2)
        log_evidence = fb.log_evidence.reshape(R, M, S)
        if sequence_weights is not None:  # (S,) shared by every model, or (R * M, S)
            shared = sequence_weights.dim() == 1
            log_evidence = log_evidence * (sequence_weights if shared else sequence_weights.reshape(R, M, S))
        stats = {"start": fb.start.reshape(R, M, K), "transitions": fb.transitions.reshape(R, M, K, K)}
        return resp, log_evidence.sum(-1), stats

    def m_step(self, stats: Statistics, fixed: LatentParams) -> LatentParams:
        R, M, n_components = stats.counts.shape
        K, C = self.n_states(n_components), self.n_mix
        like = stats.counts
        if "start" in stats.latent:
            start = floored_counts(stats.latent["start"])
            transitions = floored_counts(stats.latent["transitions"])
            new = {"log_startprob": start.log() - start.sum(-1, keepdim=True).log(),
                   "log_transmat": transitions.log() - transitions.sum(-1, keepdim=True).log()}
        else:  # statistics of independent points (an initial clustering): no chain to estimate
            new = {name: value for name, value in self.default_parameters((R, M), n_components, like).items()
                   if name != "log_mix_weights"}
        if C > 1:
            counts = floored_counts(stats.counts.reshape(R, M, K, C))
            new["log_mix_weights"] = counts.log() - counts.sum(-1, keepdim=True).log()
        for name, value in fixed.items():
            new[name] = value.expand_as(new[name])
        return new

    def default_parameters(self, shape: tuple[int, ...], n_states: int, like: torch.Tensor) -> LatentParams:
        K, C = self.n_states(n_states), self.n_mix
        options: dict[str, Any] = {"dtype": like.dtype, "device": like.device}
        params = {"log_startprob": torch.full((*shape, K), -math.log(K), **options),
                  "log_transmat": torch.full((*shape, K, K), -math.log(K), **options)}
        if C > 1:
            params["log_mix_weights"] = torch.full((*shape, K, C), -math.log(C), **options)
        return params

    def statistic_shapes(self, n_states: int) -> dict[str, tuple[int, ...]]:
        K = self.n_states(n_states)
        return {"start": (K,), "transitions": (K, K)}

    def n_free_parameters(self, n_states: int) -> int:
        K, C = self.n_states(n_states), self.n_mix
        return (K - 1) + K * (K - 1) + K * (C - 1)
